"""benchmarks/decode_profile.py's kernel families (CPU; the profile itself needs the GPU): the fused decode kernels
and the GEMV's split-K reduce are told apart from the rest of a step, which is what issue 16's step 8 counts."""

import importlib.util

from _helpers import ROOT


def _profile_module():
    spec = importlib.util.spec_from_file_location("decode_profile", ROOT / "benchmarks" / "decode_profile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kernel_families_separate_the_fused_decode_kernels_from_the_rest():
    mod = _profile_module()
    fused = "fused decode (norm, rotary + cache, swiglu)"
    for name in ("_dec_add_rms_norm_kernel", "_dec_rotary_cache_kernel", "_dec_swiglu_kernel"):
        assert mod.family(name) == fused
    assert mod.family("_dec_attn_split_kernel") == mod.family("_dec_attn_combine_kernel") == "attention"
    assert mod.family("_gemv2_kernel") == "int4_gemv"
    assert mod.family("gptq_mma_gemv") == "int4_gemv"
    assert mod.family("gptq_mma_gemm") == "int4_gemv"  # the small-M GEMM (session 12: it was counted as a matmul)
    assert mod.family("void gemv2T_kernel_val<int, int, __nv_bfloat16, 128, 16, 4, 4, false>") == "matmul (lm_head, LoRA)"
    assert mod.family("_splitk_reduce_kernel") == "split-K reduce"
    assert mod.family("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"
    assert mod.family("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps>>") == "other"
    assert mod.family("void at::native::direct_copy_kernel_cuda") == "copies"
    # what is left besides weights and attention: the fused kernels and the other small kernels
    rest = {mod.family(n) for n in ("_dec_swiglu_kernel", "elementwise_kernel")} - set(mod._WEIGHTS_AND_ATTENTION)
    assert rest == {fused, "other"}
