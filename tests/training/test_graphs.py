"""CUDA-graphed training (finetune/training/graphs.py), the parts that run without a GPU: when graphs are
refused and why, the static-shape loss and the prebuilt attention they use, and the trainer's wiring. The
graphs themselves are tested on the GPU (test_graphs_cuda.py)."""

import pytest
import torch

from finetune.data import PackedCollator
from finetune.modeling.attention import build_attention, document_ids
from finetune.modeling.loss import causal_lm_nll_sum
from finetune.settings import ENV, override
from finetune.training.graphs import enable_train_graphs, graphs_unavailable

GRAPHS_ENV = ENV["cuda_graphs"]
from finetune.training.arguments import DataArguments, parse_args
from finetune.training.trainer import make_collator

from _helpers import tiny_model


def test_refused_without_a_gpu_with_the_reason(monkeypatch):
    model = tiny_model()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert graphs_unavailable(model) == "no CUDA device"
    with pytest.raises(RuntimeError, match="CUDA graphs cannot be used: no CUDA device"):
        enable_train_graphs(model)
    with override(cuda_graphs=False):
        assert graphs_unavailable(model) == f"{GRAPHS_ENV}=0"
        assert graphs_unavailable(torch.nn.Linear(2, 2)) in ("no CUDA device", f"{GRAPHS_ENV}=0")


@pytest.mark.parametrize("chunk", [3, 1024])
def test_static_shape_loss_equals_the_selected_one(chunk):
    """select=False runs every position through lm_head and lets cross-entropy ignore the untrained ones: the
    same sum and count (and gradients) as selecting the trained positions first."""
    model = tiny_model()
    hidden = torch.randn(2, 9, model.config.hidden_size, requires_grad=True)
    labels = torch.randint(0, model.config.vocab_size, (2, 9))
    labels[0, :4] = -100
    labels[1, 7:] = -100
    a_sum, a_n = causal_lm_nll_sum(model.lm_head, hidden, labels, chunk_tokens=chunk, select=True)
    (ga,) = torch.autograd.grad(a_sum, hidden)
    b_sum, b_n = causal_lm_nll_sum(model.lm_head, hidden, labels, chunk_tokens=chunk, select=False)
    (gb,) = torch.autograd.grad(b_sum, hidden)
    assert int(a_n) == int(b_n) == 16 - 3 - 2  # shifted: row 0 loses 3 positions, row 1 two
    torch.testing.assert_close(a_sum, b_sum)
    torch.testing.assert_close(ga, gb)


def test_prebuilt_attention_spec_gives_the_same_model_output():
    model = tiny_model().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7], list(range(12))])
    with torch.no_grad():
        for position_ids in (None, pos):
            ref = model.transformer(input_ids=ids, position_ids=position_ids).last_hidden_state
            docs = document_ids(pos) if position_ids is not None else None
            spec = build_attention(None, docs, 12, 0, ids.device, use_flex=False)
            got = model.transformer(input_ids=ids, position_ids=position_ids, attention_spec=spec).last_hidden_state
            torch.testing.assert_close(got, ref)


def _causal_row_and_packed_row(T=12):
    return torch.stack([torch.arange(T), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7] * (T // 12))])


def test_a_row_without_a_restart_is_one_document_with_the_causal_mask(monkeypatch):
    """The graphed step asks for document ids without asking whether a row restarts (none_without_restart=False):
    a row without a restart gets sequence 0 throughout, and its mask (dense on the CPU, FlexAttention's block
    mask on the GPU) is the causal one that None gave before; a packed row gets the ids it always got."""
    import warnings

    import torch.nn.attention.flex_attention as flex
    import torch.nn.functional as F

    pos = _causal_row_and_packed_row()
    ids = document_ids(pos, none_without_restart=False)
    assert ids.tolist() == [[0] * 12, [0] * 4 + [1] * 8]
    assert document_ids(pos[:1]) is None  # the model's forward still asks (then: the plain causal kernel)
    assert document_ids(pos[1:]).tolist() == ids[1:].tolist()

    model = tiny_model().train()
    tokens = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model.transformer(input_ids=tokens, position_ids=pos[:1]).last_hidden_state  # doc ids None: causal
        spec = build_attention(None, ids[:1], 12, 0, tokens.device, use_flex=False)
        assert torch.equal(spec.mask[0, 0], torch.ones(12, 12, dtype=torch.bool).tril())
        got = model.transformer(input_ids=tokens, position_ids=pos[:1], attention_spec=spec).last_hidden_state
    torch.testing.assert_close(got, ref)

    # the GPU's block mask, built here by the uncompiled create_block_mask (the same function; compiling it on
    # the CPU takes tens of seconds): the same blocks as a causal mask_mod's, the same attention output
    original = flex.create_block_mask
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, _compile=False, **k: original(*a, **k))
    T = 384  # three of FlexAttention's 128-token blocks
    one_doc = torch.zeros(1, T, dtype=torch.long)
    block_mask = build_attention(None, one_doc, T, 0, "cpu", use_flex=True).block_mask
    causal = original(lambda b, h, q, kv: q >= kv, 1, None, T, T, device="cpu")
    assert torch.equal(block_mask.to_dense(), causal.to_dense())
    q, k, v = torch.randn(3, 1, 2, T, 16).unbind(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncompiled flex_attention warns that it materialises the scores
        out = flex.flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


class _NoHostReads(torch.overrides.TorchFunctionMode):
    """Fails on what would make the host wait for a CUDA device if the tensor lived there: bool(), .item(),
    .tolist(), int()/float(), nonzero (a data-dependent shape), copies to the host."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
             torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
             torch.Tensor.cpu, torch.Tensor.numpy}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read of a tensor: {getattr(func, '__name__', func)}")
        return func(*args, **(kwargs or {}))


def test_the_graphed_steps_host_path_reads_nothing_back(monkeypatch):
    """What the host does for each graphed micro-batch outside the graph (document ids, the attention mask,
    block mask included) and the step's eager body read no tensor value back: on the GPU each such read would
    stall the host until the queued micro-batches finish (the replay itself is tested on the GPU:
    test_graphs_cuda.py::test_replayed_steps_never_sync)."""
    import torch.nn.attention.flex_attention as flex

    from finetune.training.graphs import TrainGraphs, _find_lm

    pos = _causal_row_and_packed_row(T=384)
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        document_ids(pos)  # asking whether a row restarts is such a read: the detector sees it

    original = flex.create_block_mask  # uncompiled on the CPU (see the test above); compiled, no graph breaks
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, _compile=False, **k: original(*a, **k))
    model = tiny_model().train()
    graphs = TrainGraphs(_find_lm(model))
    graphs.enabled = False  # the eager step through the same code (the CPU cannot capture)
    tokens = torch.randint(0, model.config.vocab_size, pos.shape)
    with _NoHostReads():
        for use_flex in (True, False):
            docs = document_ids(pos, none_without_restart=False)
            graphs.lm.transformer.use_flex_attention = lambda: use_flex
            graphs.attention(docs, *pos.shape, "cpu")
        graphs.lm.transformer.use_flex_attention = lambda: False  # flex_attention's CPU kernel is compiled
        for position_ids in (pos, pos[:1], None):
            rows = tokens[: len(position_ids) if position_ids is not None else 1]
            loss = graphs.loss(rows, position_ids, rows.clone(), None)
            loss.backward()
    assert graphs.eager_steps == 3


def test_graphs_collator_pads_packed_rows_to_the_row_length():
    args = DataArguments(packing=True, model_max_length=32)

    class Tok:
        eod_id = 7

    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2]}]
    fixed = make_collator(Tok(), args, for_graphs=True)(rows)
    free = make_collator(Tok(), args)(rows)
    assert isinstance(make_collator(Tok(), args), PackedCollator)
    assert fixed["input_ids"].shape == (1, 32) and free["input_ids"].shape == (1, 3)
    assert fixed["position_ids"][0, 3:].tolist() == list(range(29))  # padding: its own sequence
    assert (fixed["labels"][0, 3:] == -100).all()


def test_graphs_collator_buckets_unpacked_rows_and_trains_on_the_same_loss():
    # --packing False under CUDA graphs: rows padded to a multiple of 128 (a few shapes), the padding a
    # sequence of its own instead of an attention_mask; the loss is the padded batch's loss
    from finetune.data import ChatCollator
    from finetune.training.trainer import GRAPH_PAD_MULTIPLE

    args = DataArguments(packing=False, model_max_length=512)

    class Tok:
        eod_id = 0

    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (130, 7, 61):
        ids = torch.randint(1, 1024, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    batch = make_collator(Tok(), args, for_graphs=True)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (3, 2 * GRAPH_PAD_MULTIPLE)
    assert batch["position_ids"][1, :10].tolist() == list(range(7)) + [0, 1, 2]  # padding restarts
    assert isinstance(make_collator(Tok(), args), ChatCollator)  # eager: padded to the longest row, a mask
    plain = make_collator(Tok(), args)(rows)
    model = tiny_model(seed=0).train()
    with torch.no_grad():
        a = model(**batch).loss
        b = model(**plain).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cuda_graphs_flag(tmp_path):
    base = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path)]
    assert parse_args(base)[3].cuda_graphs is True
    assert parse_args(base + ["--cuda_graphs", "False"])[3].cuda_graphs is False


# -- the dropout seed in checkpoints ----------------------------------------------------------------------------

@pytest.fixture
def cpu_graphs(monkeypatch):
    """train.py's TrainGraphs on the CPU: its steps run eagerly (enabled=False) through the same seeded path,
    which advances the dropout seed once a training forward as on the GPU. Returns the TrainGraphs made."""
    import finetune.train as train_mod
    from finetune.training.graphs import TrainGraphs, _find_lm

    made = []

    def graphs(model, data_args, args, plan):
        made.append(TrainGraphs(_find_lm(model)))
        made[-1].enabled = False
        return made[-1]

    def applies(self, inputs):  # as on the GPU, less the device
        return (inputs.get("labels") is not None and set(inputs) <= {"input_ids", "labels", "position_ids"}
                and self.lm.training and torch.is_grad_enabled())

    monkeypatch.setattr(train_mod, "_cuda_graphs", graphs)
    monkeypatch.setattr(TrainGraphs, "applies", applies)
    return made


def test_dropout_seed_is_saved_with_each_checkpoint_and_restored_on_resume(model, data, tmp_path, cpu_graphs,
                                                                          monkeypatch):
    import json

    from finetune.train import main
    from finetune.training.graphs import seed_file_name
    from finetune.training.trainer import QwenTrainer

    from _helpers import train_args
    argv = ["--use_lora", "True", "--packing", "True", "--max_steps", "6", "--per_device_train_batch_size", "1",
            "--save_strategy", "steps", "--save_steps", "2"]
    full = tmp_path / "full"
    assert main(train_args(model, data, full, *argv)) == 0
    end = int(cpu_graphs[-1].seed)  # advanced once a step (one forward a step)

    def saved(out, step):
        return json.loads((out / f"checkpoint-{step}" / seed_file_name()).read_text())["seed"]

    assert [saved(full, s) for s in (2, 4, 6)] == [end - 4, end - 2, end]

    interrupted = tmp_path / "interrupted"
    step = QwenTrainer.training_step

    def interrupt_at_step_3(self, *a, **k):
        if self.state.global_step == 2:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(QwenTrainer, "training_step", interrupt_at_step_3)
        assert main(train_args(model, data, interrupted, *argv)) == 130
    assert saved(interrupted, 2) == end - 4
    assert main(train_args(model, data, interrupted, *argv, "--resume", "True")) == 0
    assert int(cpu_graphs[-1].seed) == end  # restored at step 2, then four steps: as the uninterrupted run
    assert [saved(interrupted, s) for s in (4, 6)] == [end - 2, end]


def test_a_checkpoint_without_a_seed_is_said(tmp_path, monkeypatch):
    from finetune.training.graphs import TrainGraphs

    graphs = TrainGraphs.__new__(TrainGraphs)
    graphs.seed = torch.tensor([5], dtype=torch.int64)
    assert graphs.load_seed(str(tmp_path)) is False and int(graphs.seed) == 5
    graphs.save_seed(str(tmp_path), process_index=1, world_size=2)
    assert (tmp_path / "dropout_seed_1.json").is_file()
    graphs.seed.fill_(9)
    assert graphs.load_seed(str(tmp_path), process_index=1, world_size=2) and int(graphs.seed) == 5
