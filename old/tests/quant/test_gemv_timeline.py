"""benchmarks/gemv_timeline.py's CPU parts: its patches of the GEMV's source still find what they patch (a kernel
edit that moves them fails here, not on the GPU machine), and its timeline statistics. The kernels run on a GPU."""

from __future__ import annotations

import sys

import torch

from _helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gemv_timeline as GT  # noqa: E402


def test_the_stamped_gemv_records_each_ctas_start_end_and_sm():
    src = GT.stamped_gemv_source(8, 1)
    assert "unsigned long long* tl) {" in src and "tl[3 * cta] = t_start" in src and "%%globaltimer" in src
    # once, after the barrier that follows the chunk loop (all warps done)
    assert src.count("tl[3 * cta] = t_start") == 1
    assert src.index("compute_chunk(buf[d]") < src.index("__syncthreads();\n  if (threadIdx.x == 0) {\n    const int cta")
    chained = GT.two_chains(src)
    assert "tmp2[mb]" in chained and "sx[mb][i] += sx2[mb][i]" in chained


def test_timeline_statistics_leave_out_the_first_call():
    def call(starts, ends, sms):
        return torch.tensor([[s, e, m] for s, e, m in zip(starts, ends, sms)]).flatten()

    first = call([0, 100], [50_000, 60_000], [0, 1])  # after the graph's start: not counted
    second = call([61_000, 61_500, 63_000], [70_000, 71_000, 72_000], [0, 1, 0])
    third = call([73_000, 73_000, 73_000], [80_000, 80_000, 80_000], [0, 1, 1])
    stats = GT.summarise([first, second, third])
    assert abs(stats["span_us"] - (11.0 + 7.0) / 2) < 1e-9
    assert abs(stats["dispatch_us"] - (2.0 + 0.0) / 2) < 1e-9
    assert abs(stats["gap_before_us"] - (1.0 + 1.0) / 2) < 1e-9  # 60 -> 61 us, 72 -> 73 us
    assert stats["ctas_per_sm_max"] == 2 and len(stats["calls"]) == 3 and stats["calls"][0]["gap_before_us"] is None


def test_each_timed_call_launches_its_own_layer_copy_with_its_own_timeline():
    launched = []

    def kernel(grid, block, args):
        launched.append((grid, block, args))

    packs = [(torch.zeros(4, dtype=torch.int32), 7), (torch.ones(4, dtype=torch.int32), 8)]
    label, calls, tls = GT.timed_kernel("k", kernel, (5, 1, 1), 64, lambda pk: [pk[0], pk[1]], 5, packs)
    assert label == "k" and [tl.shape for tl in tls] == [(15,), (15,)]
    for call in calls:
        call()
    assert [(g, b) for g, b, _ in launched] == [((5, 1, 1), (64, 1, 1))] * 2
    for (_, _, args), pk, tl in zip(launched, packs, tls):
        assert args[0] is pk[0] and args[1] == pk[1] and args[2] is tl
