# --- modeling / chat / loading fixtures (the model engineer's) --------------------------------------------------
import pytest as _pytest

# The real Qwen vocabulary, one definition for every test: $QWEN_TIKTOKEN, else ../shared/qwen/qwen.tiktoken;
# a test that needs it skips with the reason where it is absent, and fails under CI=true (CI has it).
from _helpers import REAL_VOCAB, require_real_vocab  # noqa: F401


@_pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen v1 dir in the official layout (finetune.demo.make_demo_model, seed 0). Read-only."""
    from finetune.demo import make_demo_model

    return make_demo_model(tmp_path_factory.mktemp("tiny_qwen"), seed=0)


@_pytest.fixture(scope="session")
def real_vocab_file():
    return require_real_vocab()


# --- data fixtures (the data engineer's) ---------------------------------------------------------------------


@_pytest.fixture(scope="session")
def data_real_tokenizer():
    """QWenTokenizer on the real vocabulary (see require_real_vocab)."""
    vocab = require_real_vocab()
    from finetune.tokenization import QWenTokenizer

    return QWenTokenizer(str(vocab))


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
