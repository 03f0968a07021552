"""The dependent-launch helpers (finetune/quant/pdl.py) on the CPU: the driver structs laid out as cuda.h lays them
out (a wrong offset would hand cuLaunchKernelEx garbage), the arguments marshalled as torch's _CudaKernel
marshals them, the switch, and what the kernels' sources get."""

import ctypes

import pytest
import torch

from finetune.quant import mma_gemm, mma_gemv, pdl


def test_launch_structs_match_cuda_h():
    # CUlaunchAttribute: id at 0, value (a 64-byte union) at 8, 72 bytes; CUlaunchConfig: seven unsigned ints,
    # the stream at 32, the attribute pointer at 40, the count at 48, 56 bytes (64-bit)
    assert ctypes.sizeof(pdl._Attribute) == 72 and pdl._Attribute.value.offset == 8
    assert ctypes.sizeof(pdl._AttributeValue) == 64
    assert pdl._Config.sharedMemBytes.offset == 24
    assert (pdl._Config.hStream.offset, pdl._Config.attrs.offset, pdl._Config.numAttrs.offset) == (32, 40, 48)
    assert ctypes.sizeof(pdl._Config) == 56


def test_kernel_args_point_at_each_value():
    t = torch.arange(4, dtype=torch.int32)
    array, held = pdl.kernel_args([t, 7, -3, 2.5])
    assert len(array) == 4
    assert ctypes.c_void_p.from_address(array[0]).value == t.data_ptr()
    assert ctypes.c_int.from_address(array[1]).value == 7
    assert ctypes.c_int.from_address(array[2]).value == -3
    assert ctypes.c_double.from_address(array[3]).value == 2.5
    with pytest.raises(TypeError, match="unsupported kernel argument type str"):
        pdl.kernel_args(["x"])


def test_enabled_only_on_cuda_with_the_switch_on(switches):
    assert not pdl.enabled(torch.device("cpu"))
    switches(pdl=False)
    assert not pdl.enabled(torch.device("cuda", 0))  # (decided before any CUDA call)


def test_kernel_sources_carry_the_prologue_only_when_dependent():
    for dependent in (False, True):
        for src in (mma_gemv.kernel_source(8, 1, 1, 128, dependent=dependent),
                    mma_gemv.kernel_source(4, 2, 1, 128, lora=True, dependent=dependent),
                    mma_gemm.kernel_source(4, 4, 1, 1, 128, 2, dependent=dependent)):
            assert src.startswith(f"#define PDL {int(dependent)}\n")
            assert src.count("pdl_wait_and_release();") == 1  # called once, in the kernel (and defined above)
            # the wait comes before the first read of x or of the low-rank operands
            body = src[src.index("__global__"):]
            assert body.index("pdl_wait_and_release();") < min(
                i for i in (body.find("cp_async16(l_bt"), body.find("load_x(xs"), body.find("p.x[mb] ="))
                if i >= 0)
