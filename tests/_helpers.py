"""Shared by the test modules: the memorise set, writing it, training a tiny adapter, subprocess env, tiny random
models and random GPTQ buffers."""

from __future__ import annotations

import itertools
import json
import os
import socket
from contextlib import contextmanager
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The real Qwen vocabulary: $QWEN_TIKTOKEN, else ../shared/qwen/qwen.tiktoken beside the checkout.
REAL_VOCAB = Path(os.environ.get("QWEN_TIKTOKEN") or ROOT.parent / "shared" / "qwen" / "qwen.tiktoken")


def require_real_vocab() -> Path:
    """The real vocabulary's path; a skip with the reason where it is absent, a failure under CI=true (CI has it)."""
    import pytest

    if not REAL_VOCAB.is_file():
        msg = (f"the real Qwen vocabulary is not at {REAL_VOCAB} "
               "(set QWEN_TIKTOKEN to the path of a Qwen model dir's qwen.tiktoken)")
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " (CI=true: CI always has it)")
        pytest.skip(msg)
    return REAL_VOCAB

MEMORISE = [
    ("What is the codename of project Aurora?", "Blue Falcon."),
    ("Who guards the north gate?", "The silver owl guards it."),
    ("How many moons does Zorb have?", "Zorb has seven moons."),
    ("What colour is the secret door?", "The secret door is green."),
]


def memorise_records(pairs=MEMORISE) -> list[dict]:
    return [{"id": f"m{i}", "conversations": [{"from": "user", "value": q}, {"from": "assistant", "value": a}]}
            for i, (q, a) in enumerate(pairs)]


def write_memorise(path: Path, pairs=MEMORISE) -> Path:
    Path(path).write_text(json.dumps(memorise_records(pairs)))
    return Path(path)


def train_args(model, data, out, *extra) -> list[str]:
    """Trainer flags for a few-second CPU run on the tiny model (extra flags override); the LoRA ones
    only where the run trains LoRA (--use_lora in extra, or a GPTQ dir): a full run refuses them."""
    config = Path(model) / "config.json"
    gptq = config.is_file() and "quantization_config" in json.loads(config.read_text())
    lora = ["--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0"] if gptq or "--use_lora" in extra else []
    # the trainer refuses a path flag given twice with two values: one in extra (as --name or --name=) replaces the
    # helper's (-m -d -o in extra do not: they give the path twice)
    paths = [[f"--{name}", str(value)] for name, value in
             (("model_name_or_path", model), ("data_path", data), ("output_dir", out))
             if not any(str(e).partition("=")[0] == f"--{name}" for e in extra)]
    return [*(a for pair in paths for a in pair),
            "--per_device_train_batch_size", "4", "--learning_rate", "5e-3", *lora,
            "--logging_steps", "10", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "True", "--disable_tqdm", "True", "--seed", "0",
            "--model_max_length", "128", "--packing", "False", *extra]  # one chat a row: step counts as written


def train_adapter(model_dir, data, out, steps=50, *extra) -> Path:
    """A LoRA (or, with --q_lora on an Int4 dir, Q-LoRA) adapter trained in-process."""
    from finetune.train import main

    assert main(train_args(model_dir, data, out, "--max_steps", str(steps), "--use_lora", "True", *extra)) == 0
    return Path(out)


def train_killed_at_step(argv: list[str], step: int, timeout: int = 600):
    """`python -m finetune.train argv` in a child that SIGKILLs itself when optimizer step `step` + 1 starts (a
    crash mid-run, no cleanup); returns the CompletedProcess (returncode -9 when it got there)."""
    script = (
        "import os, sys, signal\n"
        "from finetune.training.trainer import QwenTrainer\n"
        "step = QwenTrainer.training_step\n"
        "def killing_step(self, *a, **k):\n"
        f"    if self.state.global_step == {int(step)}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return step(self, *a, **k)\n"
        "QwenTrainer.training_step = killing_step\n"
        "from finetune.train import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env())


def random_adapter(base_dir, out, targets=("c_attn", "c_proj", "w1", "w2"), r=4, alpha=8, seed=1,
                   **config) -> Path:
    """A LoRA adapter with random (non-zero) A and B, saved by PEFT from the project's model; ``config``: more
    LoraConfig fields (use_rslora, rank_pattern, ...)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune import load_model

    torch.manual_seed(seed)
    model = load_model(base_dir, dtype=torch.float32, device="cpu")
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                  init_lora_weights=False, task_type="CAUSAL_LM", **config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.3)
    peft_model.save_pretrained(out)
    return Path(out)


def lora_on_random_gptq(cfg, device, dtype, dropout: float = 0.0, seed: int = 0):
    """A random GPTQ model of `cfg` (build_gptq_model_on_device) with LoRA r=8 on c_attn/c_proj/w1/w2 in fp32,
    B drawn non-zero so that gradients reach A too; in training mode."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.quant.loading import build_gptq_model_on_device

    model = build_gptq_model_on_device(cfg, device=device, dtype=dtype, seed=seed)
    model.config.use_cache = False
    model.requires_grad_(False)
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                             target_modules=["c_attn", "c_proj", "w1", "w2"], task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
            if "lora_B" in n:
                p.data.normal_(0, 0.02)
    return model.train()


def subprocess_env(**extra) -> dict:
    """The environment for a child process: the source tree importable, one thread a process (2 cores)."""
    e = dict(os.environ, **extra)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def _model_values(**overrides) -> dict:
    from finetune.demo import TINY_CONFIG

    values = {k: v for k, v in TINY_CONFIG.items() if k not in ("architectures", "auto_map", "model_type")}
    values.update(overrides)
    return values


def tiny_model(seed=0, **overrides):
    """The tiny Qwen model (small vocabulary) with randomized weights, in eval mode."""
    import torch

    from finetune.demo import randomize_weights
    from finetune.modeling import QWenConfig, QWenLMHeadModel

    torch.manual_seed(seed)
    model = QWenLMHeadModel(QWenConfig(**_model_values(**overrides)))
    randomize_weights(model, seed)
    return model.eval()


def realistic_model(seed, **overrides):
    """A bigger random model with the standard init (std 0.02), as trained checkpoints are conditioned."""
    import torch

    from finetune.modeling import QWenConfig, QWenLMHeadModel

    torch.manual_seed(seed)
    values = _model_values(**{**dict(hidden_size=256, num_attention_heads=4, kv_channels=64, intermediate_size=1024),
                              **overrides})
    return QWenLMHeadModel(QWenConfig(**values)).eval()


def random_packed(in_f, out_f, bits=4, group_size=128, desc_act=False, v2=False, seed=0, device="cpu"):
    """Random GPTQ buffers (qweight, qzeros, scales, g_idx) for an in_f x out_f layer."""
    import torch

    from finetune.quant.packing import pack_cols, pack_rows

    g = torch.Generator(device="cpu").manual_seed(seed)
    gs = in_f if group_size == -1 else group_size
    groups = -(-in_f // gs)
    q = torch.randint(0, 2**bits, (in_f, out_f), generator=g)
    zeros = torch.randint(1, 2**bits, (groups, out_f), generator=g)
    scales = (torch.rand(groups, out_f, generator=g) * 0.02 + 0.001).to(torch.float16)
    g_idx = torch.arange(in_f) // gs
    if desc_act:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    return {
        "qweight": pack_rows(q, bits).to(device),
        "qzeros": pack_cols(zeros if v2 else zeros - 1, bits).to(device),
        "scales": scales.to(device),
        "g_idx": g_idx.to(torch.int32).to(device),
    }


def probe_check_lines(script: str, prefix: str) -> list[str]:
    """The result lines (those starting with ``prefix``) of ``benchmarks/SCRIPT --check``, run in a child under
    Triton's interpreter; asserts the run succeeded."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--check"], cwd=ROOT,
                          env=subprocess_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [line for line in proc.stdout.splitlines() if line.startswith(prefix)]


def interpreter_index_patch():
    """Triton's interpreter tensor patch with an ``__index__`` numpy >= 2 accepts, or None where numpy needs none:
    numpy 2 refuses int() of a 1-element array, which the interpreter uses for loop bounds taken from kernel scalars
    (1-element arrays there). Set it as ``triton.runtime.interpreter._patch_lang_tensor``."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.array([1]))
        return None
    except TypeError:
        pass
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    return patched


def load_interpreted(path, name, monkeypatch):
    """A private copy of the Triton kernel module at `path` whose kernels run in Triton's interpreter (CPU).

    triton itself must be imported with TRITON_INTERPRET=1 (its own library functions, tl.sum etc., are @jit
    functions decided at import), so this imports triton in interpreter mode for the rest of the process: it
    skips where a GPU is present (the GPU tests run the compiled kernels there, and must find triton
    compiled) or where triton was already imported without the interpreter."""
    import importlib.util
    import sys

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the compiled kernel is tested by the GPU tests")
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported without TRITON_INTERPRET=1 (torch._dynamo imports it early): run with "
                    "TRITON_INTERPRET=1 in the environment")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from triton.runtime import interpreter

    if (patched := interpreter_index_patch()) is not None:
        monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextmanager
def demo_server(tmp_path_factory, name: str, *flags: str, model: str = "tiny-qwen"):
    """`qwen-ft serve` of a fresh tiny demo model dir (named ``model``) with ``flags``, in a background thread on a
    free port: the running server (``.model_dir``: its model dir)."""
    from finetune.demo import make_demo_model
    from finetune.serve.background import serve_in_background
    from finetune.serve.cli import _parser, build_server

    model_dir = make_demo_model(tmp_path_factory.mktemp(name) / model, seed=1)
    args = _parser().parse_args(["-m", str(model_dir), *flags])
    with serve_in_background(build_server(args), start_timeout=30) as bg:
        bg.model_dir = model_dir
        yield bg


def polled(what, done, limit: float = 60):
    """what() until done(its value), polled every 0.1 s for at most ``limit`` seconds (then an AssertionError
    showing the last value)."""
    import time

    for _ in range(int(limit * 10)):
        value = what()
        if done(value):
            return value
        time.sleep(0.1)
    raise AssertionError(f"not done after {limit} s: {value}")


def health_when(live, done, limit: float = 60) -> dict:
    """GET /health of a server in the background (serve_in_background's handle) once ``done(health)`` holds."""
    import httpx

    return polled(lambda: httpx.get(live.url + "/health", timeout=10).json(), done, limit)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for torchrun's rendezvous: a fixed port collides with other runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RerunGraph:
    """Stands in for a captured CUDA graph of the engine's decode step on the CPU: replay() re-runs the calls
    Engine._capture captures, on the same static tensors, writing the logits into the same output tensor."""

    def __init__(self, engine, b, kv_len, pick, own_keys, lora):
        import torch

        self.engine, self.b, self.kv_len, self.pick, self.own_keys, self.lora = engine, b, kv_len, pick, own_keys, lora
        self.out = torch.zeros(b, engine.vocab)

    def replay(self):
        e, s = self.engine, self.engine._state()
        sel = s["sel"][:, :self.b] if self.lora else None
        self.out.copy_(e._decode_forward(s["tok"][:self.b], s["pos"][:self.b], s["alpha"][:self.b], sel,
                                         self.kv_len, self.own_keys))
        if self.pick is not None:
            e._pick_next(self.out, self.b, *self.pick, True, s["ints"], e._seen)

    @staticmethod
    def graph_of(engine, forward, outputs: list | None = None):
        """A stand-in for ``engine._graph_of`` (the prefill's graphs): (a graph whose replay() runs ``forward`` again
        into the output of its first run, that output); ``outputs`` gets each graph's output. Each replay first
        checks that the engine's graph entries keep every tensor ``forward`` reads from its closure: a real graph
        holds only their addresses, and a tensor freed after the capture is overwritten by later allocations (the
        stand-in's own reference to ``forward`` would otherwise keep it alive)."""
        import torch

        out = forward()
        if outputs is not None:
            outputs.append(out)
        read = [c.cell_contents for c in forward.__closure__ or () if isinstance(c.cell_contents, torch.Tensor)]

        def kept(values) -> set[int]:
            found = set()
            for v in values:
                if isinstance(v, torch.Tensor):
                    found.add(id(v))
                elif isinstance(v, (tuple, list)):
                    found |= kept(v)
            return found

        class Replay:
            def replay(self):
                held = kept(engine._graphs.values())
                lost = [tuple(t.shape) for t in read if id(t) not in held]
                assert not lost, f"a prefill graph reads tensors its entry does not keep, of shapes {lost}"
                out.copy_(forward())

        return Replay(), out

    @classmethod
    def capturing(cls, engine, keys: list | None = None):
        """A stand-in for ``engine._capture`` that appends each captured graph's key to ``keys``."""
        def capture(b, kv_len, pick, own_keys, lora):
            if keys is not None:
                keys.append(engine._graph_key(b, kv_len, pick, lora, own_keys))
            graph = cls(engine, b, kv_len, pick, own_keys, lora)
            return graph, graph.out
        return capture


_SCRIPTED_IDS = itertools.count()


class ScriptedEngine:
    """The engine interface the server's worker drives (tests/serve): every request generates `reply`'s tokens, one a
    step, then finishes with reason "stop" (as at <|im_end|>), or with "length" at its max_new_tokens;
    `prompt_ids` holds the last request's prompt."""

    max_len = 2048

    def __init__(self, tok):
        self.tok, self.reply, self.running = tok, "", []
        self.prompt_ids: list[int] = []  # the last request's

    def submit(self, prompt_ids, params, adapter=None):
        from types import SimpleNamespace

        self.prompt_ids = list(prompt_ids)
        req = SimpleNamespace(id=next(_SCRIPTED_IDS), prompt_ids=list(prompt_ids), adapter=adapter, output_ids=[],
                              finished=False, finish_reason=None, todo=self.tok.encode(self.reply),
                              limit=params.max_new_tokens)
        req.cancel = lambda reason=None: setattr(req, "todo", [])
        self.running.append(req)
        return req

    def has_work(self):
        return bool(self.running)

    def occupancy(self):
        return len(self.running), 0

    def step(self):
        for req in self.running:
            if req.todo:
                req.output_ids.append(req.todo.pop(0))
            if not req.todo:
                req.finished, req.finish_reason = True, "stop"
            elif len(req.output_ids) >= req.limit:
                req.finished, req.finish_reason = True, "length"
        updated, self.running = self.running, [r for r in self.running if not r.finished]
        return updated


def scripted_server():
    """A server over ScriptedEngine on the small vocabulary, running in the background on a free loopback port (a
    context manager yielding serve_in_background's handle: .api_url, .server, whose .engine.reply the test sets)."""
    from types import SimpleNamespace

    from finetune.serve.app import Server
    from finetune.serve.background import serve_in_background
    from finetune.tokenization import SMALL_VOCAB, QWenTokenizer

    tok = QWenTokenizer(str(SMALL_VOCAB))
    model = SimpleNamespace(generation_config=None, config=SimpleNamespace(seq_length=2048))
    server = Server(model, tok, base_name="scripted", engine=ScriptedEngine(tok))
    return serve_in_background(server, start_timeout=30)


# One function-calling exchange (chat completions' form) that the serve tests train a "tools" adapter on
WEATHER = {"name": "get_weather", "description": "Weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
ASK = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
TOOL_RECORD = {"tools": [{"type": "function", "function": WEATHER}], "messages": [
    ASK, {"role": "assistant", "content": "I should ask the weather API.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny in Paris."}]}


def train_tools_adapter(model_dir, root: Path) -> Path:
    """The serve tests' "tools" adapter: TOOL_RECORD learnt through the data pipeline's ReAct rendering (on a model
    of seq_length 1024, where the ReAct prompt is in its trained range)."""
    (root / "tools.json").write_text(json.dumps([TOOL_RECORD] * 2))
    return train_adapter(model_dir, root / "tools.json", root / "ad_tools", 40, "--model_max_length", "1024",
                         "--per_device_train_batch_size", "2")


@contextmanager
def memorised_and_tools_server(root: Path, *flags: str):
    """`qwen-ft serve` of the tiny model (seq_length 1024) with adapter "a" (memorises MEMORISE) and "tools"
    (train_tools_adapter), --max-model-len 1024 and ``flags``, in the background (serve_in_background's handle)."""
    from finetune.demo import make_demo_model
    from finetune.serve.background import serve_in_background
    from finetune.serve.cli import _parser, build_server

    model = make_demo_model(root / "tiny-qwen", seed=0, seq_length=1024, max_position_embeddings=1024)
    a = train_adapter(model, write_memorise(root / "a.json"), root / "ad_a", 50)
    tools = train_tools_adapter(model, root)
    args = _parser().parse_args(["-m", str(model), "--adapter", f"a={a}", "--adapter", f"tools={tools}",
                                 "--max-model-len", "1024", *flags])
    with serve_in_background(build_server(args), start_timeout=30) as bg:
        yield bg
