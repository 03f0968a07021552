"""The CUDA C decode attention (finetune/inference/attention_cuda.py). Without a GPU: which calls it takes, its
configurations' arithmetic, and (where an NVRTC library and Triton's ptxas are at hand) every configuration compiled
for sm_90 with all of a pass's 16-byte loads ahead of its first score. On the GPU machine (``pytest -m cuda``): its
output against an fp64 softmax and the Triton kernels, its cache writes against rotary_to_cache's, and a row's bits
the same whatever batch it is in."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.inference import attention_cuda as A

from _helpers import ROOT

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SPLITS = (16, 32, 64, 128, 256)
HEAD_SIZES = (32, 64, 128, 256)


def test_it_takes_the_calls_its_layout_holds():
    assert A.unsupported(torch.bfloat16, 128, torch.int64, 128) is None
    assert A.unsupported(torch.float32, 128, torch.int32, 64) is None
    assert "dtype" in A.unsupported(torch.float64, 128, torch.int64, 128)
    assert "positions" in A.unsupported(torch.bfloat16, 128, torch.int16, 128)
    assert "head size" in A.unsupported(torch.bfloat16, 96, torch.int64, 128)  # not a power of two
    assert "head size" in A.unsupported(torch.float32, 256, torch.int64, 128)  # a 1 KiB key row: 64 lanes
    assert "head size" in A.unsupported(torch.bfloat16, 4, torch.int64, 128)  # 8 bytes: under one vector
    assert "key split" in A.unsupported(torch.bfloat16, 128, torch.int64, 96)
    assert "key split" in A.unsupported(torch.bfloat16, 16, torch.int64, 8)  # 32 threads read 16 keys a round
    with pytest.raises(ValueError, match="head size 96"):
        A.kernel_source(torch.bfloat16, 96, 128, torch.int64, True, True, True)
    assert not A.serves(torch.device("cpu"), torch.bfloat16, 128, torch.int64, 128)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_pass_splits_each_key_split_into_whole_rounds(dtype):
    for dim in HEAD_SIZES:
        for split in SPLITS:
            if A.unsupported(dtype, dim, torch.int64, split):
                continue
            eb = dtype.itemsize
            threads = A.threads_for(split, dim, eb)
            lanes = A.lanes_a_key(dim, eb)
            keys_a_round = threads // lanes
            r = A.rounds(split, threads, dim, eb)
            assert threads % 32 == 0 and 1 <= lanes <= 32 and 32 % lanes == 0
            assert 1 <= r <= A.MAX_ROUNDS and split % (keys_a_round * r) == 0  # whole passes, no key twice
            src = A.kernel_source(dtype, dim, split, torch.int64, True, True, True)
            assert re.search(r"__[A-Z_]+__", src) is None  # every placeholder filled
    # the 14B's head in bf16: 256 threads at 64- and 128-key splits, 128 at 256 (the probe's best)
    assert [A.threads_for(s, 128, 2) for s in (64, 128, 256)] == [256, 256, 128]


def test_with_this_kernel_key_split_fills_the_gpu_with_fewer_longer_splits(monkeypatch):
    """Where this kernel runs the attention, key_split aims at CUDA_FILL_PROGRAMS programs (256-key splits from 1,537
    keys at one row of 40 heads, and graphs at 2,048 keys), else at FILL_PROGRAMS (the Triton kernels); each covering
    length is still a fixed point (a graph captured there serves every step up to it)."""
    pytest.importorskip("triton")
    from finetune.inference import decode_kernels as K

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(A, "enabled", lambda: True)
    assert K.fill_programs() == K.CUDA_FILL_PROGRAMS == 256
    assert [K.key_split(1, 40, n) for n in (1, 768, 769, 1536, 1537, 4000)] == [64, 64, 128, 128, 256, 256]
    assert [K.covering_length(1, 40, n) for n in (1, 769, 1537, 2001, 2049)] == [768, 1536, 2048, 2048, 4096]
    for rows in (1, 3, 32):
        for n in (1, 200, 700, 1600, 3000):
            length = K.covering_length(rows, 40, n)
            assert length >= n and K.covering_length(rows, 40, length) == length
    monkeypatch.setattr(A, "enabled", lambda: False)  # (FINETUNE_ATTENTION_CUDA=0, or no NVRTC)
    assert K.fill_programs() == K.FILL_PROGRAMS and K.covering_length(1, 40, 2001) == 3072


def _parameters(name: str) -> list[str]:
    """The C parameter declarations of kernel ``name`` in the source."""
    body = A._SOURCE.split(f"{name}(")[1].split(")")[0]
    return [" ".join(p.split()) for p in body.split(",")]


@pytest.mark.parametrize("rotary,S,counters", [(True, 8, True), (True, 12, False), (False, 1, False),
                                               (False, 40, False)])
def test_the_launch_passes_what_the_kernels_declare(monkeypatch, rotary, S, counters):
    """attention()'s arguments against the kernels' C signatures: as many, a tensor for each pointer and an int for
    each int; the grid (splits, heads, rows); the combine kernel launched after only where the parts are not
    combined in the launch (S > 1, no counters). The launch itself is recorded, not run (no GPU)."""
    launches = []
    monkeypatch.setattr(A.mma_gemv, "compiled",
                        lambda device, config, name, source, instead: SimpleNamespace(name=name))
    monkeypatch.setattr(A.kernel_launch, "launch", lambda k, grid, block, args: launches.append((k, grid, block, args)))
    b, heads, dim, cap = 3, 4, 64, 512
    src = torch.zeros(b, (3 if rotary else 1) * heads * dim, dtype=torch.bfloat16)
    cos = torch.ones(b, dim) if rotary else None
    cache = torch.zeros(b, heads, cap, dim, dtype=torch.bfloat16)
    out = torch.zeros(b, 1, heads * dim, dtype=torch.bfloat16)
    ws = torch.zeros(b * heads * S * (dim + 2))
    cnt = torch.zeros(b * heads, dtype=torch.int32) if counters else None
    assert A.attention(src, cos, cos, None, torch.zeros(b, dtype=torch.int64), cache, cache.clone(), ws, cnt, out,
                       0.125, cap, 64, S, heads, dim)
    names = [k.name for k, *_ in launches]
    assert names == ["decode_attention_cuda"] + (["attention_combine_cuda"] if S > 1 and not counters else [])
    for kernel, grid, block, args in launches:
        name = kernel.name
        params = _parameters(name)
        assert len(args) == len(params), name
        for param, arg in zip(params, args):
            if "*" in param:
                assert isinstance(arg, torch.Tensor), (name, param)
            else:
                assert param.startswith("int ") and isinstance(arg, int), (name, param)
        assert grid == ((S, heads, b) if name == "decode_attention_cuda" else (1, heads, b))
    main = dict(zip([p.split()[-1].lstrip("*") for p in _parameters("decode_attention_cuda")], launches[0][3]))
    assert main["kv_len"] == cap and main["S"] == S and main["stride_cp"] == dim and main["P"] == heads * dim
    assert main["stride_src"] == src.stride(0) and main["stride_ob"] == heads * dim
    assert main["scale_bits"] == A.float_bits(0.125) and main["rot"] == (dim if rotary else 0)
    assert (main["cnt"] is cnt) if counters else True
    assert not A.attention(src, cos, cos, None, torch.zeros(b, dtype=torch.int64), cache, cache, ws, None, out,
                           0.125, cap, 64, A.MAX_PARTS + 1, heads, dim)  # (too many parts: the Triton kernels)


def test_the_compiled_kernels_key_holds_every_constant_compiled_in(monkeypatch):
    """MAX_PARTS sizes the combine's shared arrays (sw, sl) and attention() checks S against the module's current
    value: a kernel compiled before a sweep raised it must not serve the calls with more parts."""
    from finetune.quant import mma_gemv

    keys = []
    monkeypatch.setattr(mma_gemv, "compiled", lambda device, config, name, source, instead: keys.append(config))
    config = (torch.bfloat16, 128, 256, torch.int64, True, True, True)
    A._kernel(torch.device("cuda", 0), "decode_attention_cuda", config)
    monkeypatch.setattr(A, "MAX_PARTS", 2 * A.MAX_PARTS)
    A._kernel(torch.device("cuda", 0), "decode_attention_cuda", config)
    assert keys[0] != keys[1]


def test_a_value_cache_of_another_dtype_runs_the_triton_kernels(monkeypatch):
    """The kernel reads both caches as the query's type (elem_t); the Triton kernels cast each by its own pointer's
    type, so a V cache in another dtype than the query's (and K's) is theirs."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from finetune.inference import decode_kernels as K

    monkeypatch.setattr(A, "serves", lambda *args: True)

    def operand(dtype):
        return SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda", 0))

    pos = operand(torch.int64)
    bf16 = operand(torch.bfloat16)
    assert K._cuda_kernel(bf16, bf16, bf16, 128, pos, 128) is A
    assert K._cuda_kernel(bf16, bf16, operand(torch.float32), 128, pos, 128) is None
    assert K._cuda_kernel(bf16, operand(torch.float16), bf16, 128, pos, 128) is None


def test_calls_whose_launch_or_vector_loads_do_not_fit_run_the_triton_kernels(monkeypatch):
    """A cache whose rows are not 16-byte aligned (a view at an odd element offset) would fault the kernel's vector
    loads, and an empty grid fails cuLaunchKernel; the Triton kernels take both (attention() returns False before
    any compile or launch)."""
    monkeypatch.setattr(A, "_kernel", lambda *args: pytest.fail("compiled a kernel for a call it cannot take"))
    heads, dim, capacity = 2, 128, 64
    n = heads * capacity * dim
    flat = torch.zeros(2 * n + 8, dtype=torch.bfloat16)
    k, v = flat[:n].view(1, heads, capacity, dim), flat[n + 8:].view(1, heads, capacity, dim)
    shifted = flat[1:n + 1].view(1, heads, capacity, dim)  # (2 bytes past a 16-byte boundary)
    assert A.launchable(k, v, 1, 1, 2) and not A.launchable(shifted, v, 1, 1, 2)
    assert not A.launchable(k, v, 0, 1, 2) and not A.launchable(k, v, 1, 0, 2)
    odd = torch.zeros(1, heads, capacity + 1, dim + 4, dtype=torch.bfloat16)[:, :, :, :dim]  # key stride 132
    assert not A.launchable(odd, odd, 1, 1, 2)
    q = torch.zeros(1, heads * dim, dtype=torch.bfloat16)
    pos = torch.tensor([5])
    ws, out = torch.zeros(heads * (dim + 2)), torch.zeros(1, 1, heads * dim, dtype=torch.bfloat16)
    assert not A.attention(q, None, None, None, pos, shifted, v, ws, None, out, 0.1, capacity, 64, 1, heads, dim)
    assert not A.attention(q[:0], None, None, None, pos, k, v, ws, None, out, 0.1, capacity, 64, 1, heads, dim)


def _nvrtc():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from mma_sass import find_nvrtc

    return os.environ.get("NVRTC_LIB") or find_nvrtc()


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiled for real on the GPU machine")
def test_every_configuration_compiles_with_its_loads_ahead_of_the_math():
    """NVRTC for compute_90, Triton's ptxas for sm_90: no spills, and in the SASS every 16-byte load of a pass (K's
    and V's) comes before the first FFMA (the scores': the rotary's products are FMUL/FADD, rounded apart)."""
    nvrtc = _nvrtc()
    if importlib.util.find_spec("triton") is None or not nvrtc:
        pytest.skip("needs triton's ptxas and an NVRTC library (NVRTC_LIB, or the nvidia-cuda-nvrtc wheel)")
    from mma_sass import assemble_ptx, compile_ptx, nvidia_tools

    lib = ctypes.CDLL(nvrtc)
    configs = [(dt, dim, split, pos, rotary, rotary, combine)
               for dt in DTYPES for dim in (64, 128) for split in (64, 128, 256) for pos in (torch.int64, torch.int32)
               for rotary in (True, False) for combine in (True, False)
               if not (pos == torch.int32 and dim == 64)]  # (int32 positions once a dtype)
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            asm, cubin = assemble_ptx(compile_ptx(lib, A.kernel_source(*config), "90"), "90", Path(tmp), "attn")
            assert asm.returncode == 0, (config, asm.stderr[:1500])
            assert not re.search(r"[1-9]\d* bytes spill stores", asm.stderr), (config, asm.stderr)
            sass = subprocess.run([str(nvidia_tools() / "cuobjdump"), "-sass", str(cubin)], capture_output=True,
                                  text=True, check=True).stdout
            body = sass.split("Function : decode_attention_cuda")[1].split("Function :")[0]
            ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?P\d\s+)?([A-Z][A-Z0-9.]*)", body)
            first_fma = next(i for i, op in enumerate(ops) if op.startswith("FFMA"))
            loads = [i for i, op in enumerate(ops) if op.startswith("LDG") and ".128" in op]
            # the query's, the rotary's and the new key's loads (after the first load: the row's position, which the
            # key loads need)
            narrow = [i for i, op in enumerate(ops) if op.startswith("LDG") and ".128" not in op][1:]
            dt, dim, split = config[:3]
            eb = dt.itemsize
            threads = A.threads_for(split, dim, eb)
            a_pass = 2 * A.rounds(split, threads, dim, eb)
            passes = split // (a_pass // 2 * (threads // A.lanes_a_key(dim, eb)))
            assert len(loads) == a_pass * min(passes, 2), config  # the first pass's, then the loop's (one body)
            assert max(loads) < first_fma, config
            assert loads[a_pass - 1] < min(narrow), config  # the first pass in flight before the query is read


# -- on the GPU -----------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(rows, heads, dim, capacity, dtype, positions, seed, rot=None):
    from finetune.modeling.model import RotaryEmbedding, logn_scale

    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(rows, 1, 3 * heads * dim, device="cuda", generator=g).to(dtype)
    pos = torch.tensor(positions, device="cuda")
    cos, sin = RotaryEmbedding(dim)(pos[:, None], torch.linspace(1.0, 3.0, rows, device="cuda")[:, None])
    if rot is not None:
        cos, sin = cos[..., :rot].contiguous(), sin[..., :rot].contiguous()
    scale = logn_scale(pos[:, None] + 1, 256)
    k = torch.randn(rows, heads, capacity, dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(rows, heads, capacity, dim, device="cuda", generator=g).to(dtype)
    return qkv, cos, sin, scale, pos, k, v


def _softmax_fp64(q, k, v, pos, scale, kv_len):
    rows, heads, _, dim = q.shape
    out = torch.empty(rows, heads, dim, dtype=torch.float64, device=q.device)
    for r in range(rows):
        n = min(int(pos[r]) + 1, kv_len)
        s = torch.einsum("hd,hkd->hk", q[r, :, 0].double(), k[r, :, :n].double()) * scale
        out[r] = torch.einsum("hk,hkd->hd", torch.softmax(s, dim=1), v[r, :, :n].double())
    return out.reshape(rows, 1, heads * dim)


def _compiled_for_real(dtype):
    """Every attention kernel compiled for ``dtype`` so far is a kernel, not a failed compile's message (a failure
    only warns, and the Triton kernels run: these tests would then compare them with themselves and pass)."""
    from finetune.quant import mma_gemv

    kernels = [k for key, k in mma_gemv._kernels.items() if "attention" in key and dtype in key]
    assert kernels and not any(isinstance(k, str) for k in kernels), kernels


# (head size, rotary width, positions, kv_len, split): one row at 1 and 16 splits; rows with an empty first split's
# neighbours, split edges, a stale position past kv_len; a half-width rotary (channels past it pass through)
CASES = [(128, None, [1999], 2048, None), (128, None, [37], 64, None),
         (128, None, [0, 1, 63, 64, 255, 256, 999, 1100], 1024, 64),
         (64, 32, [5, 300, 511, 600], 512, 128), (32, None, [100, 0, 255], 256, 256)]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_attention_is_the_softmax_and_writes_what_rotary_to_cache_writes(dtype, case, switches):
    from finetune.inference import decode_kernels as K

    dim, rot, positions, kv_len, split = CASES[case]
    rows, heads, capacity = len(positions), 6, 1152 if kv_len <= 1024 else 2048
    split = split or K.key_split(rows, heads, kv_len)
    assert A.serves(torch.device("cuda"), dtype, dim, torch.int64, split)
    qkv, cos, sin, qscale, pos, k0, v0 = _inputs(rows, heads, dim, capacity, dtype, positions, case, rot)
    k1, v1 = k0.clone(), v0.clone()
    q = K.rotary_to_cache(qkv, cos, sin, qscale, k1, v1, pos, heads)  # (Triton)
    k2, v2 = k0.clone(), v0.clone()
    got = K.rotary_attention(qkv, cos, sin, qscale, k2, v2, pos, heads, dim ** -0.5, kv_len, split)
    given = K.decode_attention(q, k1, v1, pos, dim ** -0.5, kv_len, split)
    torch.cuda.synchronize()
    _compiled_for_real(dtype)
    assert torch.equal(k2, k1) and torch.equal(v2, v1)  # the new keys rotated, rounded and placed alike
    assert torch.equal(got, given)  # the same query bits, the same sums
    want = _softmax_fp64(q, k1, v1, pos, dim ** -0.5, kv_len)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=2 ** -8)
    torch.testing.assert_close(got.double(), want, **tol)
    switches(attention_cuda=False)  # the Triton kernels: the same within the rounding of the output
    k3, v3 = k0.clone(), v0.clone()
    triton = K.rotary_attention(qkv, cos, sin, qscale, k3, v3, pos, heads, dim ** -0.5, kv_len, split)
    torch.testing.assert_close(got.double(), triton.double(), **tol)
    assert torch.equal(k3, k1)


@cuda
@pytest.mark.cuda
def test_a_rows_bits_do_not_depend_on_the_batch_it_is_in(monkeypatch):
    """Row 0 alone (its parts combined by the launch's last CTA) and among 40 rows (more CTAs than
    ONE_LAUNCH_PROGRAMS: the combine kernel after the launch): the same bits, and the counters left at zero (a
    graph's replays equal the eager call)."""
    from finetune.inference import decode_kernels as K

    heads, dim, kv_len = 8, 128, 2048
    positions = [1500] + [100 + 37 * i for i in range(39)]
    qkv, cos, sin, qscale, pos, k0, v0 = _inputs(40, heads, dim, kv_len, torch.bfloat16, positions, 7)
    split = 128  # 16 splits a row: 128 CTAs alone, 5,120 among 40 rows
    monkeypatch.setattr(K, "ONE_LAUNCH_PROGRAMS", 1024)
    alone = K.rotary_attention(qkv[:1], cos[:1], sin[:1], qscale[:1], k0[:1].clone(), v0[:1].clone(), pos[:1],
                               heads, dim ** -0.5, kv_len, split)
    batch = K.rotary_attention(qkv, cos, sin, qscale, k0.clone(), v0.clone(), pos, heads, dim ** -0.5, kv_len, split)
    torch.cuda.synchronize()
    _compiled_for_real(torch.bfloat16)
    assert torch.equal(batch[:1], alone)
    k1, v1 = k0[:1].clone(), v0[:1].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = K.rotary_attention(qkv[:1], cos[:1], sin[:1], qscale[:1], k1, v1, pos[:1], heads, dim ** -0.5,
                                      kv_len, split)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, alone)
        assert not K._counters(qkv.device, heads).any()  # (each replay leaves them zero, as the eager call)


@cuda
@pytest.mark.cuda
def test_a_new_key_length_with_a_known_split_compiles_nothing():
    """The kernels are keyed by the key split and the way the parts are combined, not by the length: a graph
    captured at a new covering length needs no compile (none can happen inside a capture: the Triton kernels would
    run that step)."""
    from finetune.inference import decode_kernels as K
    from finetune.quant import mma_gemv

    heads, dim = 40, 128
    k_cache = torch.zeros(1, heads, 8192, dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    qkv = torch.zeros(1, 1, 3 * heads * dim, device="cuda", dtype=torch.bfloat16)
    cos, sin = torch.ones(1, 1, dim, device="cuda"), torch.zeros(1, 1, dim, device="cuda")

    def step(kv_len):
        K.rotary_attention(qkv, cos, sin, None, k_cache, v_cache, torch.tensor([kv_len - 1], device="cuda"), heads,
                           0.1, kv_len)
        return K.key_split(1, heads, kv_len)

    seen = {step(n) for n in (256, 512, 1024, 2048, 4096, 8192)}  # splits 64, 128, 256; 8192: the combine kernel
    compiled = {key for key in mma_gemv._kernels if "attention" in key}
    assert seen == {64, 128, 256} and len(compiled) >= 4
    _compiled_for_real(torch.bfloat16)
    assert {step(n) for n in (264, 1000, 2056, 3000, 7000)} <= seen  # (7000: 28 splits, the combine kernel again)
    torch.cuda.synchronize()
    assert {key for key in mma_gemv._kernels if "attention" in key} == compiled
