"""GPU tests for CUDA-graphed training steps (``finetune/training/graphs.py``): a replayed step computes what
the same step computes eagerly (same seeded dropout masks), for causal and packed rows, with and without
checkpointing, through an optimizer and gradient accumulation. Run on the GPU machine:
pytest -m cuda tests/training/test_graphs_cuda.py"""

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from finetune.modeling import QWenConfig  # noqa: E402
from finetune.training.graphs import enable_train_graphs  # noqa: E402
from _helpers import lora_on_random_gptq  # noqa: E402

def _model(dtype=torch.float32, layers=2, dropout=0.1, ckpt=True, seed=0, keep_last=False):
    cfg = QWenConfig(vocab_size=1024, hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                     kv_channels=64, intermediate_size=1024, seq_length=512,
                     quantization_config={"bits": 4, "group_size": 128, "quant_method": "gptq", "desc_act": False})
    model = lora_on_random_gptq(cfg, "cuda", dtype, dropout=dropout, seed=seed)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # the last block keeps its MLP projections (--gradient_checkpointing_keep_gib)
    model.get_base_model().transformer.h[-1].keep_mlp_projections = keep_last
    return model


def _batches(n, B=1, T=96, packed=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 1024, (B, T), generator=g)
        labels = ids.clone()
        labels[:, :5] = -100  # some untrained positions
        batch = {"input_ids": ids, "labels": labels}
        if packed:  # two or three sequences a row, boundaries differing every step
            pos = torch.empty(B, T, dtype=torch.long)
            for b in range(B):
                cut = sorted(torch.randint(8, T - 8, (2,), generator=g).tolist())
                if i % 2:
                    cut = cut[:1]
                start = 0
                for c in cut + [T]:
                    pos[b, start:c] = torch.arange(c - start)
                    start = c
            batch["position_ids"] = pos
        out.append({k: v.cuda() for k, v in batch.items()})
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-20))


def _run(model, batches, graphs_on, monkeypatch, autocast=None, steps_per_update=1, lr=1e-2, prepare=None):
    """Train on `batches` (AdamW); returns per-step losses, the gradients before each update and the final
    LoRA weights. Graphs are enabled in both modes (same seeded dropout); off means every step runs eagerly.
    `prepare`: (rows, tokens) shapes captured before the first step."""
    torch.manual_seed(123)  # the dropout seed
    graphs = enable_train_graphs(model, warmup=1)
    graphs.enabled = graphs_on
    if prepare:
        assert graphs.prepare(prepare, pad_id=0) == sorted(prepare, key=lambda s: -s[1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, grads = [], []
    for i, batch in enumerate(batches):
        ctx = torch.autocast("cuda", dtype=autocast) if autocast is not None else torch.autocast("cuda", enabled=False)
        with ctx:
            loss = graphs(model, batch)
        (loss / steps_per_update).backward()
        losses.append(float(loss))
        if (i + 1) % steps_per_update == 0:
            grads.append(_grads(model))
            opt.step()
            opt.zero_grad(set_to_none=True)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, grads, weights, graphs


@pytest.mark.parametrize("ckpt", [True, False, "keep"])
@pytest.mark.parametrize("packed", [False, True])
def test_graphed_steps_equal_eager_steps(ckpt, packed, monkeypatch):
    batches = _batches(5, B=2, packed=packed)
    eager = _run(_model(ckpt=bool(ckpt), keep_last=ckpt == "keep"), batches, False, monkeypatch)
    graphed = _run(_model(ckpt=bool(ckpt), keep_last=ckpt == "keep"), batches, True, monkeypatch)
    assert eager[3].captures == 0 and eager[3].eager_steps == 5
    assert graphed[3].captures == 1 and graphed[3].replays == 4 and graphed[3].eager_steps == 1
    for a, b in zip(graphed[0], eager[0]):
        assert abs(a - b) <= 1e-5 * abs(b)
    for ga, gb in zip(graphed[1], eager[1]):
        assert ga.keys() == gb.keys() and len(ga) == 2 * 5 * 2  # A and B of 5 Linears in 2 blocks
        for n in gb:
            assert _rel(ga[n], gb[n]) < 1e-4, n
    for n in eager[2]:
        assert _rel(graphed[2][n], eager[2][n]) < 1e-4, n


def test_graphed_steps_with_autocast_and_gradient_accumulation(monkeypatch):
    batches = _batches(8, B=1, T=128)
    eager = _run(_model(dtype=torch.bfloat16), batches, False, monkeypatch, autocast=torch.bfloat16,
                 steps_per_update=2)
    graphed = _run(_model(dtype=torch.bfloat16), batches, True, monkeypatch, autocast=torch.bfloat16,
                   steps_per_update=2)
    assert graphed[3].replays == 7
    for a, b in zip(graphed[0], eager[0]):
        assert abs(a - b) <= 1e-3 * abs(b)
    for ga, gb in zip(graphed[1], eager[1]):
        for n in gb:
            assert _rel(ga[n], gb[n]) < 1e-2, n


def test_without_dropout_the_graphed_loss_and_grads_equal_the_plain_model(monkeypatch):
    """Dropout 0: nothing is swapped, and the graphed step equals the model's own eager forward (selected
    positions through lm_head, no graphs code involved)."""
    batches = _batches(3)
    plain = _model(dropout=0.0)
    ref_losses, ref_grads = [], []
    for batch in batches:
        loss = plain(**batch).loss
        loss.backward()
        ref_losses.append(float(loss))
        ref_grads.append(_grads(plain))
        plain.zero_grad(set_to_none=True)
    model = _model(dropout=0.0)
    graphs = enable_train_graphs(model, warmup=1)
    assert not graphs._swapped
    for batch, ref_loss, ref in zip(batches, ref_losses, ref_grads):
        loss = graphs(model, batch)
        loss.backward()
        assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss)
        got = _grads(model)
        for n in ref:
            assert _rel(got[n], ref[n]) < 1e-4, n
        model.zero_grad(set_to_none=True)
    assert graphs.replays == 2


def test_seeded_dropout_masks_differ_between_steps_and_sites(monkeypatch):
    model = _model()
    graphs = enable_train_graphs(model, warmup=1)
    assert len(graphs._swapped) == 2 * 5
    batch = _batches(1)[0]
    losses = []
    for _ in range(4):  # the same batch: only the dropout masks change the loss
        loss = graphs(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert len(set(losses)) == 4
    model.eval()
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"]).logits
        b = model(input_ids=batch["input_ids"]).logits
    assert torch.equal(a, b)  # eval: no dropout
    graphs.close()
    assert all(type(d) is torch.nn.Dropout for m in model.modules() if hasattr(m, "lora_dropout")
               for d in m.lora_dropout.values())


def test_replayed_steps_never_sync():
    """Between micro-batches the host never waits for the GPU: replayed steps' forwards and backwards (document
    ids, the block mask, the input copies, both replays) run under torch's sync debug mode set to error, for
    packed rows and for a row without a restart, which gets one document's ids without asking (the causal
    mask: the model's own causal forward gives the same loss)."""
    model, plain = _model(dropout=0.0), _model(dropout=0.0)
    graphs = enable_train_graphs(model, warmup=1)
    batches = _batches(5, T=128, packed=True)
    batches[4]["position_ids"] = torch.arange(128, device="cuda")[None]
    losses = []
    for i, batch in enumerate(batches):
        torch.cuda.synchronize()
        if i >= 2:  # the first runs eagerly, the second captures (a capture synchronizes)
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss = graphs(model, batch)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        losses.append(float(loss))
        model.zero_grad(set_to_none=True)
    assert graphs.captures == 1 and graphs.replays == 4 and graphs.eager_steps == 1
    with torch.no_grad():
        ref = float(plain(**batches[4]).loss)  # no restart: document ids None, the plain causal kernel
    assert abs(losses[4] - ref) <= 1e-4 * abs(ref)


def test_other_shapes_run_eagerly_after_capture(monkeypatch):
    model = _model()
    graphs = enable_train_graphs(model, warmup=1)
    for batch in _batches(3, T=64) + _batches(1, T=40):
        graphs(model, batch).backward()
    assert graphs.captures == 1 and graphs.replays == 2 and graphs.eager_steps == 2
    graphs(model, _batches(1, T=64)[0]).backward()  # back to the captured shape: replayed
    assert graphs.replays == 3


def test_forward_twice_before_backward_is_refused(monkeypatch):
    model = _model()
    graphs = enable_train_graphs(model, warmup=1)
    batch = _batches(1)[0]
    graphs(model, batch).backward()
    graphs(model, batch).backward()  # captured and replayed
    first = graphs(model, batch)
    graphs(model, batch).backward()
    with pytest.raises(RuntimeError, match="ran again before the backward"):
        first.backward()


def _mixed_lengths(packed=False):
    """Batches of two lengths (64 and 96 tokens) interleaved, with position ids as the graphed collator gives."""
    a, b = _batches(3, T=64, packed=packed, seed=3), _batches(3, T=96, packed=packed, seed=4)
    out = [x for pair in zip(a, b) for x in pair]
    for x in out:
        x.setdefault("position_ids", torch.arange(x["input_ids"].shape[1], device="cuda")[None])
    return out


def test_shapes_captured_before_training_replay_every_step_as_eager_steps_compute(monkeypatch):
    """prepare() captures both shapes up front: every step is replayed (none eager), and the losses, gradients
    and weights equal those of eager steps with the same dropout masks (the seed and the gradients the warm-up
    batches touched are put back). Both shapes share one memory pool."""
    batches = _mixed_lengths()
    eager = _run(_model(dropout=0.1), batches, False, monkeypatch)
    graphed = _run(_model(dropout=0.1), batches, True, monkeypatch, prepare=[(1, 64), (1, 96)])
    g = graphed[3]
    assert (g.captures, g.replays, g.eager_steps) == (2, 6, 0)
    assert g.prepared == [(1, 96), (1, 64)] and g.stats()["captured_before_training"] == [[1, 96], [1, 64]]
    assert {step.fwd.pool() for step in g.steps.values()} == {tuple(g.pool)}
    for a, b in zip(graphed[0], eager[0]):
        assert abs(a - b) <= 1e-4 * abs(b), (graphed[0], eager[0])
    for ga, gb in zip(graphed[1], eager[1]):
        for n in gb:
            assert _rel(ga[n], gb[n]) < 1e-4, n
    for n in eager[2]:
        assert _rel(graphed[2][n], eager[2][n]) < 1e-4, n


def test_a_replay_of_another_shape_before_the_backward_is_refused(monkeypatch):
    """The shapes share one memory pool: a forward of another shape between a forward and its backward would
    overwrite what that backward reads, so the backward refuses."""
    model = _model()
    graphs = enable_train_graphs(model, warmup=1)
    graphs.prepare([(1, 64), (1, 96)], pad_id=0)
    short, long = _mixed_lengths()[:2]
    first = graphs(model, short)
    graphs(model, long).backward()
    with pytest.raises(RuntimeError, match="ran again before the backward"):
        first.backward()
    graphs(model, short).backward()  # in order again: fine
    assert graphs.replays == 3 and graphs.eager_steps == 0


def test_compiled_elementwise_kernels_inside_the_graph(monkeypatch):
    """Rows long enough that RMSNorm/rotary/SwiGLU go through torch.compile (2^21 elements)."""
    batches = _batches(3, B=1, T=8192)
    eager = _run(_model(layers=1), batches, False, monkeypatch)
    graphed = _run(_model(layers=1), batches, True, monkeypatch)
    assert graphed[3].replays == 2
    for ga, gb in zip(graphed[1], eager[1]):
        for n in gb:
            assert _rel(ga[n], gb[n]) < 1e-4, n


def test_a_failed_capture_falls_back_to_eager_steps(monkeypatch):
    from finetune.training import graphs as graphs_mod

    def broken(*a, **k):
        raise RuntimeError("capture invalidated")

    model = _model()
    graphs = enable_train_graphs(model, warmup=1)
    monkeypatch.setattr(graphs_mod, "_CapturedStep", broken)
    losses = []
    with pytest.warns(UserWarning, match="continues without graphs"):
        for batch in _batches(3):
            loss = graphs(model, batch)
            loss.backward()
            losses.append(float(loss))
    assert graphs.captures == 1 and graphs.replays == 0 and graphs.eager_steps == 3
    assert "capture invalidated" in graphs.failure
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _int4_demo(tmp_path):
    """(the tiny Int4 demo model dir, the memorise set): what the trainer-level tests below train on."""
    from finetune.demo import make_demo_model

    from _helpers import write_memorise

    return make_demo_model(tmp_path / "int4", int4=True), write_memorise(tmp_path / "d.json")


def _graphed_and_eager(out, model_dir, data, *flags):
    """Q-LoRA through `train` on the GPU (checkpointing, a loss logged every step), with --cuda_graphs True and
    False: {"True"/"False": (losses, run_info.json's cuda_graphs, the trainer)}."""
    import json

    from finetune.train import train
    from finetune.training.arguments import parse_args

    from _helpers import train_args

    runs = {}
    for graphs in ("True", "False"):
        argv = train_args(model_dir, data, out / graphs, "--use_lora", "True", "--q_lora", "True",
                          "--logging_steps", "1", "--use_cpu", "False", "--gradient_checkpointing", "True",
                          "--cuda_graphs", graphs, *flags)
        trainer = train(*parse_args(argv))
        runs[graphs] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                        json.loads((out / graphs / "run_info.json").read_text())["cuda_graphs"], trainer)
    return runs


def test_trainer_with_packing_trains_through_graphs_as_it_trains_eagerly(tmp_path):
    """`train` on the GPU with --packing: steps replay as graphs (rows padded to model_max_length), and the
    loss curve follows the eager run's (dropout 0, so both compute the same function; bf16 rounding only)."""
    model_dir, data = _int4_demo(tmp_path)
    runs = _graphed_and_eager(tmp_path / "packed", model_dir, data, "--max_steps", "30", "--packing", "True")
    (graphed, g, trainer), (eager, none, plain) = runs["True"], runs["False"]
    assert trainer.graphs is None and plain.graphs is None  # released after training
    assert none is None and {k: g[k] for k in ("captures", "replayed_steps", "eager_steps")} == {
        "captures": 1, "replayed_steps": 30, "eager_steps": 0}  # captured before the first step
    assert len(g["captured_before_training"]) == 1
    assert graphed[-1] < 0.3 * graphed[0] and eager[-1] < 0.3 * eager[0]
    for a, b in zip(graphed[:10], eager[:10]):  # later, bf16 rounding differences compound through the updates
        assert abs(a - b) <= 0.02 * abs(b), (graphed, eager)


def test_the_compact_input_embedding_counts_the_memory_the_gpu_got_back():
    """On the GPU the freed figure (what the keep budget grows by) is what the allocator got back: the whole table
    less the compact rows and the lookup table; with the old table still referenced elsewhere, nothing."""
    from finetune.training.compact_embedding import compact_input_embedding

    from _helpers import tiny_model

    for held in (False, True):
        model = tiny_model(seed=2).requires_grad_(False).cuda()
        full = model.get_input_embeddings()
        extra = full.weight.data if held else None  # e.g. a state dict someone kept
        whole = full.weight.numel() * full.weight.element_size()
        restore = compact_input_embedding(model, torch.arange(0, 40, 2))
        compact = model.get_input_embeddings()
        kept = compact.weight.numel() * compact.weight.element_size() + compact.remap.numel() * 8
        want = 0 if held else whole - kept
        assert abs(restore.freed_bytes - want) <= 4 * 512, (held, restore.freed_bytes, want)  # 512-byte rounding
        restore()
        del extra, model, full, compact
        torch.cuda.empty_cache()


def test_trainer_with_the_compact_input_embedding_trains_as_with_the_whole_table(tmp_path):
    """Q-LoRA through `train` on the GPU: the input embedding holds only the data's token rows during training
    (run_info.json says how many), gives the same vectors, so the same losses and adapter as the whole table
    (FINETUNE_COMPACT_EMBEDDING=0), and is whole again after training."""
    import json

    from safetensors.torch import load_file

    from finetune.modeling.model import qwen_lm
    from finetune.settings import override
    from finetune.train import train
    from finetune.training.arguments import parse_args

    from _helpers import train_args

    model_dir, data = _int4_demo(tmp_path)
    runs = {}
    for compact in (True, False):
        out = tmp_path / f"compact_{compact}"
        argv = train_args(model_dir, data, out, "--use_lora", "True", "--q_lora", "True", "--logging_steps", "1",
                          "--use_cpu", "False", "--gradient_checkpointing", "True", "--max_steps", "8",
                          "--packing", "True")
        with override(compact_embedding=compact):
            trainer = train(*parse_args(argv))
        embedding = qwen_lm(trainer.model).get_input_embeddings()
        assert type(embedding) is torch.nn.Embedding and embedding.weight.is_cuda  # whole again
        runs[compact] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                         json.loads((out / "run_info.json").read_text())["input_embedding"],
                         load_file(str(out / "adapter_model.safetensors")), embedding.num_embeddings)
    (losses, info, adapter, vocab), (whole_losses, whole_info, whole_adapter, _) = runs[True], runs[False]
    assert whole_info is None and 0 < info["rows_on_gpu"] < vocab and info["freed_gib"] >= 0  # (KiB here)
    assert len(losses) == 8
    for a, b in zip(losses, whole_losses):
        assert abs(a - b) <= 1e-5 * abs(b), (losses, whole_losses)
    for name, t in whole_adapter.items():
        torch.testing.assert_close(adapter[name], t, rtol=1e-4, atol=1e-6)


def test_trainer_one_chat_a_row_replays_every_step_and_trains_as_eagerly(tmp_path):
    """--packing False under graphs (the default order, length-grouped): every length bucket the data has is
    captured before training, no step runs eagerly, and the loss curve follows the eager run's."""
    import json

    model_dir, data = _int4_demo(tmp_path)
    records = []
    for repeat in (1, 13, 25):  # each memorised answer at three lengths: 37-334 tokens, three 128-token buckets
        for r in json.loads(data.read_text()):
            turns = [dict(t) for t in r["conversations"]]
            turns[1]["value"] = " ".join([turns[1]["value"]] * repeat)
            records.append({"id": f"{r['id']}x{repeat}", "conversations": turns})
    data.write_text(json.dumps(records))
    runs = _graphed_and_eager(tmp_path / "padded", model_dir, data, "--max_steps", "12", "--model_max_length", "512")
    (graphed, g, trainer), (eager, _, plain) = runs["True"], runs["False"]
    assert trainer.args.train_sampling_strategy == plain.args.train_sampling_strategy == "group_by_length"
    assert g["eager_steps"] == 0 and g["replayed_steps"] == 12 and g["captures"] == 3, g
    assert sorted(T for _, T in g["captured_before_training"]) == [128, 256, 384]
    for a, b in zip(graphed[:6], eager[:6]):
        assert abs(a - b) <= 0.02 * abs(b), (graphed, eager)


def test_graphed_run_with_lora_dropout_resumed_after_a_kill_matches_the_uninterrupted_run(tmp_path):
    """Q-LoRA through CUDA graphs with LoRA dropout 0.05: a run SIGKILLed after its step-4 checkpoint and resumed
    ends with the uninterrupted run's adapter (the dropout seed is restored from the checkpoint). Tolerance: fp32
    adapters, rtol 1e-4 / atol 1e-6 (the CPU resume test's; the resumed run's first two steps are TrainGraphs'
    eager warm-up, the same kernels as the replayed steps). Without the seed (file removed) the adapters differ
    by far more, so the tolerance tells the two apart."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file

    from finetune.train import main
    from finetune.training.graphs import seed_file_name

    from _helpers import train_args, train_killed_at_step

    model_dir, data = _int4_demo(tmp_path)
    common = ["--use_lora", "True", "--q_lora", "True", "--packing", "True", "--use_cpu", "False",
              "--gradient_checkpointing", "True", "--cuda_graphs", "True", "--lora_dropout", "0.05",
              "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4",
              "--per_device_train_batch_size", "1", "--logging_steps", "1"]

    def argv(out, *extra):
        return train_args(model_dir, data, out, *common, *extra)

    full = tmp_path / "full"
    assert main(argv(full)) == 0
    assert json.loads((full / "run_info.json").read_text())["cuda_graphs"]["replayed_steps"] > 0
    killed = tmp_path / "killed"
    proc = train_killed_at_step(argv(killed), step=6, timeout=900)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (killed / "checkpoint-4" / seed_file_name()).is_file() and not (killed / "checkpoint-8").exists()
    unseeded = tmp_path / "unseeded"  # the same checkpoint without its seed: the negative control
    shutil.copytree(killed, unseeded)
    os.remove(unseeded / "checkpoint-4" / seed_file_name())

    assert main(argv(killed, "--resume", "True")) == 0
    assert main(argv(unseeded, "--resume", "True")) == 0
    ref = load_file(str(full / "adapter_model.safetensors"))
    resumed = load_file(str(killed / "adapter_model.safetensors"))
    other = load_file(str(unseeded / "adapter_model.safetensors"))
    for k in ref:
        torch.testing.assert_close(resumed[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    worst = max(float((other[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)) for k in ref
                if "lora_B" in k)
    assert worst > 1e-3, worst


def test_zero2_one_gpu_trains_through_graphs_as_it_trains_eagerly(tmp_path):
    """`bash scripts/finetune_qlora.sh` under DeepSpeed ZeRO-2 on one GPU: steps replay as graphs inside the
    engine (gradients handed to ZeRO's hooks through autograd), and the loss curve and gradient norms follow the
    eager DeepSpeed run's (dropout 0: both compute the same function; bf16 rounding only)."""
    pytest.importorskip("deepspeed")
    import ast
    import json
    import os
    import subprocess


    from _helpers import ROOT, free_port

    model_dir, data = _int4_demo(tmp_path)
    runs = {}
    for graphs in ("True", "False"):
        out = tmp_path / f"out_{graphs}"
        env = dict(os.environ, DEEPSPEED=str(ROOT / "ds_configs" / "zero2.json"), NPROC="1",
                   MASTER_PORT=str(free_port()))
        cmd = ["bash", str(ROOT / "scripts" / "finetune_qlora.sh"), "-m", str(model_dir), "-d", str(data),
               "-o", str(out), "--max_steps", "20", "--packing", "True", "--per_device_train_batch_size", "1",
               "--gradient_accumulation_steps", "2", "--lora_dropout", "0", "--learning_rate", "5e-3",
               "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
               "--model_max_length", "128", "--lora_r", "16", "--seed", "0", "--cuda_graphs", graphs]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        info = json.loads((out / "run_info.json").read_text())
        assert info["zero_stage"] == 2 and info["world_size"] == 1
        logs = [{k: float(v) for k, v in ast.literal_eval(line).items()}  # the Trainer's printed log lines
                for line in proc.stdout.splitlines() if line.startswith("{'loss'")]
        runs[graphs] = (info["cuda_graphs"], logs)
    (g, graphed), (none, eager) = runs["True"], runs["False"]
    assert none is None and g["captures"] == 1 and g["replayed_steps"] == 38 and g["eager_steps"] == 2
    assert len(graphed) == len(eager) == 20
    for a, b in zip(graphed[:10], eager[:10]):  # later, bf16 rounding differences compound through the updates
        assert abs(a["loss"] - b["loss"]) <= 0.02 * abs(b["loss"]), (graphed, eager)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 0.05 * abs(b["grad_norm"]), (graphed, eager)
    # both learn (a replay reading stale weights, or gradients that never reach ZeRO, would not)
    assert graphed[-1]["loss"] < 0.6 * graphed[0]["loss"] and eager[-1]["loss"] < 0.6 * eager[0]["loss"]
