"""finetune/quant/kernel_launch.py: the kernel parameters as cuLaunchKernel reads them (each slot's pointer points at
the argument's bytes: a data pointer, or a C int's 4 little-endian bytes), and bad arguments refused before any launch.
The launch itself runs in every GPU test of the tensor-core kernels (tests/quant/test_quant_cuda.py)."""

import ctypes

import pytest
import torch

from finetune.quant.kernel_launch import param_array, param_words


def test_ints_are_c_ints_and_each_slot_holds_its_argument():
    words = param_words([0, 7, -1, -(2**31), 2**31 - 1, True])
    assert words == [0, 7, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 1]
    buf, params = param_array(words + [0x7F00_1234_5678])  # a 64-bit pointer's word
    assert len(params) == 7
    for i, want in enumerate([0, 7, -1, -(2**31), 2**31 - 1, 1]):
        assert ctypes.cast(params[i], ctypes.POINTER(ctypes.c_int)).contents.value == want  # what an int param reads
    assert ctypes.cast(params[6], ctypes.POINTER(ctypes.c_uint64)).contents.value == 0x7F00_1234_5678
    assert [p - params[0] for p in params] == [8 * i for i in range(7)]


@pytest.mark.parametrize("arg, error, words", [
    (torch.zeros(2), ValueError, "argument 1: a cpu tensor"),
    (2**31, OverflowError, "argument 1: 2147483648 does not fit a C int"),
    (-(2**31) - 1, OverflowError, "does not fit a C int"),
    (0.5, TypeError, "argument 1: float"),
    (None, TypeError, "argument 1: NoneType"),
])
def test_arguments_the_kernels_cannot_take_are_refused_naming_them(arg, error, words):
    with pytest.raises(error, match=words):
        param_words([3, arg])
