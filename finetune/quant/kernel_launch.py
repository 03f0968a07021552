"""Launching an NVRTC-compiled kernel (``torch.cuda._compile_kernel``'s) with little host time.

Why not the kernel object's own ``__call__``: it opens libcuda anew at every call (``ctypes.CDLL``, which also defines
a class) and builds two ctypes objects per argument: ~115 us a launch on an H100 machine's CPU under cProfile
(`benchmarks/prefill_profile.py --host`: 23 ms for the 200 launches of a 24-token prefill that took 36 ms
unprofiled). Inside a CUDA graph that cost is paid once, at capture; an eager call (a prefill of up to 64 positions,
which goes through the small-M GEMM, or any call outside the engine's graphs) pays it at every launch. Here libcuda
is opened once, and the arguments are packed into one array of 64-bit words with one array of pointers to them
(the 24-token prompt's first step 40 -> 30 ms on one H100, benchmarks/NOTES.md step 91).
"""

from __future__ import annotations

import ctypes
import sys

import torch

_cuda = None


def _library():
    global _cuda
    if _cuda is None:
        lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        lib.cuLaunchKernel.restype = ctypes.c_int
        _cuda = lib
    return _cuda


def _current_stream() -> int:
    """The current CUDA stream's handle on the current device: torch's private accessor (a plain int, as the code
    torch.compile generates reads it), or the public Stream object's where a torch build lacks it."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(torch.cuda.current_device())
    return torch.cuda.current_stream().cuda_stream


def param_words(args) -> list[int]:
    """Each kernel argument as the 64-bit word its parameter slot holds: a CUDA tensor's data pointer, a Python int
    as a C ``int`` (32 bits, two's complement; the kernels' integer parameters are all ``int``)."""
    words = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            if not a.is_cuda:
                raise ValueError(f"kernel argument {i}: a {a.device} tensor (the kernel reads CUDA memory)")
            words.append(a.data_ptr())
        elif isinstance(a, int):
            if not -(2**31) <= a < 2**31:
                raise OverflowError(f"kernel argument {i}: {a} does not fit a C int")
            words.append(a & 0xFFFFFFFF)
        else:
            raise TypeError(f"kernel argument {i}: {type(a).__name__} (tensors and ints only)")
    return words


def param_array(words: list[int]):
    """(the words' buffer, the array of pointers to each word) that cuLaunchKernel's kernelParams takes; the buffer
    must live until the launch call returns (the driver copies the values at the call)."""
    n = len(words)
    buf = (ctypes.c_uint64 * n)(*words)
    base = ctypes.addressof(buf)
    return buf, (ctypes.c_void_p * n)(*range(base, base + 8 * n, 8))


def launch(kernel, grid: tuple, block: tuple, args) -> None:
    """Launch ``kernel`` (a compiled kernel's object, with ``.func``) on the current CUDA stream of the current
    device, as ``kernel(grid=grid, block=block, args=args)`` would (no dynamic shared memory)."""
    buf, params = param_array(param_words(args))
    stream = _current_stream()
    rc = _library().cuLaunchKernel(kernel.func, grid[0], grid[1], grid[2], block[0], block[1], block[2], 0,
                                   ctypes.c_void_p(stream), params, None)
    if rc:
        name = ctypes.c_char_p()
        _library().cuGetErrorString(rc, ctypes.byref(name))
        raise RuntimeError(f"CUDA error {rc} launching a kernel: {(name.value or b'unknown').decode()}")
    del buf  # (kept alive until here: the pointers in params point into it)
