"""Qwen's tiktoken tokenizer, as a transformers tokenizer.

Message text is always encoded as plain text: a literal "<|im_end|>" inside user data becomes ordinary
BPE tokens, never the control token, so data cannot forge chat turns. Control tokens enter a sequence only
through the code that builds the ChatML layout, by id (`im_start_id`, `im_end_id`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path

import tiktoken
from transformers import PreTrainedTokenizer

from .errors import ModelLoadError

VOCAB_FILE = "qwen.tiktoken"
# A small BPE vocabulary in the same format, learned by finetune/bpe.py from text the project owns
# (1840 ranks, so its specials are 1840.. and a model over it has vocab_size 2048). Tests and the demo use it.
SMALL_VOCAB = Path(__file__).parent / "assets" / "qwen_small.tiktoken"
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
# Specials follow the BPE ranks in this order: 151643.. for the real vocabulary.
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS

DEFAULT_SYSTEM = "You are a helpful assistant."
# qwen.tiktoken of every Qwen v1 release: 151,643 ranks, so <|endoftext|> is 151643 (DESIGN.md).
QWEN_V1_RANKS = 151643

# Renders exactly the token layout of the official `make_context` (chatml): the system block first (the
# default system prompt when the conversation has none), then "\n" before every turn, and, with
# add_generation_prompt, "\n<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system = '" + DEFAULT_SYSTEM + "' -%}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>' -}}"
    "{%- for m in turns -%}"
    "{{- '\\n<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\n<|im_start|>assistant\\n' -}}{%- endif -%}"
)


class TokenizerError(ModelLoadError):
    """A model dir without a usable vocabulary file, or one that does not fit the model."""


# apply_chat_template(tokenize=True) renders the template to one string and tokenizes it. To give control tokens
# to the template's own "<|im_start|>"/"<|im_end|>" while message text stays text, every message content is
# wrapped in private-use markers before rendering (the markers inside the content escaped), and the rendered
# string is tokenized in "template mode" (per thread, only inside apply_chat_template): text outside the markers
# is the template's and its control tokens count; each marked span is encoded as plain text on its own, which is
# also how make_context encodes each piece.
_SPAN_START, _SPAN_END, _ESC = "\ue000", "\ue001", "\ue002"
_ESCAPES = {_ESC: _ESC + _ESC, _SPAN_START: _ESC + "0", _SPAN_END: _ESC + "1"}
_UNESCAPE = re.compile(re.escape(_ESC) + "(.)", re.S)
_SPECIALS_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def _mark_span(text: str) -> str:
    return _SPAN_START + "".join(_ESCAPES.get(c, c) for c in text) + _SPAN_END


def _unmark_span(text: str) -> str:
    return _UNESCAPE.sub(lambda m: {_ESC: _ESC, "0": _SPAN_START, "1": _SPAN_END}[m.group(1)], text)


def _mark_contents(conversation):
    """A copy of the messages with each string content marked; roles must be plain role names."""
    marked = []
    for m in conversation:
        if not isinstance(m, dict):
            return conversation  # message objects: left to transformers' normalisation, then refused below
        role = m.get("role")
        if isinstance(role, str) and (_SPECIALS_RE.search(role) or any(c in role for c in _ESCAPES)):
            raise ValueError(f"chat message role {role!r} contains a control token; roles are plain names "
                             f"(system, user, assistant)")
        m = dict(m)
        if isinstance(m.get("content"), str):
            m["content"] = _mark_span(m["content"])
        marked.append(m)
    return marked


_template_mode = threading.local()


@lru_cache(maxsize=8)
def _load_ranks(path: str) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    line_of: dict[int, int] = {}  # rank -> the line that gave it
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                token, rank = base64.b64decode(token, validate=True), int(rank)
            except ValueError as e:
                raise TokenizerError(f"{path}: line {lineno} is not '<base64 token> <rank>': {e}") from None
            if token in ranks:  # a later line would silently replace the token's rank
                raise TokenizerError(f"{path}: line {lineno} gives token {token!r} again (rank {ranks[token]} on "
                                     f"line {line_of[ranks[token]]}): a corrupt vocabulary")
            if rank in line_of:
                raise TokenizerError(f"{path}: line {lineno} gives rank {rank} again (first on line "
                                     f"{line_of[rank]}): a corrupt vocabulary")
            ranks[token], line_of[rank] = rank, lineno
    if not ranks:  # (tiktoken would fail on max() of nothing)
        raise TokenizerError(f"{path}: no token ranks: the file is empty (copy it again from the original model dir)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        missing = next(i for i in range(len(ranks) + 1) if i not in line_of)
        raise TokenizerError(f"{path}: ranks are not a contiguous 0..{len(ranks) - 1} range (no line gives rank "
                             f"{missing})")
    return ranks


def build_encoding(vocab_file: str | os.PathLike, name: str = "qwen") -> tiktoken.Encoding:
    """The tiktoken Encoding for a `.tiktoken` file, with Qwen's specials appended after the ranks."""
    ranks = _load_ranks(str(Path(vocab_file).resolve()))
    specials = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


def resolve_vocab_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / VOCAB_FILE
    if not p.is_file():
        where = Path(path)
        if (where / "config.json").is_file():
            # A Qwen1.5/2 dir has no qwen.tiktoken either: say what it is, not to copy a file it never had
            from .model_dir import read_config

            read_config(where)
        raise TokenizerError(
            f"no Qwen vocabulary at {where}: expected the file {VOCAB_FILE} "
            f"{'in that directory' if where.is_dir() else '(the directory does not exist)' if not where.exists() else ''}; "
            "every Qwen model dir ships it (copy it from the original model dir)"
        )
    return p


class QWenTokenizer(PreTrainedTokenizer):
    """Qwen v1 tokenizer on tiktoken (reads `qwen.tiktoken`)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, errors: str = "replace", **kwargs):
        self.vocab_file = str(vocab_file)
        self.errors = errors
        self.encoding = build_encoding(resolve_vocab_file(vocab_file))
        self.mergeable_ranks = self.encoding._mergeable_ranks
        self.special_tokens = dict(self.encoding._special_tokens)
        self.decoder: dict[int, bytes | str] = {v: k for k, v in self.mergeable_ranks.items()}
        self.decoder.update({v: k for k, v in self.special_tokens.items()})
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        kwargs.setdefault("padding_side", "right")
        # Specials live in the tiktoken encoding, not in HF's trie; the ids a saved tokenizer_config.json
        # recorded must still be the ones this vocabulary gives (a truncated qwen.tiktoken shifts them).
        recorded = kwargs.pop("added_tokens_decoder", None) or {}
        for token_id, token in recorded.items():
            _check_special_id(self, str(getattr(token, "content", token)), int(token_id),
                              "tokenizer_config.json saved with it")
        super().__init__(errors=errors, **kwargs)

    # -- the project's own interface ----------------------------------------------------------------
    def encode(self, text, text_pair=None, **kwargs) -> list[int]:  # type: ignore[override]
        """Plain-text encoding: NFC, then BPE; every character is text, control tokens never appear (the official
        tokenizer parses them by default: see the module docstring). ``allowed_special`` / ``disallowed_special``
        passed explicitly act as in the official tokenize() (an opt-in for the caller's own text). Other
        arguments (return_tensors, truncation, max_length, padding) take transformers' encode()."""
        # the direct path only where nothing else is asked: return_tensors="pt", truncation and padding were
        # accepted and ignored here (a list where model.generate needs a tensor); add_special_tokens adds none
        if isinstance(text, str) and text_pair is None and not kwargs.keys() - {"add_special_tokens"}:
            return self.encoding.encode_ordinary(unicodedata.normalize("NFC", text))
        return super().encode(text, text_pair=text_pair, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = False, errors: str | None = None,
               **kwargs) -> str | list[str]:  # type: ignore[override]
        """Never raises on partial UTF-8: broken byte sequences become U+FFFD (``errors``, as the official
        tokenizer's: "replace" by default, "ignore" leaves them out). A batch of sequences gives a list of texts."""
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if token_ids and isinstance(token_ids[0], (list, tuple)):
            # a batch: one text per sequence, as transformers 5's decode, which its batch_decode calls
            return [self.decode(seq, skip_special_tokens=skip_special_tokens, errors=errors) for seq in token_ids]
        # Ids past the vocabulary (a model's padding rows) and, if asked, specials decode to nothing.
        limit = self.eod_id if skip_special_tokens else self.encoding.n_vocab
        token_ids = [i for i in token_ids if 0 <= i < limit]
        return self.encoding.decode(list(token_ids), errors=errors or self.errors)

    @property
    def tokenizer(self) -> tiktoken.Encoding:
        """The tiktoken Encoding under the official tokenizer's attribute name (the official eval scripts call
        ``tokenizer.tokenizer.encode`` / ``.decode``): tiktoken's own encode, which refuses special-token text."""
        return self.encoding

    # -- what PreTrainedTokenizer needs ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> dict[bytes, int]:
        """The BPE ranks (bytes -> id), without the special tokens, as the official get_vocab()."""
        return dict(self.mergeable_ranks)

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        # As the official tokenizer: the vocabulary is fixed; Qwen's own specials are already there.
        if not special_tokens and new_tokens:
            raise ValueError("Adding regular tokens is not supported (the Qwen vocabulary is fixed)")
        for token in new_tokens:
            surface = getattr(token, "content", token)
            if surface not in self.special_tokens:
                raise ValueError(f"Adding unknown special tokens is not supported: {surface!r} is not one of Qwen's "
                                 f"specials (<|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0|>..<|extra_204|>)")
        # Qwen's own specials (eos/pad: <|endoftext|>) are recorded with their ids, as transformers records added
        # tokens, so a saved tokenizer_config.json says which id each had: a vocabulary truncated since then is
        # caught on load (_check_special_id). No id is added (0, as officially): they are all in the vocabulary.
        super()._add_tokens(new_tokens, special_tokens=True)
        return 0

    def tokenize(self, text: str, allowed_special=None, disallowed_special=None,  # type: ignore[override]
                 **kwargs) -> list[bytes | str]:
        # Every character is text (no added-token splitting): see the module docstring. The exceptions: a chat
        # template's own output, inside apply_chat_template on this thread; and a caller that passes
        # allowed_special / disallowed_special itself, which act as in the official tokenize() ("all" or a set of
        # specials to parse; specials to refuse with a ValueError).
        if getattr(_template_mode, "on", False):
            return self._template_tokens(text)
        if allowed_special is None and disallowed_special is None:
            return self._plain_tokens(text)
        ids = self.encoding.encode(unicodedata.normalize("NFC", text),
                                   allowed_special=set() if allowed_special is None else allowed_special,
                                   disallowed_special=() if disallowed_special is None else disallowed_special)
        return [self.decoder[i] for i in ids]

    def _plain_tokens(self, text: str) -> list[bytes]:
        return [self.decoder[i] for i in self.encoding.encode_ordinary(unicodedata.normalize("NFC", text))]

    def _template_tokens(self, text: str) -> list[bytes | str]:
        """Tokens of a rendered chat template whose message contents were marked (see _mark_span)."""
        tokens: list[bytes | str] = []
        pos = 0
        while pos <= len(text):
            start = text.find(_SPAN_START, pos)
            literal = text[pos:] if start < 0 else text[pos:start]
            if _SPAN_END in literal or _ESC in literal:
                raise ValueError("the chat template cut a message's text apart (it must insert message contents "
                                 "whole); cannot tokenize its output safely")
            for i, piece in enumerate(_SPECIALS_RE.split(literal)):
                if i % 2:
                    tokens.append(piece)  # the template's own control token
                elif piece:
                    tokens += self._plain_tokens(piece)
            if start < 0:
                break
            end = text.find(_SPAN_END, start + 1)
            if end < 0:
                raise ValueError("the chat template cut a message's text apart (it must insert message contents "
                                 "whole); cannot tokenize its output safely")
            tokens += self._plain_tokens(_unmark_span(text[start + 1:end]))
            pos = end + 1
        return tokens

    def apply_chat_template(self, conversation, *args, tokenize: bool = True, **kwargs):
        """transformers' apply_chat_template; with tokenize=True the template's control tokens are control
        tokens and message text is plain text, so the ids equal make_context's for the same chat."""
        if not tokenize:
            return super().apply_chat_template(conversation, *args, tokenize=False, **kwargs)
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError("return_assistant_tokens_mask is not supported by the Qwen tokenizer (it needs a fast "
                             "tokenizer's offsets); use finetune.data.encode_conversation for training labels")
        kwargs.pop("sanitize_control_tokens", None)  # always the case here
        if conversation and isinstance(conversation[0], (list, tuple)):
            marked = [_mark_contents(c) for c in conversation]
        else:
            marked = _mark_contents(conversation)
        _template_mode.on = True
        try:
            return super().apply_chat_template(marked, *args, tokenize=True, **kwargs)
        finally:
            _template_mode.on = False

    def _tokenize(self, text: str, **kwargs) -> list[bytes]:
        return self.tokenize(text)

    def convert_tokens_to_ids(self, tokens):  # type: ignore[override]
        """As the official: a special token's name (str) or a BPE token (bytes) -> its id; anything else (a str
        that is not a special's name, unknown bytes) -> None."""
        if isinstance(tokens, (bytes, str)):
            return self._token_id_or_none(tokens)
        return [self._token_id_or_none(t) for t in tokens]

    def _token_id_or_none(self, token) -> int | None:
        if isinstance(token, str):
            return self.special_tokens.get(token)
        return self.mergeable_ranks.get(token) if isinstance(token, bytes) else None

    def _convert_token_to_id(self, token: bytes | str) -> int:
        token_id = self._token_id_or_none(token)
        if token_id is None:
            raise ValueError(f"unknown token {token!r} (BPE tokens are bytes; str only names a special token)")
        return token_id

    def _convert_id_to_token(self, index: int) -> bytes | str:
        if index in self.decoder:
            return self.decoder[index]
        raise ValueError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")

    def convert_tokens_to_string(self, tokens) -> str:
        out, buf = [], b""
        for t in tokens:
            if isinstance(t, str):
                if buf:
                    out.append(buf.decode("utf-8", errors=self.errors))
                    buf = b""
                out.append(t)
            else:
                buf += t
        if buf:
            out.append(buf.decode("utf-8", errors=self.errors))
        return "".join(out)

    def _decode(self, token_ids, skip_special_tokens: bool = False, errors: str | None = None, **kwargs) -> str:
        return self.decode(token_ids, skip_special_tokens=skip_special_tokens, errors=errors)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        # Qwen adds no BOS/EOS around encoded text.
        return list(token_ids_0) + (list(token_ids_1) if token_ids_1 else [])

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 0

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        # Always qwen.tiktoken, the name the tokenizer loads from (the official one ignores the prefix too).
        dst = os.path.join(save_directory, VOCAB_FILE)
        if os.path.abspath(dst) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, dst)
        return (dst,)

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        # The official remote code expects the auto_map-free tokenizer class name; record ours so
        # AutoTokenizer finds it after `import finetune`, and keep the tokenizer config readable.
        cfg_path = Path(save_directory) / "tokenizer_config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            cfg["tokenizer_class"] = "QWenTokenizer"
            cfg.pop("auto_map", None)
            # transformers 5 writes the template to chat_template.jinja; older tools (vLLM, TRL, lm-eval
            # on transformers 4) read it from here.
            cfg.setdefault("chat_template", self.chat_template)
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        return files


def _check_special_id(tok: QWenTokenizer, token: str, expected: int, source: str) -> None:
    got = tok.special_tokens.get(token)
    if got is not None and got != expected:
        raise TokenizerError(
            f"{tok.vocab_file}: {token} gets id {got} from this vocabulary ({len(tok.mergeable_ranks)} ranks), but "
            f"the model expects {expected} ({source}): the file is truncated or not this model's vocabulary (copy "
            f"{VOCAB_FILE} from the original model dir)")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # unreadable side files are the model loader's to report
    return data if isinstance(data, dict) else {}


def check_tokenizer_fits(tok: QWenTokenizer, model_dir: str | os.PathLike) -> None:
    """Raise TokenizerError (naming the vocabulary file) unless the tokenizer's ids fit the model in model_dir:
    every id below config.json's vocab_size, and <|endoftext|> (and any special the dir's tokenizer_config.json
    records) at the id the model was trained with. Reads only small JSON files: run it before loading weights."""
    model_dir = Path(model_dir)
    cfg = _read_json(model_dir / "config.json")
    vocab_size = cfg.get("vocab_size")
    if isinstance(vocab_size, int) and len(tok) > vocab_size:
        raise TokenizerError(
            f"{tok.vocab_file}: {len(tok.mergeable_ranks)} ranks + {len(SPECIAL_TOKENS)} special tokens = {len(tok)} "
            f"ids, more than the model's vocab_size {vocab_size} ({model_dir / 'config.json'}): this vocabulary is "
            f"not the model's (copy {VOCAB_FILE} from the original model dir)")
    checked = False
    gen = _read_json(model_dir / "generation_config.json")
    for key in ("eos_token_id", "pad_token_id"):
        if isinstance(gen.get(key), int):
            _check_special_id(tok, ENDOFTEXT, gen[key], f"{key} in {model_dir / 'generation_config.json'}")
            checked = True
    recorded = _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder") or {}
    for token_id, token in recorded.items():
        if isinstance(token, dict) and str(token_id).isdigit():
            _check_special_id(tok, str(token.get("content")), int(token_id),
                              f"added_tokens_decoder in {model_dir / 'tokenizer_config.json'}")
            checked = checked or token.get("content") == ENDOFTEXT
    if not checked and isinstance(vocab_size, int) and vocab_size >= QWEN_V1_RANKS + len(SPECIAL_TOKENS):
        # A full-size Qwen v1 model with nothing else recorded: its vocabulary is the release's.
        _check_special_id(tok, ENDOFTEXT, QWEN_V1_RANKS,
                          f"every Qwen v1 model of vocab_size {vocab_size} uses the {QWEN_V1_RANKS}-rank vocabulary")


def load_tokenizer(model_dir: str | os.PathLike, check_against: str | os.PathLike | None = None,
                   adapter: str | os.PathLike | None = None) -> QWenTokenizer:
    """The tokenizer of a model dir (or of an adapter dir that carries the vocabulary), checked against the model
    (``check_against``, default the dir itself when it is a model dir) before any weights are loaded. ``adapter``:
    where the model dir has no qwen.tiktoken, the adapter's copy (the trainer saves one) is read instead, checked
    against the model (chat, eval and merge: one that is not the model's vocabulary scored other ids silently)."""
    for name, value in (("model_dir", model_dir), ("check_against", check_against), ("adapter", adapter)):
        # ("" read the current directory, None failed inside os.fspath), as load_model refuses them
        if (value is not None or name == "model_dir") and not (
                isinstance(value, (str, os.PathLike)) and str(value).strip()):
            raise ModelLoadError(f"load_tokenizer: {name} must be a path (or a hub id), got {value!r}")
    if adapter is not None and not (Path(model_dir) / "qwen.tiktoken").is_file():
        return load_tokenizer(adapter, check_against=model_dir)
    from .hub import resolve_model_dir

    path = resolve_model_dir(model_dir)
    tok = QWenTokenizer(str(resolve_vocab_file(path)))
    model = Path(check_against) if check_against is not None else path
    if (model / "config.json").is_file():
        check_tokenizer_fits(tok, model)
    return tok
