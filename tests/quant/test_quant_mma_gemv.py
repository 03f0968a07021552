"""The tensor-core decode GEMV's weight layout (finetune/quant/mma_gemv.py), on the CPU: the repacked weight read
back the way the kernel reads its mma fragments gives the layer's exact product. The kernel itself runs in
tests/quant/test_quant_cuda.py."""

import pytest
import torch

from finetune.quant import mma_gemv as G
from finetune.quant.packing import dequantize_t

from _helpers import random_packed


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("group_size", [128, 256])
def test_repacked_weight_read_as_fragments_gives_the_exact_product(desc_act, v2, group_size):
    layer = random_packed(512, 48, group_size=group_size, desc_act=desc_act, v2=v2, seed=5)
    exact = dequantize_t(**layer, bits=4, v2=v2, dtype=torch.float64)  # [K, N]
    wpack, scales, qzeros, zero_add, perm = G.repack(**layer, v2=v2, group_size=group_size)
    assert wpack.dtype == torch.int32 and wpack.shape == (48 // 16, 512 // 128, 32, 8)
    assert zero_add == (0 if v2 else 1) and (perm is not None) == desc_act
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xk = x if perm is None else x[:, perm]
    y = G.emulate(xk.float(), wpack, scales, qzeros, zero_add, group_size)
    ref = x @ exact
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_two_layers_side_by_side_give_both_products_and_each_a_view():
    # w1 and w2 of a decode step as one launch: outputs 0..47 the first layer's, 48..111 the second's
    first = random_packed(512, 48, seed=5)
    second = random_packed(512, 64, seed=6)
    a, b = G.repack(**first, v2=False), G.repack(**second, v2=False)
    wpack, scales, qzeros, zero_add, perm = G.side_by_side(a, b)
    assert wpack.shape == (7, 4, 32, 8) and scales.shape == (4, 112) and qzeros.shape == (4, 14) and perm is None
    assert torch.equal(wpack[:3], a[0]) and torch.equal(wpack[3:], b[0]) and wpack[3:].is_contiguous()
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(2))
    y = G.emulate(x, wpack, scales, qzeros, zero_add, 128)
    assert torch.equal(y[:, :48], G.emulate(x, *a[:4], 128)) and torch.equal(y[:, 48:], G.emulate(x, *b[:4], 128))
    # only layers that read the same inputs in the same order and zero convention pair up
    assert G.side_by_side(a, G.repack(**random_packed(512, 32, desc_act=True, seed=7), v2=False)) is None
    assert G.side_by_side(a, G.repack(**second, v2=True)) is None
    assert G.side_by_side(a, G.repack(**random_packed(256, 64, seed=8), v2=False)) is None


def test_every_nibble_lands_in_its_own_place():
    """A weight with distinct values in every (k, n) position (mod 16) in each word: a permutation mistake in
    the layout would move some of them."""
    K, N = 256, 32
    q = (torch.arange(K).view(K, 1) * 7 + torch.arange(N).view(1, N) * 3) % 16
    from finetune.quant.packing import pack_cols, pack_rows

    layer = {"qweight": pack_rows(q, 4), "qzeros": pack_cols(torch.zeros(K // 128, N, dtype=torch.long), 4),
             "scales": torch.ones(K // 128, N, dtype=torch.float16), "g_idx": torch.arange(K, dtype=torch.int32) // 128}
    wpack, scales, qzeros, zero_add, _ = G.repack(**layer, v2=True, group_size=128)
    for k, n in [(0, 0), (1, 0), (2, 0), (3, 0), (4, 1), (31, 8), (32, 9), (127, 15), (128, 16), (255, 31)]:
        x = torch.zeros(1, K)
        x[0, k] = 1
        y = G.emulate(x, wpack, scales, qzeros, zero_add, 128)
        assert y[0, n].item() == q[k, n].item()


def test_unsupported_layers_say_why():
    assert "4-bit" in G.unsupported(256, 32, 8, 128)
    assert "multiple of 16" in G.unsupported(256, 40, 4, 128)
    assert "multiple of 128" in G.unsupported(200, 32, 4, 128)
    assert "group size 64" in G.unsupported(256, 32, 4, 64)
    assert G.unsupported(13696, 5120, 4, 128) is None
    uneven = torch.tensor([0] * 100 + [1] * 156, dtype=torch.int32)
    assert "g_idx" in G.unsupported(256, 32, 4, 128, uneven)


def test_a_kernel_that_does_not_compile_is_reported_once_and_left_to_the_other_kernels(monkeypatch):
    """NVRTC missing or refusing the source: one warning, the reason kept (no retry, no exception into the
    model's forward), and compile_error says why so that no repacked copy is made."""
    monkeypatch.setattr(G, "_kernels", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    calls = []

    def failing(device, source, name):
        calls.append(source)
        raise RuntimeError("Kernel compilation failed:\nno libnvrtc")

    monkeypatch.setattr(G, "_compile", failing)
    device = torch.device("cuda", 0)
    with pytest.warns(UserWarning, match="did not compile .*no libnvrtc"):
        why = G.compile_error(device, 128)
    assert "RuntimeError" in why and len(calls) == 1
    assert G.compile_error(device, 128) == why and len(calls) == 1  # kept: not compiled again


def test_the_low_rank_epilogue_takes_rank_sums_that_fit_its_shared_memory():
    """lora_unfit: the epilogue's operands sit in shared memory sized for LORA_MAX_RANK, so a larger rank sum (three
    r=64 adapters) is left to the engine's hook, which adds it with its own kernels; so are misshapen inputs."""
    def operands(M, K, N, R, dtype=torch.bfloat16):
        return torch.zeros(K, R, dtype=dtype), torch.zeros(M, R, dtype=dtype), torch.zeros(N, R, dtype=dtype)

    assert G.LORA_MAX_RANK == 128
    assert G.lora_unfit(operands(1, 256, 64, 128), 1, 256, 64) is None
    assert G.lora_unfit(operands(32, 256, 64, 64), 32, 256, 64) is None
    assert "at most 128" in G.lora_unfit(operands(1, 256, 64, 192), 1, 256, 64)
    assert "rank sum 12" in G.lora_unfit(operands(1, 256, 64, 12), 1, 256, 64)
    assert "bt" in G.lora_unfit(operands(1, 256, 32, 64), 1, 256, 64)
    assert "a " in G.lora_unfit(operands(1, 128, 64, 64), 1, 256, 64)  # A's rows are x's inputs
    assert "sel" in G.lora_unfit(operands(2, 256, 64, 64), 1, 256, 64)
    assert "a " in G.lora_unfit(operands(1, 256, 64, 64, torch.float32), 1, 256, 64)
    # two layers side by side (w1 and w2 as one launch): each its own bt, the first's outputs a multiple of 16 tiles
    M, K, R1, R2 = 2, 256, 16, 8
    sel, h = torch.zeros(M, R1 + R2, dtype=torch.bfloat16), torch.zeros(M, R1 + R2, dtype=torch.bfloat16)

    def pair(n1, n2, r1=R1, r2=R2):
        return None, sel, (torch.zeros(n1, r1, dtype=torch.bfloat16), torch.zeros(n2, r2, dtype=torch.bfloat16)), h

    assert G.lora_unfit(pair(48, 64), M, K, 112) is None
    assert "bt1 (40, 16) and bt2 (72, 8)" in G.lora_unfit(pair(40, 72), M, K, 112)  # a tile would hold both
    assert "bt1 (112, 16)" in G.lora_unfit(pair(112, 0), M, K, 112)  # no second layer
    assert "bt2 (48, 8)" in G.lora_unfit(pair(48, 48), M, K, 112)  # the outputs are not all covered
    assert "sel" in G.lora_unfit(pair(48, 64, 8, 8), M, K, 112)  # sel's R is the ranks' sum (16 here)
    assert "two 2-d tensors" in G.lora_unfit((None, sel, (torch.zeros(48, 16),), h), M, K, 112)
    assert "bt1" in G.lora_unfit((None, sel, (torch.zeros(48, 16), torch.zeros(64, 8, dtype=torch.bfloat16)), h),
                                 M, K, 112)  # fp32
    src = G.kernel_source(8, 1, 1, 128, lora=True)
    assert "#define LRMAX 128" in src and "__" + "LRMAX__" not in src
    assert f"#define H_EMPTY 0x{G.H_EMPTY:X}u" in src  # the h buffer's fill (lora_workspace) is what the kernel polls


def test_the_lora_producers_read_about_32_kib_of_a_each():
    """h = x A is computed by the LoRA build's first CTAs, each a range of A's rows: ~32 KB of A a CTA (all its
    loads in flight at once), at least one; the 14B shapes at r=64 get 20 (K 5,120) and 54 (K 13,696)."""
    assert G.lora_producers(5120, 64) == 20 and G.lora_producers(13696, 64) == 54
    assert G.lora_producers(5120, 128) == 40 and G.lora_producers(128, 8) == 1
    for K, R in ((5120, 64), (13696, 72), (4096, 8), (11008, 128)):
        P = G.lora_producers(K, R)
        assert (K / P) * R * 2 <= 32 * 1024 < (K / max(P - 1, 1)) * R * 2 or P == 1


def test_the_bias_epilogue_takes_a_contiguous_bf16_vector_of_the_outputs():
    G.check_bias(None, 64, torch.device("cpu"), "mma_gemv")
    G.check_bias(torch.zeros(64, dtype=torch.bfloat16), 64, torch.device("cpu"), "mma_gemv")
    for bad, why in [(torch.zeros(63, dtype=torch.bfloat16), r"\(63,\) torch.bfloat16"),
                     (torch.zeros(64, dtype=torch.float16), "torch.float16"),
                     (torch.zeros(128, dtype=torch.bfloat16)[::2], "expected a contiguous bf16 \\(64,\\)")]:
        with pytest.raises(ValueError, match="mma_gemm bias: .*" + why):
            G.check_bias(bad, 64, torch.device("cpu"), "mma_gemm")


def test_grown_workspaces_stay_alive_for_graphs_captured_before(monkeypatch):
    """A larger split-K or LoRA workspace replaces the device's current one outside graph capture; the old buffers
    are kept (a graph captured earlier launches its kernels on them), and inside a capture nothing is allocated."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(G, "_workspaces", {})
    monkeypatch.setattr(G, "_retired", [])
    cpu = torch.device("cpu", 0)  # (an index: the workspaces are kept per device index)
    small = G.workspace(cpu, 2, 1, 64)
    assert G.workspace(cpu, 2, 1, 64) is small and G._retired == []
    big = G.workspace(cpu, 8, 32, 1 << 16)  # more than the first allocation holds
    assert big is not small and big[0].numel() >= 8 * 32 * (1 << 16) and G._retired == [small]
    lora = G.lora_workspace(cpu, 2, 1, 64)
    assert bool((lora[1].view(torch.int16) == G.H_EMPTY - 0x10000).all()) and int(lora[2].sum()) == 0
    assert G.lora_workspace(cpu, 107, 32, 128) is lora  # 2 adapters of r=64 at 32 rows on K 13,696: made large
    grown = G.lora_workspace(cpu, 300, 32, 128)  # K beyond 32,768
    assert grown[0].numel() >= 300 * 32 * 128 and G._retired == [small, lora]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert G.workspace(cpu, 16, 32, 1 << 17) is None and G.lora_workspace(cpu, 500, 32, 128) is None


def test_kernel_args_match_the_kernels_parameters():
    """One list builder serves mma_gemv and the timeline scripts: as many arguments as the kernel declares, with
    x's row stride, the rank sum and the producer count where the kernel reads them."""
    src = G.kernel_source(8, 1, 1, 128, lora=True)
    sig = src[src.index("gptq_mma_gemv("):]
    params = [p.strip() for p in sig[len("gptq_mma_gemv("):sig.index(") {")].split(",")]
    x = torch.zeros(3, 256, dtype=torch.bfloat16)[:, :128]  # a row stride of 256
    out = torch.zeros(3, 64, dtype=torch.bfloat16)
    w = torch.zeros(1, dtype=torch.int32)
    plain = G.kernel_args(x, w, w, w, 1, out)
    a, sel, bt = torch.zeros(128, 24), torch.zeros(3, 24), torch.zeros(64, 24)
    lora = G.kernel_args(x, w, w, w, 1, out, lora=(x, a, sel, bt, 5, w, w, w), bias=out[0])
    assert len(plain) == len(lora) == len(params)
    named = dict(zip([p.split()[-1] for p in params], lora))
    assert (named["M"], named["N"], named["K"], named["x_stride"], named["lx_stride"]) == (3, 64, 128, 256, 256)
    assert (named["R"], named["P"], named["has_bias"]) == (24, 5, 1) and named["la"] is a and named["lbt"] is bt
    assert dict(zip([p.split()[-1] for p in params], plain))["P"] == 0  # no producers in the plain build


def test_a_shape_with_its_own_measured_config_gets_it_and_others_their_row_blocks():
    for (mb, K, N), cfg in G.SHAPE_CONFIGS.items():
        assert G.config_for(8 * mb, K, N) == cfg and G.config_for(8 * mb - 7, K, N) == cfg and len(cfg) == 3
    assert G.config_for(1, 5120, 15360) == (4, 1, 4)  # Qwen-14B's c_attn at one row (NOTES step 73)
    assert G.config_for(1, 5120, 2 * 13696) == (4, 1, 4)  # its w1 and w2 side by side, one launch (step 74)
    assert G.config_for(8, 5120, 13696) == (4, 1, 4)  # w1 or w2 alone (an adapter's epilogue: not paired; step 75)
    assert G.config_for(1, 5120, 5120) == G.CONFIGS[1]  # attn.c_proj: the row blocks' own
    assert G.config_for(1, 13696, 5120) == (4, 1, 6)  # mlp.c_proj: three splits, ~0.9 of a wave (step 100)
    assert G.config_for(8, 13696, 5120, low_rank=True) == G.CONFIGS[1]  # ... not with an adapter's epilogue
    assert G.config_for(1, 5120, 15360, low_rank=True) == (4, 1, 4)  # the LoRA build shares the other entries
    assert G.config_for(9, 5120, 15360) == G.CONFIGS[2]  # c_attn at 9-16 rows was not measured apart
    assert G.config_for(1, 4096, 12288) == G.CONFIGS[1]  # a Qwen-7B shape
