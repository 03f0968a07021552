"""How long a reply a model allows: the most new tokens, max(max_position_embeddings, 4 x seq_length) of its
config.json (the length the inference engine gives a row, which the server allows a reply), and the one-line
refusal of a --max-new-tokens past it. Chat and eval check their flag against it before the weights load."""

from __future__ import annotations

from pathlib import Path


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
