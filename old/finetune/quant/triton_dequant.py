"""Triton kernel: GPTQ packed weights -> W.T [in, out] in bf16/fp16/fp32 (CUDA only).

Imported lazily by ``linear.py`` only when a CUDA tensor is dequantized, so CPU code never imports triton.
The kernel is bandwidth bound: it reads the packed int32 words (0.5 byte per weight at 4 bits), the zero
points and scales, and writes the float W.T once (2 bytes per weight in bf16). The output layout W.T
[in, out] matches qweight's [in/8, out] so both reads and writes are contiguous along ``out``; a matmul
reads it as ``x @ W.T`` (forward) and ``grad_y @ W`` (backward) without copies.

Arithmetic matches ``packing.dequantize_t`` exactly: (q - zero) as an integer, times the fp16 scale in
fp32 (exact), rounded once to the output dtype.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from ..settings import settings

# (BLOCK_K, BLOCK_N, num_warps) candidates; the best per (K, N, bits, g_idx kind, dtype) is picked once by
# timing (our own small tuner: triton.autotune's per-launch Python overhead was measurable at these sizes).
_CONFIGS = [
    (32, 256, 4),
    (64, 128, 4),
    (64, 256, 8),
    (128, 128, 8),
    (128, 256, 8),
]
_INTERPRET_CONFIG = (32, 32, 4)  # TRITON_INTERPRET=1 (CPU): small blocks, no tuning
_BEST: dict = {}
_COMPILED: dict = {}


@triton.jit
def _dequant_t_kernel(
    qweight_ptr,
    qzeros_ptr,
    scales_ptr,
    g_idx_ptr,
    out_ptr,
    K,
    N,
    stride_qw,
    stride_qz,
    stride_s,
    stride_o,
    BITS: tl.constexpr,
    V2: tl.constexpr,
    TRIVIAL_G: tl.constexpr,  # g_idx[k] == k // GROUP_SIZE (no desc_act reordering)
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_k = offs_k < K
    mask_n = offs_n < N
    mask = mask_k[:, None] & mask_n[None, :]

    # quantized values: word (k // PER, n), bits (k % PER) * BITS .. +BITS
    packed = tl.load(qweight_ptr + (offs_k // PER)[:, None] * stride_qw + offs_n[None, :], mask=mask, other=0)
    shift_k = ((offs_k % PER) * BITS).to(tl.int32)
    q = (packed >> shift_k[:, None]) & MASK

    shift_n = ((offs_n % PER) * BITS).to(tl.int32)
    if TRIVIAL_G and (GROUP_SIZE % BLOCK_K == 0):
        # the whole row block lies in one group: load one row of zeros and scales, broadcast
        g = (pid_k * BLOCK_K) // GROUP_SIZE
        zw = tl.load(qzeros_ptr + g * stride_qz + offs_n // PER, mask=mask_n, other=0)
        z = (zw >> shift_n) & MASK
        s = tl.load(scales_ptr + g * stride_s + offs_n, mask=mask_n, other=0.0)
        if not V2:
            z = z + 1
        w = (q - z[None, :]).to(tl.float32) * s.to(tl.float32)[None, :]
    else:
        g = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0).to(tl.int64)
        zw = tl.load(qzeros_ptr + g[:, None] * stride_qz + (offs_n // PER)[None, :], mask=mask, other=0)
        z = (zw >> shift_n[None, :]) & MASK
        s = tl.load(scales_ptr + g[:, None] * stride_s + offs_n[None, :], mask=mask, other=0.0)
        if not V2:
            z = z + 1
        w = (q - z).to(tl.float32) * s.to(tl.float32)

    tl.store(out_ptr + offs_k[:, None] * stride_o + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# g_idx triviality is checked once per g_idx tensor object (one host sync), then cached by object identity
# and version counter (an in-place change such as a checkpoint copy_ bumps the version).
_TRIVIAL_CACHE: dict = {}


def _g_idx_trivial(g_idx: torch.Tensor, group_size: int) -> bool:
    entry = _TRIVIAL_CACHE.get(id(g_idx))
    if entry is not None:
        ref, version, gs, hit = entry
        if ref() is g_idx and version == g_idx._version and gs == group_size:
            return hit
    expected = torch.arange(g_idx.shape[0], device=g_idx.device, dtype=torch.int32) // group_size
    hit = bool(torch.equal(g_idx.to(torch.int32), expected))
    if len(_TRIVIAL_CACHE) > 4096:
        _TRIVIAL_CACHE.clear()
    _TRIVIAL_CACHE[id(g_idx)] = (weakref.ref(g_idx), g_idx._version, group_size, hit)
    return hit


def triton_dequantize_t(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    v2: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    group_size: int | None = None,
    trivial_g_idx: bool | None = None,
) -> torch.Tensor:
    """W.T [in, out] contiguous in ``dtype`` from GPTQ buffers on one CUDA device."""
    index = qweight.device.index
    if index is not None and index != torch.cuda.current_device():  # triton launches on the current device
        with torch.cuda.device(index):
            return triton_dequantize_t(qweight, qzeros, scales, g_idx, bits, v2, dtype, out, group_size,
                                       trivial_g_idx)
    K = g_idx.shape[0]
    N = scales.shape[1]
    groups = scales.shape[0]
    if group_size is None or group_size <= 0:
        group_size = K if groups == 1 else -(-K // groups)
    if trivial_g_idx is None:
        trivial = _g_idx_trivial(g_idx, group_size)  # before .contiguous(), which may copy
    else:
        trivial = bool(trivial_g_idx)
    qweight = qweight.contiguous()
    qzeros = qzeros.contiguous()
    scales = scales.contiguous()
    g_idx = g_idx.contiguous()
    if out is None:
        out = torch.empty(K, N, dtype=dtype, device=qweight.device)

    args = (qweight, qzeros, scales, g_idx, out, K, N, qweight.stride(0), qzeros.stride(0), scales.stride(0),
            out.stride(0), bits, bool(v2), trivial, group_size)
    # everything the compiled kernel was specialized on: sizes, dtypes, 16-byte alignment of each pointer
    key = (K, N, bits, bool(v2), trivial, group_size, out.dtype, scales.dtype, qweight.device,
           tuple(t.data_ptr() % 16 == 0 for t in args[:5]), tuple(a % 16 == 0 for a in args[5:11]))
    hit = _COMPILED.get(key)
    if hit is not None:  # fast path: launch the compiled kernel directly (skips triton's argument binding)
        compiled, grid, cfg = hit
        compiled[grid](*args, cfg[0], cfg[1])
        return out

    def launch(cfg):
        block_k, block_n, warps = cfg
        grid = (triton.cdiv(K, block_k), triton.cdiv(N, block_n), 1)
        compiled = _dequant_t_kernel[grid](*args, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=warps)
        return compiled, grid

    cfg = _BEST.get(key)
    if cfg is None:
        cfg = _tune(launch)
        _BEST[key] = cfg
    compiled, grid = launch(cfg)
    if compiled is not None and os.environ.get("TRITON_INTERPRET") != "1":
        _COMPILED[key] = (compiled, grid, cfg)
    return out


def _tune(launch):
    """The fastest of _CONFIGS for one problem (each compiled and timed once; ~ms, first call only)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _INTERPRET_CONFIG
    if not settings().gptq_tune:  # e.g. tests: one compile per problem kind
        return _CONFIGS[2]
    for cfg in _CONFIGS:  # compile
        launch(cfg)
    torch.cuda.synchronize()
    best, best_ms = _CONFIGS[0], float("inf")
    for cfg in _CONFIGS:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            launch(cfg)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best
