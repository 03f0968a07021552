"""The fused decode GEMV (``finetune/quant/triton_gemv.py``) on the CPU, and GPTQLinear's routing to it.

- Routing (no triton needed): GPTQLinear.forward sends <= 64 rows that need no autograd graph to
  ``linear.gptq_gemv`` and everything else to GPTQMatmul (Triton's availability is faked, the kernels are
  replaced by torch references).
- The kernel itself through Triton's interpreter (skipped where triton is not importable, e.g. CI; the GPU
  tests in test_quant_cuda.py cover it compiled). The interpreter is chosen when a ``@triton.jit`` function
  is decorated, triton's own library functions (tl.sum, ...) at triton's import, which torch._dynamo does
  early in a test session: run ``TRITON_INTERPRET=1 python -m pytest tests/quant/test_quant_gemv_interpret.py``
  (without it these tests skip). The test loads a private copy of triton_gemv.py, so the real module is
  never imported in interpreter mode; it skips on a machine with a GPU, whose triton must stay compiled.

Two limits of the interpreter shape the reference here: its fp32 -> bf16 cast truncates instead of rounding
to nearest (numpy has no bf16), so for bf16 the reference truncates too (the GPU tests check round to
nearest); and its tl.dot multiplies bf16 operands as raw uint16 bits, so the tensor-core (USE_DOT) configs
are checked here in fp16 and fp32 only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.quant import GPTQLinear, quantize_weight
from finetune.quant import linear as qlinear
from finetune.quant.packing import dequantize_t

from _helpers import ROOT, load_interpreted, random_packed

GEMV_PY = ROOT / "finetune" / "quant" / "triton_gemv.py"
# relative error (norm of the difference / norm of the reference) allowed by dtype: only the summation order
# differs from the reference (the output rounding then differs by one ulp on rare elements)
TOL = {torch.bfloat16: 2e-3, torch.float16: 1e-3, torch.float32: 1e-5}


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


# -- routing in GPTQLinear.forward (plain torch, no triton) -----------------------------------------------------
@pytest.fixture
def routed(monkeypatch, switches):
    """GPTQLinear on the CPU as if Triton were usable: gptq_gemv and the dequantization are torch references;
    returns the list of x2d shapes the GEMV received."""
    calls = []

    def fake_gemv(x2d, qweight, qzeros, scales, g_idx, bits, v2, group_size=None, trivial_g_idx=None):
        assert x2d.dim() == 2
        calls.append((tuple(x2d.shape), x2d.dtype))
        wt = dequantize_t(qweight, qzeros, scales, g_idx, bits, v2=v2, dtype=x2d.dtype)
        return (x2d.double() @ wt.double()).to(x2d.dtype)

    def torch_dequant(qweight, qzeros, scales, g_idx, bits, v2, dtype, group_size=None, trivial_g_idx=None):
        return dequantize_t(qweight, qzeros, scales, g_idx, bits, v2=v2, dtype=dtype)

    monkeypatch.setattr(qlinear, "_use_triton", lambda device: True)
    monkeypatch.setattr(qlinear, "gptq_gemv", fake_gemv)
    monkeypatch.setattr(qlinear, "dequantize_weight_t", torch_dequant)
    switches(gptq_gemv=True)
    return calls


def _layer(in_f=256, out_f=96, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = quantize_weight(torch.randn(out_f, in_f, generator=g), bits=4, group_size=64)
    b = torch.randn(out_f, generator=g) * 0.1 if bias else None
    return GPTQLinear.from_quantized(**p, bias=b, bits=4, group_size=64)


@pytest.mark.parametrize("shape", [(256,), (1, 256), (1, 1, 256), (2, 4, 256), (3, 256)])
def test_decode_rows_without_grad_use_the_gemv(routed, shape):
    layer = _layer()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))  # torch's own seed differs every run
    with torch.no_grad():
        y = layer(x)
    rows = x.numel() // 256
    assert routed == [((rows, 256), torch.float32)]
    assert y.shape == (*shape[:-1], 96)
    ref = F.linear(x, layer.dequantize(torch.float32), layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_gemv_also_without_no_grad_when_input_needs_no_grad(routed):
    layer = _layer()
    layer(torch.randn(1, 256))  # grad mode on, but x does not require grad: no graph needed
    with torch.no_grad():
        layer(torch.randn(1, 256, requires_grad=True))
    with torch.inference_mode():
        layer(torch.randn(1, 256))
    assert len(routed) == 3


def test_rows_needing_a_graph_or_too_many_rows_or_switched_off_use_gptq_matmul(routed, monkeypatch, switches):
    layer = _layer()
    x = torch.randn(1, 256, requires_grad=True)
    y = layer(x)  # needs the autograd graph
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        layer(torch.randn(65, 256))  # more than GEMV_MAX_ROWS
        layer(torch.randn(1, 256, dtype=torch.float64))  # a dtype the kernel does not take
    switches(gptq_gemv=False)
    with torch.no_grad():
        layer(torch.randn(1, 256))
    assert routed == []


def test_gemv_keeps_the_autocast_dtype_and_bias(routed):
    layer = _layer()
    x = torch.randn(2, 256)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert routed == [((2, 256), torch.bfloat16)]
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.to(torch.bfloat16).float(), layer.dequantize(torch.bfloat16).float(), layer.bias.float())
    assert _rel_err(y, ref) < 1e-2


# -- the kernel through Triton's interpreter -------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemv():
    """A private copy of triton_gemv.py whose kernels run in Triton's interpreter (see load_interpreted)."""
    with pytest.MonkeyPatch.context() as mp:
        mod = load_interpreted(GEMV_PY, "_triton_gemv_interpreted", mp)
        assert mod._INTERPRET, "the kernel was not built for the interpreter"
        yield mod


def _trunc_bf16(t):
    """fp32 -> bf16 by truncation, as the interpreter casts (returned as the exact fp32 value)."""
    return (t.float().contiguous().view(torch.int32) & -65536).view(torch.float32)


def _reference(x, p, bits, v2):
    """x @ W.T with W rounded to x's dtype, summed in float64, rounded once (bf16: truncated, see above)."""
    w = dequantize_t(**p, bits=bits, v2=v2, dtype=torch.float32)
    w = _trunc_bf16(w) if x.dtype == torch.bfloat16 else w.to(x.dtype).float()
    y = (x.double() @ w.double()).float()
    return _trunc_bf16(y) if x.dtype == torch.bfloat16 else y.to(x.dtype).float()


# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, USE_DOT); None = the module's default (interpreter) config
CONFIGS = [None, (16, 64, 1, 2, False), (32, 32, 0, 4, False), (32, 64, 3, 4, True), (32, 64, 0, 2, False, True),
           (64, 32, -8, 4, False, True)]


@pytest.mark.parametrize("in_f,out_f", [(256, 72), (136, 8)])
@pytest.mark.parametrize("bits,group_size,desc_act,v2", [
    (4, 128, False, False), (4, 32, False, True), (4, -1, True, False), (8, 128, True, True), (8, -1, False, False),
])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "default" if c is None else "-".join(map(str, c)))
def test_interpreted_gemv_equals_dequantized_matmul(gemv, in_f, out_f, bits, group_size, desc_act, v2, config):
    p = random_packed(in_f, out_f, bits, group_size, desc_act, v2, seed=bits + in_f)
    g = torch.Generator().manual_seed(1)
    for m, dtype in ((1, torch.bfloat16), (3, torch.float16), (8, torch.float32), (2, torch.bfloat16),
                     (20, torch.float16)):
        if m > 8 and not (config is not None and config[4]):
            continue  # more than 8 rows: the tensor-core (small-M GEMM) configs only
        if config is not None and config[4] and dtype == torch.bfloat16:
            continue  # the interpreter's tl.dot cannot take bf16 (module doc)
        x = torch.randn(m, in_f, generator=g).to(dtype)
        y = gemv.triton_gemv(x, **p, bits=bits, v2=v2, group_size=group_size, trivial_g_idx=not desc_act,
                             config=config)
        assert y.shape == (m, out_f) and y.dtype == dtype
        err = _rel_err(y, _reference(x, p, bits, v2))
        assert err < TOL[dtype], (m, dtype, err)


def test_interpreted_gemv_rejects_bad_inputs(gemv):
    p = random_packed(64, 16)
    with pytest.raises(ValueError, match="rows"):
        gemv.triton_gemv(torch.randn(65, 64), **p, bits=4, trivial_g_idx=True)
    with pytest.raises(ValueError, match="inputs"):
        gemv.triton_gemv(torch.randn(1, 32), **p, bits=4, trivial_g_idx=True)
    with pytest.raises(TypeError, match="fp32"):
        gemv.triton_gemv(torch.randn(1, 64, dtype=torch.float64), **p, bits=4, trivial_g_idx=True)


@pytest.mark.parametrize("desc_act", [False, True])
def test_interpreted_gemv_even_n_without_n_masks(gemv, desc_act):
    """N a multiple of BLOCK_N (every Qwen shape): the kernel drops its N masks (EVEN_N) and stays exact."""
    p = random_packed(256, 64, 4, 32, desc_act, False, seed=7)
    g = torch.Generator().manual_seed(2)
    for config in [(32, 32, 2, 4, False, True), (32, 64, 0, 4, False, False), (32, 64, 1, 4, True, False)]:
        for m in (1, 3, 20):
            if m > 8 and not config[4]:
                continue
            x = torch.randn(m, 256, generator=g)
            y = gemv.triton_gemv(x, **p, bits=4, group_size=32, trivial_g_idx=not desc_act, config=config)
            assert _rel_err(y, _reference(x, p, 4, False)) < TOL[torch.float32], (config, m)


# -- the second design (("fma" | "dot", BLOCK_N, BLOCK_K, SPLIT_K, num_warps) configs) ---------------------------
# BLOCK_K 32..128 against groups of 12 (a group per input row), 32 (per word), 128 / all of K (per K block);
# SPLIT_K fixed (1, 3) and per SM (-8: as many splits as K allows); BLOCK_N above and below N
CONFIGS2 = [("fma", 32, 64, -8, 4), ("fma", 16, 128, 1, 2), ("fma", 64, 32, 3, 4), ("dot", 32, 128, 2, 4),
            ("dot", 16, 128, -8, 4)]
LAYOUTS2 = [(4, 128, False, False), (4, 32, False, True), (4, 12, False, False), (4, -1, True, False),
            (8, 128, True, True), (8, -1, False, False)]


@pytest.mark.parametrize("bits,group_size,desc_act,v2", LAYOUTS2, ids=lambda v: str(v))
@pytest.mark.parametrize("config", CONFIGS2, ids=lambda c: "-".join(map(str, c)))
def test_interpreted_gemv2_equals_dequantized_matmul(gemv, bits, group_size, desc_act, v2, config):
    """136 -> 8: N below every BLOCK_N and K not a multiple of BLOCK_K (masks on both), 1..20 rows."""
    p = random_packed(136, 8, bits, group_size, desc_act, v2, seed=bits + group_size)
    g = torch.Generator().manual_seed(3)
    for m, dtype in ((1, torch.bfloat16), (1, torch.float32), (3, torch.float16), (8, torch.float32),
                     (20, torch.float16)):
        if config[0] == "dot" and dtype == torch.bfloat16:
            continue  # the interpreter's tl.dot cannot take bf16 (module doc)
        if m > 8 and config[0] != "dot":
            continue  # more than 8 rows: the tensor-core configs only (the fma ones would run, but slowly)
        x = torch.randn(m, 136, generator=g).to(dtype)
        y = gemv.triton_gemv(x, **p, bits=bits, v2=v2, group_size=group_size, trivial_g_idx=not desc_act,
                             config=config)
        assert y.shape == (m, 8) and y.dtype == dtype
        err = _rel_err(y, _reference(x, p, bits, v2))
        assert err < TOL[dtype], (m, dtype, err)


@pytest.mark.parametrize("config", [("fma", 32, 64, 3, 4), ("dot", 32, 128, 2, 4)], ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_gemv2_dequantizes_every_weight_exactly(gemv, config, dtype):
    """x = rows of the identity: y is W.T itself, and must equal dequantize_t's weight rounded to x's dtype bit
    for bit (the one-fma dequantization is exact, not just close)."""
    bits, group_size = (4, 32) if config[0] == "fma" else (8, 128)
    p = random_packed(256, 64, bits, group_size, False, False, seed=11)
    wt = dequantize_t(**p, bits=bits, dtype=dtype)
    eye = torch.eye(256, dtype=dtype)
    for start in range(0, 256, 64):
        rows = eye[start:start + 8]
        y = gemv.triton_gemv(rows, **p, bits=bits, group_size=group_size, trivial_g_idx=True, config=config)
        assert torch.equal(y, wt[start:start + 8])


def test_interpreted_gemv2_split_k_is_deterministic_and_resets_its_counters(gemv):
    p = random_packed(512, 64, 4, 128, False, False, seed=12)
    x = torch.randn(2, 512)
    config = ("fma", 32, 32, 4, 4)  # 2 N blocks x 4 splits
    first = gemv.triton_gemv(x, **p, bits=4, group_size=128, trivial_g_idx=True, config=config)
    counters = gemv._COUNTERS[("cpu", None)]
    assert int(counters.abs().sum()) == 0  # the last program of each N block reset its counter
    again = gemv.triton_gemv(x, **p, bits=4, group_size=128, trivial_g_idx=True, config=config)
    assert torch.equal(first, again)
    assert _rel_err(first, _reference(x, p, 4, False)) < TOL[torch.float32]


def test_interpreted_gemv2_even_n(gemv):
    """N a multiple of BLOCK_N: no N masks (EVEN_N), each K block in one group, several N blocks and splits."""
    p = random_packed(512, 128, 4, 128, False, False, seed=13)
    g = torch.Generator().manual_seed(4)
    for config in [("fma", 32, 64, -8, 4), ("dot", 64, 128, 2, 4)]:
        for m in (1, 5):
            x = torch.randn(m, 512, generator=g)
            y = gemv.triton_gemv(x, **p, bits=4, group_size=128, trivial_g_idx=True, config=config)
            assert _rel_err(y, _reference(x, p, 4, False)) < TOL[torch.float32], (config, m)


@pytest.mark.parametrize("m", [1, 3, 20])
def test_interpreted_every_listed_config(gemv, m):
    """Every config the tuner may pick for m rows (both designs) is valid and exact on a small layer."""
    p = random_packed(256, 72, 4, 128, False, False, seed=14)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    ref = _reference(x, p, 4, False)
    for config in gemv.configs_for(m):
        y = gemv.triton_gemv(x, **p, bits=4, group_size=128, trivial_g_idx=True, config=config)
        assert _rel_err(y, ref) < TOL[torch.float16], config


def test_interpreted_gemv2_rejects_bad_configs(gemv):
    p = random_packed(256, 64)
    x = torch.randn(1, 256)
    with pytest.raises(ValueError, match="kind"):
        gemv.triton_gemv(x, **p, bits=4, trivial_g_idx=True, config=("wmma", 32, 64, 1, 4))
    with pytest.raises(ValueError, match="BLOCK_K >= 128"):
        gemv.triton_gemv(x, **p, bits=4, trivial_g_idx=True, config=("dot", 32, 64, 1, 4))
    with pytest.raises(ValueError, match="powers of two"):
        gemv.triton_gemv(x, **p, bits=4, trivial_g_idx=True, config=("fma", 48, 64, 1, 4))
