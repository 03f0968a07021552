"""The Int4 kernels' launch configs judged inside the decode step: for each candidate set of SHAPE_CONFIGS entries, a
fresh Engine captures its decode graph at each row count and the graph's replay is timed (the GPU time of one whole
step), candidates alternated over rounds in one process on one model. Steps 73-74 (benchmarks/NOTES.md) found the
layer probe (mma_gemv_probe.py, mma_gemm_probe.py: each launch timed alone) 2-4x off what a config gains inside the
step; this times what the step gains, ~1 s a candidate and row count instead of a process per decode_bench run.

A candidate is NAME or NAME:ENTRY+ENTRY..., an entry "mb,K,N=config": a 3-value config (warps, depth, CTAs an SM)
goes to mma_gemv.SHAPE_CONFIGS (the 1-8 row GEMV, mb = 1; "lora,mb,K,N=..." to its LORA_SHAPE_CONFIGS, the build
with an adapter's epilogue), a 4-value one (warps, tiles a warp, depth, CTAs an SM;
a fifth: groups of warps along the rows) to mma_gemm.SHAPE_CONFIGS (9-64 rows, mb = 8-row blocks 2, 4, 8), on top
of the shipped entries ("base": none added; a candidate named "general" empties the tables); an entry
"switch=0|1" (a field of finetune/settings.py, e.g. paired_decode=0) holds for that candidate's runs, and so does
"module.NAME=N", an integer constant of a module of finetune/inference or finetune/quant (e.g.
row_adapters.PAIRED_LORA_MAX_ROWS=8; a range constant such as XA_IN_SWIGLU_ROWS takes "a-b"). Each added
entry is first checked against the exact product at its shape (random Int4 weights, 1e-2 relative; a wrong
config is reported and skipped). A candidate runs only at the row counts its entries are for.

    python benchmarks/step_config_sweep.py --model-dir /tmp/m --rows 1 --prompt 24 \
        --candidates base A414:1,5120,5120=4,1,4 --rounds 2 --out $OUT/sweep.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from decode_bench import device_name, load, prompt_ids, random_layer, with_adapter  # noqa: E402
from provenance import git_commit  # noqa: E402

from finetune.inference import Engine, SamplingParams  # noqa: E402
from finetune.quant import mma_gemm, mma_gemv  # noqa: E402
from finetune.quant.packing import dequantize_t  # noqa: E402
from finetune.settings import override  # noqa: E402

TABLES = {"gemv": (mma_gemv, "SHAPE_CONFIGS"), "gemv_lora": (mma_gemv, "LORA_SHAPE_CONFIGS"),
          "gemm": (mma_gemm, "SHAPE_CONFIGS")}
SHIPPED = {kind: dict(getattr(module, name)) for kind, (module, name) in TABLES.items()}


def parse(candidate: str) -> tuple[str, dict]:
    """NAME[:entries] -> (name, {"gemv": {...}, "gemm": {...}, "settings": {...}}): table entries added to the shipped
    ones, and settings switches."""
    name, _, spec = candidate.partition(":")
    added: dict = {"gemv": {}, "gemv_lora": {}, "gemm": {}, "settings": {}, "constants": {}}
    for entry in filter(None, spec.split("+")):
        shape, config = entry.split("=")
        if "." in shape:  # module.NAME=value: a constant of the package for this candidate's runs
            module, _, attr = shape.partition(".")
            added["constants"][(module, attr)] = constant(module, attr, config)
            continue
        if shape.isidentifier():  # a switch of finetune/settings.py for this candidate (paired_decode=0)
            added["settings"][shape] = bool(int(config)) if config in ("0", "1") else int(config)
            continue
        lora = shape.startswith("lora,")
        shape, config = tuple(map(int, shape.removeprefix("lora,").split(","))), tuple(map(int, config.split(",")))
        if len(shape) != 3 or len(config) not in (3, 4, 5) or (lora and len(config) != 3):
            raise SystemExit(f"{candidate}: entry {entry!r} is not [lora,]mb,K,N=w,d,s (GEMV) or mb,K,N=w,t,d,s[,g] "
                             "(GEMM)")
        added["gemv_lora" if lora else "gemv" if len(config) == 3 else "gemm"][shape] = config
    return name, added


def package_module(name: str):
    for package in ("finetune.inference", "finetune.quant"):
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError:
            continue
    raise SystemExit(f"no module {name} in finetune/inference or finetune/quant")


def constant(module: str, attr: str, text: str):
    """The value of a module.NAME=TEXT entry, of the type the constant has: an int, or a range for "a-b"."""
    shipped = getattr(package_module(module), attr, None)
    if isinstance(shipped, range):
        low, _, high = text.partition("-")
        return range(int(low), int(high or low) + 1)
    if type(shipped) is not int:
        raise SystemExit(f"{module}.{attr} is not an integer or range constant")
    return int(text)


SHIPPED_CONSTANTS: dict = {}  # (module, NAME) -> the shipped value, for constants a candidate changed


def apply(name: str, added: dict) -> None:
    for kind, (module, table) in TABLES.items():
        entries = getattr(module, table)
        entries.clear()
        if name != "general":
            entries.update(SHIPPED[kind])
        entries.update(added[kind])
    for (module, attr), value in SHIPPED_CONSTANTS.items():
        setattr(package_module(module), attr, value)
    for (module, attr), value in added["constants"].items():
        SHIPPED_CONSTANTS.setdefault((module, attr), getattr(package_module(module), attr))
        setattr(package_module(module), attr, value)


def touches(added: dict, rows: int) -> bool:
    """Whether a step of `rows` rows launches a kernel with one of the added entries' row blocks (a candidate whose
    entries are all for other row counts is the base there, and is not timed again)."""
    if added["settings"] or added["constants"]:
        return True
    if rows < mma_gemm.MIN_ROWS:
        return any(mb == mma_gemv.row_blocks(rows) for mb, _, _ in [*added["gemv"], *added["gemv_lora"]])
    return any(mb == mma_gemm.row_blocks(rows) for mb, _, _ in added["gemm"])


# Qwen-14B's one-row-block launches (K, N), w1 and w2's pair among them: where a candidate's constants are checked
GEMV_SHAPES_14B = ((5120, 15360), (5120, 5120), (5120, 27392), (13696, 5120))


def relative_error(kind: str, K: int, N: int, rows: int, config, device) -> float:
    """The kernel of `kind` at [rows, K] x [K, N] (config None: its table's) against the exact product."""
    p = random_layer(K, N, device, seed=5)
    exact = dequantize_t(**p, bits=4, dtype=torch.float32)
    packed = mma_gemv.repack(**p, group_size=128)
    x = torch.randn(rows, K, device=device, dtype=torch.bfloat16)
    fn = mma_gemm.mma_gemm if kind == "gemm" else mma_gemv.mma_gemv
    y = fn(x, *packed[:4], 128, packed[4], config=config)
    ref = x.float() @ exact
    return ((y.float() - ref).norm() / ref.norm()).item()


def check(name: str, added: dict, device) -> str | None:
    """Why an added entry is wrong (its product off the exact one), or None; a candidate that changes constants has
    the one-row-block GEMV checked at the 14B's shapes (1 and 8 rows) with them in force."""
    for kind in ("gemv", "gemv_lora", "gemm"):
        for (mb, K, N), config in added[kind].items():
            err = relative_error(kind, K, N, 8 * mb, config, device)
            if not err < 1e-2:
                return f"{kind} {(mb, K, N)} at {config}: relative error {err:.3g}"
    if added["constants"]:
        apply(name, added)
        try:
            for (K, N), rows in [(shape, rows) for shape in GEMV_SHAPES_14B for rows in (1, 8)]:
                err = relative_error("gemv", K, N, rows, None, device)
                if not err < 1e-2:
                    return f"the GEMV at {(rows, K, N)} with {name}'s constants: relative error {err:.3g}"
        finally:
            apply("base", parse("base")[1])
    return None


def step_ms(model, tok, rows: int, prompt: int, reps: int, adapter: str | None) -> float:
    """A fresh engine's decode graph for `rows` rows after `prompt`-token prompts: ms a replay."""
    vocab = model.config.vocab_size
    engine = Engine(model, tok, max_batch=rows)
    # Each replay below advances the rows' positions on the device without the host knowing, so the rows ask for
    # enough tokens that the cache (sized for prompt + max_new_tokens) holds every replay's key and value: with 12,
    # the 103 replays after a 2,000-token prompt wrote past the 2,048 positions of the cache, an illegal address in
    # two processes of three (NOTES step 82). The rows are cancelled after the timing.
    new = 4 + 3 + reps + 8
    params = SamplingParams(max_new_tokens=new, min_new_tokens=new)
    reqs = [engine.submit(prompt_ids(prompt, i, vocab), params, adapter=adapter) for i in range(rows)]
    for _ in range(4):  # prefill, then decode steps: warm-up (compiles this candidate's kernels) and capture
        engine.step()
    (graph, _), = [v for k, v in engine._graphs.items() if k[0] == engine._bucket(rows)][-1:]
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / reps * 1e3
    for req in reqs:
        req.cancel()
    while engine.has_work():
        engine.step()
    del engine, graph
    torch.cuda.empty_cache()
    return ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="/tmp/m")
    ap.add_argument("--rows", nargs="+", type=int, default=[1])
    ap.add_argument("--prompt", type=int, default=24, help="prompt tokens a row (the context the steps read)")
    ap.add_argument("--candidates", nargs="+", default=["base", "general"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--adapter", type=int, default=0, metavar="RANK", help="every row through an r=RANK LoRA")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    candidates = [parse(c) for c in args.candidates]
    kept = []
    for name, added in candidates:
        if problem := check(name, added, device):
            print(json.dumps({"candidate": name, "skipped": problem}), flush=True)
        else:
            kept.append((name, added))
    model, tok = load(args.model_dir, device)
    adapter = None
    if args.adapter:
        model, adapter = with_adapter(model, args.adapter), "default"
    meta = dict(commit=git_commit(), device=device_name(device), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                command=" ".join(["python", "benchmarks/step_config_sweep.py", *(argv or sys.argv[1:])]))
    results = []
    for rnd in range(1, args.rounds + 1):
        for rows in args.rows:
            for name, added in kept:
                if any(added.values()) and not touches(added, rows):
                    continue
                apply(name, added)
                with override(**added["settings"]):
                    ms = step_ms(model, tok, rows, args.prompt, args.reps, adapter)
                row = dict(candidate=name, round=rnd, rows=rows, prompt=args.prompt, adapter_rank=args.adapter,
                           replay_ms=round(ms, 4), tokens_per_s=round(rows / ms * 1e3, 1),
                           gemv=str(mma_gemv.SHAPE_CONFIGS), gemv_lora=str(mma_gemv.LORA_SHAPE_CONFIGS),
                           gemm=str(mma_gemm.SHAPE_CONFIGS),
                           settings=str(added["settings"]),
                           constants={f"{m}.{a}": str(v) for (m, a), v in added["constants"].items()})
                print(json.dumps(row), flush=True)
                results.append(row)
                if args.out:  # after every row: a call cut short keeps what it measured
                    Path(args.out).write_text(json.dumps([{**meta, **r} for r in results], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
