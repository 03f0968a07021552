"""GPTQ on-disk format: hand-worked words, pack/unpack, dequantize against an independent reference, RTN."""

import pytest
import torch

from finetune.quant.packing import (
    dequantize,
    is_v2_format,
    pack_cols,
    pack_rows,
    unpack_cols,
    unpack_rows,
)
from finetune.quant.rtn import quantization_config, quantize_weight


def _i32(word: int) -> int:
    """An unsigned 32-bit pattern as the signed int32 value torch stores."""
    return word - 2**32 if word >= 2**31 else word


# -- answers worked out by hand from the format (not by the packer) --------------------------------------


def test_hand_word_0x76543210_holds_0_to_7_for_rows_8r_to_8r_plus_7():
    qweight = torch.tensor([[0x76543210, 0x76543210], [0x10101010, 0x76543210]], dtype=torch.int32)
    vals = unpack_rows(qweight, 4)
    assert vals.shape == (16, 2)
    assert vals[:8, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert vals[:8, 1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert vals[8:, 0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert vals[8:, 1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]


def test_hand_v1_qzeros_0x77777777_means_zero_point_8_and_weights():
    in_f, out_f = 8, 8
    qweight = torch.full((1, out_f), 0x76543210, dtype=torch.int32)
    qzeros = torch.full((1, 1), 0x77777777, dtype=torch.int32)  # v1: zero - 1 = 7 for all eight outputs
    scales = torch.full((1, out_f), 0.5, dtype=torch.float16)
    g_idx = torch.zeros(in_f, dtype=torch.int32)
    assert unpack_cols(qzeros, 4).tolist() == [[7] * 8]
    W = dequantize(qweight, qzeros, scales, g_idx, bits=4, v2=False)
    expected_row = [(k - 8) * 0.5 for k in range(8)]  # -4.0, -3.5, ..., -0.5
    assert W.shape == (out_f, in_f)
    for n in range(out_f):
        assert W[n].tolist() == expected_row
    # v2 stores the zero point itself: 0x88888888 is the same weight
    qzeros_v2 = torch.full((1, 1), _i32(0x88888888), dtype=torch.int32)
    assert torch.equal(dequantize(qweight, qzeros_v2, scales, g_idx, bits=4, v2=True), W)


def test_hand_high_nibble_of_negative_int32_word():
    # 0xF0000000 is negative as int32; its top nibble is row 7 = 15
    vals = unpack_rows(torch.tensor([[_i32(0xF0000000)]], dtype=torch.int32), 4)
    assert vals[:, 0].tolist() == [0, 0, 0, 0, 0, 0, 0, 15]


def test_hand_8bit_words():
    qweight = torch.tensor([[0x03020100], [_i32(0xFF807F01)]], dtype=torch.int32)
    assert unpack_rows(qweight, 8)[:, 0].tolist() == [0, 1, 2, 3, 1, 127, 128, 255]
    # v1 8-bit zero point 128 is stored as 127 = 0x7F in each byte
    qzeros = torch.tensor([[0x7F7F7F7F]], dtype=torch.int32)
    scales = torch.full((1, 4), 0.25, dtype=torch.float16)
    W = dequantize(torch.tensor([[0x03020100]] * 1 + [[0]], dtype=torch.int32).repeat(1, 4), qzeros, scales,
                   torch.zeros(8, dtype=torch.int32), bits=8)
    assert W[0].tolist() == [(v - 128) * 0.25 for v in [0, 1, 2, 3, 0, 0, 0, 0]]


def test_packer_writes_the_hand_word():
    q = torch.arange(8).view(8, 1).repeat(1, 3)
    assert pack_rows(q, 4).tolist() == [[0x76543210] * 3]
    assert pack_cols(torch.full((1, 8), 7), 4).tolist() == [[0x77777777]]
    assert pack_rows(torch.tensor([[1], [127], [128], [255]]), 8).tolist() == [[_i32(0xFF807F01)]]


# -- pack / unpack ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (64, 24), generator=g)
    packed = pack_rows(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 24)
    assert torch.equal(unpack_rows(packed, bits), q.to(torch.int32))
    z = torch.randint(0, 2**bits, (5, 32), generator=g)
    pz = pack_cols(z, bits)
    assert pz.shape == (5, 32 * bits // 32)
    assert torch.equal(unpack_cols(pz, bits), z.to(torch.int32))


def test_unsupported_bits_error_names_supported():
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        pack_rows(torch.zeros(8, 8, dtype=torch.int64), 3)


# -- dequantize against an independent reference ----------------------------------------------------------


def _random_layout(in_f, out_f, bits, group_size, desc_act, seed):
    g = torch.Generator().manual_seed(seed)
    gs = in_f if group_size == -1 else group_size
    groups = -(-in_f // gs)
    q = torch.randint(0, 2**bits, (in_f, out_f), generator=g)
    zeros = torch.randint(1, 2**bits, (groups, out_f), generator=g)  # v1 can store 1..2**bits-1
    scales = (torch.rand(groups, out_f, generator=g) * 0.1 + 0.001).to(torch.float16)
    g_idx = torch.arange(in_f) // gs
    if desc_act:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    return q, zeros, scales, g_idx.to(torch.int32)


def _reference(q, zeros, scales, g_idx):
    in_f, out_f = q.shape
    W = torch.empty(out_f, in_f, dtype=torch.float64)
    for k in range(in_f):
        grp = int(g_idx[k])
        W[:, k] = (q[k].double() - zeros[grp].double()) * scales[grp].double()
    return W


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_dequantize_equals_reference(bits, group_size, desc_act, v2):
    in_f, out_f = 256, 48
    q, zeros, scales, g_idx = _random_layout(in_f, out_f, bits, group_size, desc_act, seed=bits * 1000 + in_f)
    qweight = pack_rows(q, bits)
    qzeros = pack_cols(zeros if v2 else zeros - 1, bits)
    ref = _reference(q, zeros, scales, g_idx)
    W = dequantize(qweight, qzeros, scales, g_idx, bits=bits, v2=v2, dtype=torch.float32)
    assert W.shape == (out_f, in_f) and W.dtype == torch.float32
    assert torch.equal(W.double(), ref)  # exact in fp32
    Wb = dequantize(qweight, qzeros, scales, g_idx, bits=bits, v2=v2, dtype=torch.bfloat16)
    assert torch.equal(Wb, ref.to(torch.bfloat16))  # rounded once


# -- round-to-nearest quantizer -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_rtn_quantize_shapes_and_error(bits, group_size, desc_act, v2):
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    p = quantize_weight(W, bits=bits, group_size=group_size, desc_act=desc_act, v2=v2)
    groups = 1 if group_size == -1 else 256 // group_size
    assert p["qweight"].shape == (256 * bits // 32, 64) and p["qweight"].dtype == torch.int32
    assert p["qzeros"].shape == (groups, 64 * bits // 32) and p["qzeros"].dtype == torch.int32
    assert p["scales"].shape == (groups, 64) and p["scales"].dtype == torch.float16
    assert p["g_idx"].shape == (256,) and p["g_idx"].dtype == torch.int32
    counts = torch.bincount(p["g_idx"].long(), minlength=groups)
    assert (counts == (256 // groups)).all()
    if not desc_act:
        assert torch.equal(p["g_idx"], (torch.arange(256) // (256 // groups)).to(torch.int32))
    else:
        assert not torch.equal(p["g_idx"], (torch.arange(256) // (256 // groups)).to(torch.int32)) or groups == 1
    Wq = dequantize(**p, bits=bits, v2=v2)
    step = p["scales"].float()[p["g_idx"].long()].t()  # [out, in]
    # round to nearest: the sym grid's top value (2**(bits-1)-1)*step is xmax - step/2; the fp16 rounding of
    # the step (relative 2**-11) adds at most |W| * 2**-10
    assert ((Wq - W).abs() <= step * 0.5 + W.abs() * 2**-10 + 1e-7).all()


def test_qwen14b_layout_from_quantizer():
    # Qwen-14B's input width 5120 (c_attn is [640, 15360] / [40, 1920] / [40, 15360]; a narrower output keeps
    # this fast, GPTQLinear's meta test checks the full shapes)
    p = quantize_weight(torch.zeros(1536, 5120), bits=4, group_size=128)
    assert p["qweight"].shape == (640, 1536)
    assert p["qzeros"].shape == (40, 192)
    assert p["scales"].shape == (40, 1536)
    assert p["g_idx"].shape == (5120,)
    # zero weight: symmetric zero point 8 stored as 7 in every nibble
    assert (p["qzeros"] == 0x77777777).all()


def test_quantization_config_matches_official_and_v2_detection():
    qc = quantization_config()
    assert qc == {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
                  "sym": True, "true_sequential": True, "model_name_or_path": None,
                  "model_file_base_name": "model", "quant_method": "gptq"}
    assert not is_v2_format(qc)
    assert is_v2_format(quantization_config(v2=True))
    assert is_v2_format({"quant_method": "gptq", "format": "gptq_v2"})
    assert not is_v2_format({"quant_method": "gptq", "checkpoint_format": "gptq", "meta": {"v2": True}})
