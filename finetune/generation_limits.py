"""How long a prompt and a reply a model allows: the most new tokens, max(max_position_embeddings, 4 x seq_length)
of its config.json (the length the inference engine gives a row, which the server allows a reply), the one-line
refusal of a --max-new-tokens past it, and the prompt window (max_window_size) of its generation config. Chat and
eval check their flags against them before the weights load."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_WINDOW = 6144  # max_window_size where the generation config has none, as the official chat() has it


def max_new_tokens_limit(model_dir) -> int | None:
    """The most new tokens a reply may have on ``model_dir`` (a local model dir; None otherwise): the engine's
    default length, max(max_position_embeddings, 4 x seq_length), as chat and the server have it."""
    from .errors import ModelLoadError
    from .model_dir import read_config

    if not Path(model_dir).is_dir():
        return None
    try:
        cfg = read_config(model_dir)
    except ModelLoadError:
        return None  # (the load says what is wrong with it)
    return new_tokens_limit(cfg)


def new_tokens_limit(cfg: dict) -> int | None:
    """max(max_position_embeddings, 4 x seq_length) of a config.json's values (None where they are not whole
    numbers): ``max_new_tokens_limit`` of a dir, and chat's ``:conf`` of the loaded model's config."""
    positions, seq = cfg.get("max_position_embeddings") or 0, cfg.get("seq_length") or 0
    if not isinstance(positions, int) or not isinstance(seq, int):
        return None
    from .inference.engine import default_max_len

    return default_max_len(positions, seq) or None


def too_many_new_tokens(max_new_tokens: int | None, limit: int | None, holder) -> str | None:
    """Why ``max_new_tokens`` is more than the model holds (``limit``: max(max_position_embeddings, 4 x
    seq_length), the positions eval and the server allow a reply), or None. generate() ran on past the model's
    window for as long as asked (--max-new-tokens 100000000: hours of text no position covers, or out of memory)."""
    if max_new_tokens is None or not limit or max_new_tokens <= limit:
        return None
    return (f"--max-new-tokens {max_new_tokens} is more than {holder} holds (at most {limit}: "
            f"max(max_position_embeddings, 4 x seq_length) of its config.json)")


def prompt_window(model_dir) -> int:
    """The prompt window (max_window_size, in tokens) of the model that loads from ``model_dir`` (a local dir or a
    hub id), read before it loads: its generation_config.json's value, else 6144, which is what the loaded model's
    generation config holds (transformers takes no max_window_size from config.json). A file the loader refuses is
    its one-line ModelLoadError now (a window read unchecked, such as "6144", was a TypeError in make_context)."""
    from .hub import resolve_model_dir
    from .loading import check_side_files

    model_dir = resolve_model_dir(model_dir)
    check_side_files(model_dir)
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return DEFAULT_WINDOW
    return json.loads(path.read_text(encoding="utf-8")).get("max_window_size") or DEFAULT_WINDOW
