"""Programmatic dependent launch (Hopper) for the NVRTC kernels of ``mma_gemv.py`` and ``mma_gemm.py``.

Why: a decode step at one row runs ~470 kernels, 200 of them Int4 products of 13-40 MB each (3-10 us at the copy
rate). Every product pays a ramp-up and a tail on top of its bytes, and between kernels the memory system idles
(NOTES step 13: the small Linears reach 39-40% of the copy rate, the large ones 50-55%). Launched with
``CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION``, a product's CTAs may start while the kernel before it is
still running (once that kernel has executed ``griddepcontrol.launch_dependents`` or finished). The kernels then
prefetch their own weights into L2 (weights never depend on the previous kernel), wait with
``griddepcontrol.wait`` until the previous kernel has completed and its writes are visible, and only then read x or
write anything. So the weights of the next product stream in during the norm, the SwiGLU or the previous product's
tail.

torch's ``_CudaKernel`` launches through ``cuLaunchKernel``, which takes no attributes; this module calls the
driver's ``cuLaunchKernelEx`` through ctypes with the same argument marshalling. CUDA graph capture records the
attribute as a programmatic edge (CUDA 12.3+ drivers), so replays overlap the same way. Compute capability 9.0+;
``FINETUNE_PDL=0`` launches as before (and builds the kernels without the wait and the prefetch).
"""

from __future__ import annotations

import ctypes

import torch

from ..settings import settings

# cuda.h: CUlaunchAttributeID CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _AttributeValue(ctypes.Union):
    # CUlaunchAttributeValue: a 64-byte union; the field used here is an int at its start
    _fields_ = [("programmaticStreamSerializationAllowed", ctypes.c_int), ("pad", ctypes.c_char * 64)]


class _Attribute(ctypes.Structure):
    # CUlaunchAttribute: the id (an enum, 4 bytes), 4 bytes of padding, the value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttributeValue)]


class _Config(ctypes.Structure):
    # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attribute)), ("numAttrs", ctypes.c_uint)]


_able: dict = {}  # device index -> compute capability 9.0+ and the driver call found
_driver = None  # libcuda with cuLaunchKernelEx's signature, or a string saying why not


def _launcher():
    global _driver
    if _driver is None:
        try:
            lib = torch.cuda._utils._get_gpu_runtime_library()
            fn = lib.cuLaunchKernelEx
            fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            _driver = fn
        except (AttributeError, OSError) as e:
            _driver = f"cuLaunchKernelEx is not available ({type(e).__name__}: {e})"
    return _driver


def enabled(device: torch.device) -> bool:
    """Whether kernels for ``device`` are built with the dependent-launch prologue and launched with the attribute:
    compute capability 9.0+, the driver's cuLaunchKernelEx, and ``FINETUNE_PDL`` on."""
    if not settings().pdl or device.type != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    able = _able.get(index)
    if able is None:  # (asked at every product: answered once a device)
        able = _able[index] = torch.cuda.get_device_capability(index) >= (9, 0) and not isinstance(_launcher(), str)
    return able


def kernel_args(args: list) -> tuple:
    """(void*[] of the arguments, the ctypes objects it points into): tensors as device pointers, ints as C int,
    floats as C double, as torch's _CudaKernel passes them."""
    held = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            held.append(ctypes.c_void_p(arg.data_ptr()))
        elif isinstance(arg, bool) or not isinstance(arg, (int, float)):
            raise TypeError(f"unsupported kernel argument type {type(arg).__name__}")
        elif isinstance(arg, int):
            held.append(ctypes.c_int(arg))
        else:
            held.append(ctypes.c_double(arg))
    array = (ctypes.c_void_p * len(held))(*[ctypes.cast(ctypes.byref(h), ctypes.c_void_p) for h in held])
    return array, held


def launch(kernel, grid: tuple, block: tuple, args: list, shared_mem: int = 0) -> None:
    """Launch ``kernel`` (a torch ``_CudaKernel``) on the current stream with programmatic stream serialization."""
    fn = _launcher()
    if isinstance(fn, str):
        raise RuntimeError(fn)
    array, held = kernel_args(args)
    attr = _Attribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value.programmaticStreamSerializationAllowed = 1
    stream = torch.cuda.current_stream()
    config = _Config(grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_mem,
                     ctypes.c_void_p(stream.cuda_stream), ctypes.pointer(attr), 1)
    rc = fn(ctypes.byref(config), kernel.func, array, None)
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {rc}")


def run(kernel, dependent: bool, grid: tuple, block: tuple, args: list, shared_mem: int = 0) -> None:
    """Launch a kernel built with ``source_prefix(dependent)``: with the attribute when it has the prologue."""
    if dependent:
        launch(kernel, grid, block, args, shared_mem)
    else:
        kernel(grid=grid, block=block, args=args, shared_mem=shared_mem)


def source_prefix(dependent: bool) -> str:
    """What a kernel's source starts with: the PDL switch and the device functions below."""
    return f"#define PDL {int(dependent)}\n" + DEVICE


# Device side, included by the kernels' sources. PDL 1: the kernel prefetches the weights it will read into L2,
# waits for the previous kernel, and lets the next one launch; PDL 0: none of it (the kernel as before).
DEVICE = r"""
#if PDL && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void pdl_prefetch_l2(const void* p, unsigned bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), "r"(bytes) : "memory");
}
__device__ __forceinline__ void pdl_wait_and_release() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
#else
__device__ __forceinline__ void pdl_prefetch_l2(const void*, unsigned) {}
__device__ __forceinline__ void pdl_wait_and_release() {}
#endif
"""
