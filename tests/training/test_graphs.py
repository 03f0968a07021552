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

    from finetune.modeling.model import qwen_lm
    from finetune.training.graphs import TrainGraphs

    pos = _causal_row_and_packed_row(T=384)
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        document_ids(pos)  # asking whether a row restarts is such a read: the detector sees it

    original = flex.create_block_mask  # uncompiled on the CPU (see the test above); compiled, no graph breaks
    monkeypatch.setattr(flex, "create_block_mask", lambda *a, _compile=False, **k: original(*a, **k))
    model = tiny_model().train()
    graphs = TrainGraphs(qwen_lm(model))
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


@pytest.mark.parametrize("packing", [False, True])
def test_the_shapes_captured_before_training_are_the_collators(packing):
    """graph_step_shapes names every (rows, tokens) shape the graphed collator makes from batches of these rows (a
    last, smaller batch aside), the most common first, and no other."""
    import random

    from finetune.training.trainer import graph_step_shapes

    args = DataArguments(packing=packing, model_max_length=640)

    class Tok:
        eod_id = 0

    rng = random.Random(0)
    lengths = [rng.choice([5, 100, 128, 129, 300, 300, 301, 640]) for _ in range(40)]
    shapes = graph_step_shapes(lengths, args, batch_size=2)
    collate = make_collator(Tok(), args, for_graphs=True)
    made = set()
    for _ in range(200):  # batches as a random sampler would draw them
        rows = [{"input_ids": [1] * n, "labels": [1] * n, **({"position_ids": list(range(n))} if packing else {})}
                for n in rng.sample(lengths, 2)]
        made.add(tuple(collate(rows)["input_ids"].shape))
    assert made <= set(shapes)
    if packing:
        assert shapes == [(2, 640)]
    else:
        assert shapes[0] == (2, 384)  # 129-301 tokens: the most common bucket
        assert sorted(T for _, T in shapes) == [128, 256, 384, 640]
    assert graph_step_shapes([50], args, batch_size=2) == [(1, 640 if packing else 128)]  # fewer rows than a batch
    assert graph_step_shapes([], args, batch_size=2) == []


def test_cuda_graphs_flag(tmp_path):
    base = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", str(tmp_path)]
    assert parse_args(base)[3].cuda_graphs is None  # unset: train.py decides (one process: on)
    assert parse_args(base + ["--cuda_graphs", "True"])[3].cuda_graphs is True
    assert parse_args(base + ["--cuda_graphs"])[3].cuda_graphs is True  # a bare switch, as the other booleans
    assert parse_args(base + ["--cuda_graphs", "False"])[3].cuda_graphs is False


@pytest.mark.parametrize("flag, world, zero, expect", [
    (None, 1, None, "plain"),  # one GPU: on, gradients straight into .grad
    (None, 1, 2, "hooked"),  # ZeRO-2 on one GPU: on, gradients through autograd to ZeRO's hooks
    (None, 2, 2, "several processes (graphs have not yet run on more than one GPU; --cuda_graphs True turns "
                 "them on)"),
    (True, 2, 2, "hooked"),  # asked for: several processes too
    (True, 2, None, "hooked"),  # DDP
    (True, 1, 3, "ZeRO-3 gathers each layer's weights in module hooks, which a replayed step would skip"),
    (False, 1, None, None),
])
def test_when_train_py_uses_graphs(flag, world, zero, expect, monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    import finetune.training.graphs as graphs_mod
    from finetune.train import _cuda_graphs

    made = []
    monkeypatch.setattr(graphs_mod, "graphs_unavailable", lambda model, several_processes=False: None)
    monkeypatch.setattr(graphs_mod, "enable_train_graphs",
                        lambda model, hooked_grads=False: made.append(hooked_grads) or "graphs")
    args = SimpleNamespace(cuda_graphs=flag, world_size=world, process_index=0)
    plan = SimpleNamespace(device="cuda:0", zero_stage=zero)
    with caplog.at_level(logging.INFO, logger="finetune.train"):
        out = _cuda_graphs(None, SimpleNamespace(packing=True), args, plan)
    if expect in ("plain", "hooked"):
        assert out == "graphs" and made == [expect == "hooked"]
    else:
        assert out is None and made == []
        if expect is not None:
            assert f"CUDA graphs off: {expect}" in caplog.text



@pytest.mark.parametrize("extra, device, expect", [
    # the graphed step's loss is plain: these flags were dropped from every replayed step
    ({"label_smoothing_factor": 0.1}, "cuda:0", "--label_smoothing_factor 0.1: the graphed step computes the plain "
                                                "loss"),
    ({"neftune_noise_alpha": 5.0}, "cuda:0", "--neftune_noise_alpha 5.0: the graphed step computes the plain loss"),
    ({}, "cpu", "this run trains on the CPU (--cuda_graphs applies to CUDA GPUs)"),  # (asked for, dropped unsaid)
])
def test_graphs_stay_off_where_they_would_change_the_run_and_say_so(extra, device, expect, monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    import finetune.training.graphs as graphs_mod
    from finetune.train import _cuda_graphs

    monkeypatch.setattr(graphs_mod, "graphs_unavailable", lambda model, several_processes=False: None)
    monkeypatch.setattr(graphs_mod, "enable_train_graphs", lambda model, hooked_grads=False: "graphs")
    args = SimpleNamespace(cuda_graphs=True if device == "cpu" else None, world_size=1, process_index=0, **extra)
    with caplog.at_level(logging.INFO, logger="finetune.train"):
        assert _cuda_graphs(None, SimpleNamespace(packing=True), args,
                            SimpleNamespace(device=device, zero_stage=None)) is None
    assert f"CUDA graphs off: {expect}" in caplog.text

# -- the dropout seed in checkpoints ----------------------------------------------------------------------------

@pytest.fixture
def cpu_graphs(monkeypatch):
    """train.py's TrainGraphs on the CPU: its steps run eagerly (enabled=False) through the same seeded path,
    which advances the dropout seed once a training forward as on the GPU. Returns the TrainGraphs made."""
    import finetune.train as train_mod
    from finetune.modeling.model import qwen_lm
    from finetune.training.graphs import TrainGraphs

    made = []

    def graphs(model, data_args, args, plan):
        made.append(TrainGraphs(qwen_lm(model)))
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


# -- under DeepSpeed: gradients through autograd, the step inside the engine's forward --------------------------

class _FakeGraph:
    """Stands in for a captured CUDA graph: replay() runs a Python function."""

    def __init__(self, fn):
        self.replay = fn


def _fake_step(params, hooked: bool, grads_of_step, owner=None):
    """A _CapturedStep whose 'graphs' write grads_of_step()'s values into the step's buffers (as the captured
    backward adds into them), for the replay's autograd wiring without a GPU. `owner`: shared by the steps of one
    TrainGraphs (their replays are counted together)."""
    from types import SimpleNamespace

    from finetune.training.graphs import _CapturedStep

    step = _CapturedStep.__new__(_CapturedStep)
    step.params, step.hooked = params, hooked
    step._owner = owner if owner is not None else SimpleNamespace(generation=0)
    step.grads = [torch.zeros_like(p) for p in params]
    step.grad_out = torch.ones(())
    step.total = torch.tensor(1.5)

    def bwd():
        for buf, g in zip(step.grads, grads_of_step()):
            buf.add_(g * step.grad_out)

    step.fwd, step.bwd = _FakeGraph(lambda: None), _FakeGraph(bwd)
    return step


def test_hooked_replay_hands_each_micro_batch_gradient_to_autograd_and_its_hooks():
    from finetune.training.graphs import _Replay

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    values = iter([[torch.tensor([1.0, 2, 3]), torch.ones(2, 2)], [torch.tensor([10.0, 0, 0]), 2 * torch.ones(2, 2)]])
    step = _fake_step(params, hooked=True, grads_of_step=lambda: next(values))
    seen = []
    for p in params:  # how DeepSpeed's ZeRO reduction sees gradients (deepspeed.utils.torch.register_grad_hook)
        p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))

    (_Replay.apply(step, *params) * 0.5).backward()
    assert step.grad_out.item() == 0.5  # the incoming gradient (DeepSpeed's scaling) reaches the graph
    torch.testing.assert_close(params[0].grad, torch.tensor([0.5, 1, 1.5]))
    assert params[0].grad.data_ptr() != step.grads[0].data_ptr()  # .grad is autograd's, not the graph's buffer
    assert len(seen) == 2
    (_Replay.apply(step, *params) * 0.5).backward()  # buffers zeroed before each replay, .grad accumulates
    torch.testing.assert_close(params[0].grad, torch.tensor([5.5, 1, 1.5]))
    torch.testing.assert_close(params[1].grad, torch.full((2, 2), 1.5))
    assert len(seen) == 4


def test_a_forward_of_another_shape_before_the_backward_is_refused():
    """Captured shapes share one memory pool: between a step's forward replay and its backward, no other shape's
    forward may replay (it would overwrite what the backward reads); in order, shapes alternate freely."""
    from types import SimpleNamespace

    from finetune.training.graphs import _Replay

    params = [torch.nn.Parameter(torch.zeros(3))]
    owner = SimpleNamespace(generation=0)
    short, long = (_fake_step(params, hooked=False, grads_of_step=lambda: [torch.ones(3)], owner=owner)
                   for _ in range(2))
    _Replay.apply(short, *params).backward()
    _Replay.apply(long, *params).backward()
    first = _Replay.apply(short, *params)
    _Replay.apply(long, *params).backward()
    with pytest.raises(RuntimeError, match="ran again before the backward"):
        first.backward()
    torch.testing.assert_close(params[0].grad, torch.full((3,), 3.0))  # the refused backward added nothing


def test_unhooked_replay_adds_into_buffers_installed_as_grad():
    from finetune.training.graphs import _Replay

    params = [torch.nn.Parameter(torch.zeros(3))]
    step = _fake_step(params, hooked=False, grads_of_step=lambda: [torch.tensor([1.0, 2, 3])])
    _Replay.apply(step, *params).backward()
    _Replay.apply(step, *params).backward()
    assert params[0].grad is step.grads[0]  # no copy: the graph writes .grad itself
    torch.testing.assert_close(params[0].grad, torch.tensor([2.0, 4, 6]))
    params[0].grad = own = torch.ones(3)  # someone else's .grad tensor: added into after the replay
    _Replay.apply(step, *params).backward()
    assert params[0].grad is own
    torch.testing.assert_close(own, torch.tensor([2.0, 3, 4]))


def test_through_wrapper_runs_the_step_inside_the_wrappers_forward():
    from finetune.training.graphs import through_wrapper

    class Wrapper(torch.nn.Module):  # what DeepSpeed's engine does around its module's forward
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, []

        def forward(self, **inputs):
            self.calls.append(sorted(inputs))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = self.module(**inputs)
            return out * 2  # the engine's hook on the output stands for this

    inner = torch.nn.Linear(2, 2)
    wrapper = Wrapper(inner)
    loss = through_wrapper(wrapper, lambda: torch.tensor(3.0) if torch.is_autocast_enabled("cpu") else None,
                           {"input_ids": 1, "labels": 2})
    assert loss.item() == 6.0 and wrapper.calls == [["input_ids", "labels"]]
    assert "forward" not in inner.__dict__  # the module's own forward is back
    assert inner(torch.ones(1, 2)).shape == (1, 2)
    with pytest.raises(ValueError):
        through_wrapper(wrapper, lambda: (_ for _ in ()).throw(ValueError("x")), {})
    assert "forward" not in inner.__dict__  # restored after a failing step too


_ZERO2_RUN = """
import json, os, sys, torch
import finetune.train as train_mod
import finetune.training.graphs as graphs_mod
from finetune.modeling.model import qwen_lm
from finetune.training.graphs import TrainGraphs

wrapped = []
if sys.argv[1] == "graphed":
    def graphs(model, data_args, args, plan):
        assert plan.zero_stage == 2 and args.world_size == int(os.environ["WORLD_SIZE"])
        g = TrainGraphs(qwen_lm(model), hooked_grads=True)
        g.enabled = False  # no GPU: the step runs eagerly through the same seeded path, inside the engine's forward
        return g

    def applies(self, inputs):  # as on the GPU, less the device
        return (inputs.get("labels") is not None and set(inputs) <= {"input_ids", "labels", "position_ids"}
                and self.lm.training and torch.is_grad_enabled())

    real = graphs_mod.through_wrapper

    def spy(wrapper, step, inputs):
        wrapped.append(type(wrapper).__name__)
        return real(wrapper, step, inputs)

    train_mod._cuda_graphs, TrainGraphs.applies, graphs_mod.through_wrapper = graphs, applies, spy
rc = train_mod.main(json.loads(sys.argv[2]))
with open(os.path.join(sys.argv[3], "wrapped_rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(wrapped, f)  # a file per process: two processes' prints to one pipe can interleave mid-line
sys.exit(rc)
"""


@pytest.mark.parametrize("nproc", [1, 2])
def test_zero2_trains_the_same_with_the_step_inside_deepspeeds_forward(model, data, tmp_path, nproc):
    """DeepSpeed ZeRO-2 over gloo on the CPU, one process and two: the graphed trainer's wiring (the step run inside
    the engine's forward, gradients through autograd to ZeRO's hooks, which reduce them across processes; on the
    CPU the step itself runs eagerly through the same seeded path) trains the adapter DeepSpeed's plain eager path
    trains. A process per run: DeepSpeed keeps its process groups in module state."""
    pytest.importorskip("deepspeed")
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from _helpers import ROOT, free_port, train_args

    argv = ["--use_lora", "True", "--max_steps", "4", "--gradient_accumulation_steps", "2",
            "--per_device_train_batch_size", "2", "--deepspeed", str(ROOT / "ds_configs" / "zero2.json")]
    driver = tmp_path / "driver.py"
    driver.write_text(_ZERO2_RUN)
    wrapped = {}
    for run in ("eager", "graphed"):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONPATH=str(ROOT))
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                  "--master_addr", "127.0.0.1", "--master_port", str(free_port())]  # sets the rank variables
        spies = tmp_path / f"spies_{run}"
        spies.mkdir()
        proc = subprocess.run([*launch, str(driver), run, json.dumps(train_args(model, data, tmp_path / run, *argv)),
                               str(spies)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        wrapped[run] = [json.loads((spies / f"wrapped_rank{r}.json").read_text()) for r in range(nproc)]
    # each process: 4 optimizer steps through the engine, 2 micro-batches each (one process), or 1 (two: the 4
    # chats give each process one micro-batch an epoch, and an epoch's last micro-batch ends the step)
    assert wrapped == {"eager": [[]] * nproc, "graphed": [["DeepSpeedEngine"] * (8 // nproc)] * nproc}
    a = load_file(str(tmp_path / "eager" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "graphed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("lora_B" in k and a[k].abs().max() > 0 for k in a)
    for k in a:  # the loss sums in another order, and Adam magnifies that where a gradient is near zero:
        # the whole of lora_B (zero at the start) is the training's update, which must agree to 0.1%
        if "lora_B" in k:
            assert (b[k] - a[k]).norm() <= 1e-3 * a[k].norm(), k
        else:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)
