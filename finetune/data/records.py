"""Chat records: read JSON / JSONL / `datasets` dirs, validate every record, normalise to one form.

The normalised form, which everything after this module works on:

    {"id": str | None, "system": str, "messages": [{"role": "user" | "assistant", "content": str}, ...]}

`messages` alternate user/assistant, start with a user turn and contain at least one assistant turn; the
system prompt lives only in `system` (the default one when the record has none). Normalising a normalised
record returns an equal record, so downstream code can accept raw and normalised records alike.

Reading streams: JSONL line by line, a JSON array element by element (`raw_decode` over the text, so the
whole corpus never exists as one big Python list), so each record is validated as it is read and an
error can name its record index and line.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .. import react  # tool / function-call conversations: the ReAct layout the server uses
from ..tokenization import DEFAULT_SYSTEM  # one definition, shared with chat()

# Accepted role names -> the normalised role. ShareGPT writes human/gpt; the others are Qwen's / OpenAI's.
ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DataError(ValueError):
    """An unreadable data file or an invalid record.

    `reason` is a short category (used to count skips), `detail` the specific cause; `str(err)` names the
    file, the record index, the line (when known) and the cause.
    """

    def __init__(self, reason: str, detail: str = "", *, path: str | None = None,
                 index: int | None = None, line: int | None = None):
        self.reason, self.detail, self.path, self.index, self.line = reason, detail, path, index, line
        super().__init__(self._message())

    def __reduce__(self):  # keep the fields across processes (datasets workers)
        return (_rebuild_error, (self.reason, self.detail, self.path, self.index, self.line))

    def to_json(self) -> str:
        return json.dumps({"reason": self.reason, "detail": self.detail, "path": self.path,
                           "index": self.index, "line": self.line}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> "DataError":
        return _rebuild_error(**json.loads(s))

    def _message(self) -> str:
        where = []
        if self.path is not None:
            where.append(str(self.path))
        if self.index is not None:
            where.append(f"record {self.index}")
        if self.line is not None:
            where.append(f"line {self.line}")
        cause = self.reason + (f": {self.detail}" if self.detail else "")
        return (", ".join(where) + ": " if where else "") + cause

    def located(self, path: str | None, index: int | None, line: int | None) -> "DataError":
        """The same error with its place in a file filled in."""
        return DataError(self.reason, self.detail, path=path, index=index, line=line)


def _rebuild_error(reason, detail, path, index, line):
    return DataError(reason, detail, path=path, index=index, line=line)


# -- one record ---------------------------------------------------------------------------------------


def _turn_fields(turn: Any, i: int) -> tuple[str, Any]:
    if not isinstance(turn, dict):
        raise DataError("invalid turn", f"turn {i} is a {type(turn).__name__}, not an object")
    role = turn.get("from", turn.get("role"))
    if role is None:
        raise DataError("invalid turn", f"turn {i} has no 'from' (or 'role') field")
    if "value" in turn:
        content = turn["value"]
    elif "content" in turn:
        content = turn["content"]
    else:
        raise DataError("invalid turn", f"turn {i} has no 'value' (or 'content') field")
    return role, content


def normalize_record(record: Any) -> dict:
    """Validate one record in any accepted form and return its normalised form; raise DataError if invalid.

    The error carries no file position; `iter_records` adds it.
    """
    if not isinstance(record, dict):
        raise DataError("record is not an object", f"got a {type(record).__name__}")
    if react.is_tool_record(record):  # rendered into user/assistant turns whose assistants carry `segments`
        try:
            record = react.render_tool_record(record)
        except react.ReactError as e:
            raise DataError("invalid tool conversation", f"{e.field}: {e}" if e.field else str(e)) from None
    if "conversations" in record:
        turns = record["conversations"]
        key = "conversations"
    elif "messages" in record:
        turns = record["messages"]
        key = "messages"
    else:
        raise DataError("no conversations", "the record has neither 'conversations' nor 'messages'")
    if not isinstance(turns, list) or not turns:
        raise DataError("no conversations", f"'{key}' must be a non-empty list")

    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError("invalid system", f"top-level 'system' must be a string, got {type(system).__name__}")

    messages = []
    for i, turn in enumerate(turns):
        raw_role, content = _turn_fields(turn, i)
        role = ROLES.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise DataError("unknown role", f"turn {i} has role {raw_role!r} "
                            f"(accepted: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError("invalid value", f"turn {i} ({role}) has a {type(content).__name__} value, "
                            "not a string")
        if role == "system":
            if i != 0:
                raise DataError("system turn not first", f"turn {i} is a system turn; only turn 0 may be")
            if system is not None:
                raise DataError("two system prompts", "the record has both a top-level 'system' and a "
                                "system turn")
            system = content  # an empty system prompt is legitimate (make_context allows it)
            continue
        if not content.strip():
            raise DataError("empty value", f"turn {i} ({role}) is empty")
        if messages and messages[-1]["role"] == role:
            raise DataError("consecutive turns of the same role", f"turns {i - 1} and {i} are both {role}")
        if not messages and role == "assistant":
            raise DataError("starts with an assistant turn", f"turn {i} is the first turn after the "
                            "system prompt and is an assistant turn; a conversation starts with the user")
        messages.append({"role": role, "content": content})
        if role == "assistant" and "segments" in turn:  # labels per segment (react.render_tool_record)
            try:
                messages[-1]["segments"] = react.check_segments(turn["segments"], content, f"turn {i}")
            except react.ReactError as e:
                raise DataError("invalid segments", f"{e.field}: {e}") from None

    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn", "nothing to train on")
    rid = record.get("id")
    return {
        "id": None if rid is None else str(rid),
        "system": DEFAULT_SYSTEM if system is None else system,
        "messages": messages,
    }


# -- files ----------------------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")


def _json_error(path: str, e: json.JSONDecodeError, index: int | None = None) -> DataError:
    return DataError("invalid JSON", f"{e.msg} at line {e.lineno} column {e.colno}",
                     path=path, index=index, line=e.lineno)


def _iter_json_array(path: str, text: str, start: int) -> Iterator[tuple[int, int | None, Any]]:
    """(index, line, object) for each element of the JSON array that starts at text[start] == '['."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text, start + 1).end()
    line, counted = 1, 0  # line number of `pos`, maintained incrementally
    if text.startswith("]", pos):
        pos = _WS.match(text, pos + 1).end()
        if pos != len(text):
            raise _json_error(path, json.JSONDecodeError("Extra data", text, pos))
        return
    index = 0
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _json_error(path, e, index) from None
        yield index, line, obj
        index += 1
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            pos = _WS.match(text, pos + 1).end()
            if pos != len(text):
                raise _json_error(path, json.JSONDecodeError("Extra data after the array", text, pos))
            return
        raise _json_error(path, json.JSONDecodeError("Expecting ',' or ']'", text, pos), index)


def _is_jsonl(path: str) -> bool:
    """JSONL unless the file's first non-blank character opens a JSON array."""
    if Path(path).suffix.lower() in JSONL_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        while not head:
            chunk = f.read(1 << 16)
            if not chunk:
                return False  # empty: read as a (failing) JSON document
            head = chunk.lstrip(b" \t\r\n")
    return not head.startswith(b"[")


def _iter_jsonl(path: str, start: int = 0, end: int | None = None, line0: int = 0, index0: int = 0):
    """(index, line, raw record, parse error) for the lines of a JSONL file in bytes [start, end)."""
    hint = "" if Path(path).suffix.lower() in JSONL_SUFFIXES else \
        " (the file is not a JSON array, so it is read as one object per line)"
    index, lineno = index0, line0
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        for line in f:
            if end is not None and pos >= end:
                break
            pos += len(line)
            lineno += 1
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a BOM, which some editors write
            if not line.strip():
                continue  # blank lines hold no record
            try:
                yield index, lineno, json.loads(line), None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                cause = f"{e.msg} at line {lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) \
                    else f"not UTF-8 ({e.reason}) on line {lineno}"
                yield index, lineno, None, DataError("invalid JSON", cause + hint, path=path, index=index,
                                                     line=lineno)
            index += 1


def jsonl_shards(path: str, n: int) -> list[tuple[int, int | None, int, int]]:
    """Split a JSONL file at line starts into n byte ranges: (start, end, lines before, records before)."""
    size = os.path.getsize(path)
    cuts = [size * k // n for k in range(1, n)]
    shards, start, line0, index0 = [], 0, 0, 0
    lines = records = 0
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if cuts and pos >= cuts[0] and pos > start:
                shards.append((start, pos, line0, index0))
                start, line0, index0 = pos, lines, records
                while cuts and cuts[0] <= pos:
                    cuts.pop(0)
            pos += len(line)
            lines += 1
            records += bool(line.strip())
    shards.append((start, None, line0, index0))
    return shards


def _iter_raw(path: str) -> Iterator[tuple[int, int | None, Any, DataError | None]]:
    """(index, line, raw record, parse error) for each record of a file or `datasets` dir."""
    p = Path(path)
    if p.is_dir():
        if not (p / "dataset_info.json").exists() and not (p / "dataset_dict.json").exists():
            raise DataError("not a data file", "a directory that is not a `datasets` save_to_disk dir",
                            path=path)
        import datasets  # only needed for dataset dirs

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError("not a data file", f"a DatasetDict without a 'train' split "
                                f"(splits: {', '.join(ds)})", path=path)
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield i, None, row, None
        return
    if not p.is_file():
        raise DataError("file not found", "no such file", path=path)
    if _is_jsonl(path):
        yield from _iter_jsonl(path)
        return
    with open(p, encoding="utf-8-sig") as f:
        text = f.read()
    start = _WS.match(text).end()
    if start == len(text):
        raise DataError("empty file", "no records", path=path)
    yield from ((i, ln, obj, None) for i, ln, obj in _iter_json_array(path, text, start))


def iter_records(path: str | os.PathLike, skip_invalid: bool = False,
                 shard: tuple | None = None) -> Iterator[tuple[dict | None, DataError | None]]:
    """Stream (normalised record, None) per valid record, and (None, error) per invalid one when skipping.

    File-level problems (missing file, a broken JSON array) always raise: there is no record to skip.
    `shard` (from `jsonl_shards`) restricts a JSONL file to one byte range.
    """
    path = str(path)
    raw_iter = _iter_raw(path) if shard is None else _iter_jsonl(path, *shard)
    for index, line, raw, err in raw_iter:
        if err is None:
            try:
                yield normalize_record(raw), None
                continue
            except DataError as e:
                err = e.located(path, index, line)
        if not skip_invalid:
            raise err
        yield None, err


# -- whole files ---------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What `load_records` read: counts, and every skipped record's error."""

    path: str
    read: int = 0
    used: int = 0
    errors: list[DataError] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return len(self.errors)

    def reasons(self) -> Counter:
        return Counter(e.reason for e in self.errors)

    def format(self, max_examples: int = 5) -> str:
        out = [f"{self.path}: {self.read} records read, {self.used} used, {self.skipped} skipped"]
        for reason, n in self.reasons().most_common():
            out.append(f"  skipped {n}: {reason}")
        for e in self.errors[:max_examples]:
            out.append(f"  e.g. {e}")
        return "\n".join(out)


class RecordList(list):
    """A list of normalised records that also carries the `LoadReport` of the read (`.report`)."""

    report: LoadReport


def load_records(path: str | os.PathLike, skip_invalid: bool = False) -> RecordList:
    """Read and validate a JSON array, JSONL file or `datasets` dir; return the normalised records.

    Invalid records raise DataError, or with `skip_invalid` are counted in `result.report` (and the count
    is printed to stderr). A file with no usable record is always an error.
    """
    report = LoadReport(str(path))
    records = RecordList()
    for rec, err in iter_records(path, skip_invalid):
        report.read += 1
        if err is not None:
            report.errors.append(err)
        else:
            records.append(rec)
    report.used = len(records)
    records.report = report
    if report.skipped:
        print(report.format(), file=sys.stderr)
    if not records:
        raise DataError("no usable records",
                        f"{report.read} read, {report.skipped} invalid" if report.read else "the file is empty",
                        path=str(path))
    return records
