"""The responses that POST /v1/responses keeps (``store``, true unless the request says false, as OpenAI's API):
what GET /v1/responses/{id}, its input_items and a later request's ``previous_response_id`` read.

In memory, in this server process: the most recent ``capacity`` responses (--max-stored-responses) whose
conversations add up to at most ``max_bytes`` of JSON (MAX_BYTES); the least recently stored or read response is
dropped when a new one would pass either. A response holds its conversation as a list of the items themselves
(shared with the response it continued, not copied), so a chain of turns costs a list of references a turn, and a
dropped response's items live on in the conversations that continued it; the byte count counts shared items once
per response holding them, an upper bound on what the store holds. Nothing survives a restart.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

MAX_BYTES = 2**30  # what all stored conversations may add up to (JSON), however few responses that is


@dataclass
class Stored:
    """One stored response: the response object as last sent, and ``context``: the input items it answered, those
    of the responses it continued (with their outputs) first."""

    response: dict
    context: list[dict]
    size: int  # the JSON bytes of the context and the output

    def conversation(self) -> list[dict]:
        """What a request continuing this response starts from: its context, then its output."""
        return self.context + self.response["output"]


class ResponseStore:
    def __init__(self, capacity: int, max_bytes: int = MAX_BYTES):
        if capacity < 0:
            raise ValueError(f"the response store's capacity must be 0 or more, got {capacity}")
        self.capacity, self.max_bytes = capacity, max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self.bytes = 0
        # responses being made in the background (background: true), by id -> (their task, their reply), until
        # they end: what a cancel stops and a server stop cancels
        self.running: dict[str, tuple] = {}

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response: dict, context: list[dict], size: int) -> bool:
        """Keep ``response`` (under its id) with the conversation it answered, ``size`` JSON bytes with its output;
        False when this store keeps none (capacity 0)."""
        if self.capacity == 0:
            return False
        self.delete(response["id"])
        self._items[response["id"]] = Stored(response, context, size)
        self.bytes += size
        while len(self._items) > self.capacity or (self.bytes > self.max_bytes and len(self._items) > 1):
            self.bytes -= self._items.popitem(last=False)[1].size
        return True

    def get(self, response_id: str) -> Stored | None:
        stored = self._items.get(response_id)
        if stored is not None:
            self._items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self._items.pop(response_id, None)
        if stored is not None:
            self.bytes -= stored.size
        return stored is not None
