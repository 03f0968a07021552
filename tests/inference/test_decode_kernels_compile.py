"""The decode step's Triton kernels (``finetune/inference/decode_kernels.py``) compile for the H200 (sm_90) on a
machine without a GPU: Triton's compiler and its bundled ptxas take a target, so a kernel that the interpreter
runs (test_decode_kernels_interpret.py) but the GPU compiler refuses (a type, a layout, a loop-carried value) is
caught here, before any device time."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="TRITON_INTERPRET=1 makes the kernels interpreter functions")

KERNELS = {  # kernel -> (signature of its arguments, constexpr values): the 14B decode shapes in bf16
    "_dec_add_rms_norm_kernel": (
        {"x_ptr": "*bf16", "d_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32", "eps": "fp32",
         "stride_x": "i32", "stride_d": "i32", "stride_o": "i32"},
        {"HAS_DELTA": True, "BLOCK": 8192}),
    "_dec_add_rms_norm_xa_kernel": (
        {"x_ptr": "*bf16", "d_ptr": "*bf16", "w_ptr": "*bf16", "at_ptr": "*bf16", "xo_ptr": "*bf16", "out_ptr": "*bf16",
         "h_ptr": "*bf16", "N": "i32", "R": "i32", "eps": "fp32", "stride_x": "i32", "stride_d": "i32",
         "stride_xo": "i32", "stride_o": "i32", "stride_at": "i32", "stride_h": "i32"},
        {"HAS_DELTA": True, "COLS": 8, "SUB": 2, "BLOCK": 8192}),
    "_dec_rotary_cache_kernel": (
        {"qkv_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "scale_ptr": "*fp32", "pos_ptr": "*i64",
         "crow_ptr": "*i64", "k_ptr": "*bf16", "v_ptr": "*bf16", "q_ptr": "*bf16", "stride_qkv": "i32", "P": "i32",
         "stride_cs": "i32", "stride_cr": "i64", "stride_ch": "i32", "stride_cp": "i32"},
        {"D": 128, "ROT": 128, "HAS_SCALE": True, "HAS_CROW": False, "BLOCK_D": 128}),
    "_dec_swiglu_kernel": ({"up_ptr": "*bf16", "gate_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "cols": "i32",
                            "stride": "i32"}, {"BLOCK": 1024}),
    "_dec_swiglu_xa_kernel": (
        {"up_ptr": "*bf16", "gate_ptr": "*bf16", "at_ptr": "*bf16", "out_ptr": "*bf16", "h_ptr": "*bf16", "N": "i32",
         "R": "i32", "stride": "i32", "stride_at": "i32", "stride_h": "i32"},
        {"COLS": 1, "CHUNK": 8192}),
    "_dec_attn_split_kernel": (
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64", "ws_ptr": "*fp32", "scale": "fp32",
         "kv_len": "i32", "SPLIT": "i32", "stride_qb": "i32", "stride_cr": "i64", "stride_ch": "i32",
         "stride_cp": "i32", "S": "i32"},
        {"D": 128, "BLOCK_D": 128, "BLOCK_N": 64}),
    "_dec_rotary_attn_kernel": (
        {"qkv_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "qscale_ptr": "*fp32", "pos_ptr": "*i64",
         "k_ptr": "*bf16", "v_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32", "out_ptr": "*bf16", "scale": "fp32",
         "kv_len": "i32", "SPLIT": "i32", "stride_qkv": "i32", "P": "i32", "stride_cs": "i32", "stride_cr": "i64",
         "stride_ch": "i32", "stride_cp": "i32", "S": "i32", "stride_ob": "i32"},
        {"D": 128, "ROT": 128, "HAS_SCALE": True, "EXACT": True, "COMBINE": True, "BLOCK_D": 128, "BLOCK_N": 64,
         "BLOCK_S": 32}),
    "_dec_attn_combine_kernel": (
        {"ws_ptr": "*fp32", "out_ptr": "*bf16", "S": "i32", "stride_ob": "i32"},
        {"D": 128, "BLOCK_D": 128, "BLOCK_S": 32}),
}


# the prefill's build of the rotary kernel (every token to its own cache row), SwiGLU's x A at 32 rows, and
VARIANTS = [("_dec_rotary_cache_kernel", {"HAS_CROW": True}),
            ("_dec_swiglu_xa_kernel", {"COLS": 8, "CHUNK": 1024}),  # 32 rows' build
            ("_dec_rotary_attn_kernel", {"COMBINE": False})]  # the parts combined by the combine kernel after it


@pytest.mark.parametrize("name,variant", [(n, None) for n in sorted(KERNELS)] + VARIANTS)
def test_kernel_compiles_for_sm90(name, variant):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import finetune.inference.decode_kernels as K

    fn = getattr(K, name)
    signature, constexprs = KERNELS[name]
    constexprs = dict(constexprs, **(variant or {}))
    params = [p.name for p in fn.params]
    assert set(params) == set(signature) | set(constexprs), (name, params)  # the table follows the kernel
    signature = {p: signature.get(p, "constexpr") for p in params}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": False})
    assert compiled.asm["cubin"]  # assembled by ptxas for sm_90
