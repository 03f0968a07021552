# --- modeling / chat / loading fixtures (the model engineer's) --------------------------------------------------
from pathlib import Path as _Path

import pytest as _pytest

REAL_VOCAB = _Path(__file__).resolve().parents[2] / "shared" / "qwen" / "qwen.tiktoken"


@_pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen v1 dir in the official layout (finetune.demo.make_demo_model, seed 0). Read-only."""
    from finetune.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("tiny_qwen"), seed=0)


@_pytest.fixture(scope="session")
def real_vocab_file():
    if not REAL_VOCAB.is_file():
        _pytest.skip(f"the real Qwen vocabulary is not at {REAL_VOCAB}")
    return REAL_VOCAB


# --- data fixtures (the data engineer's) ---------------------------------------------------------------------
import os as _os

_DATA_REAL_VOCAB = _Path(__file__).resolve().parents[2] / "shared" / "qwen" / "qwen.tiktoken"


@_pytest.fixture(scope="session")
def data_real_tokenizer():
    """QWenTokenizer on the real vocabulary; skipped when it is absent, a failure when CI=true (CI has it)."""
    if not _DATA_REAL_VOCAB.is_file():
        msg = f"the real Qwen vocabulary is not at {_DATA_REAL_VOCAB}"
        if _os.environ.get("CI") == "true":
            _pytest.fail(msg + " (CI=true: CI always has it)")
        _pytest.skip(msg)
    from finetune.tokenization import QWenTokenizer

    return QWenTokenizer(str(_DATA_REAL_VOCAB))


@_pytest.fixture(scope="session")
def data_small_tokenizer():
    """QWenTokenizer on the small vocabulary that ships with the project (fast)."""
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    return QWenTokenizer(str(SMALL_VOCAB))


@_pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest, and much faster on a shared, busy 2-core CPU (restored
    after each module)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- switches (finetune.settings) --------------------------------------------------------------------------------
@_pytest.fixture
def switches():
    """`switches(gptq_gemv=False, ...)` changes finetune.settings for the rest of the test (restored after)."""
    import contextlib

    from finetune.settings import override

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(override(**changes))
