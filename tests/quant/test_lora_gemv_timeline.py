"""benchmarks/lora_gemv_timeline.py's CPU parts: its patches of the LoRA build's source still find what they patch
(a kernel edit that moves them fails here, not on the GPU machine), and its timeline statistics."""

from __future__ import annotations

import sys

import torch

from _helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import lora_gemv_timeline as LT  # noqa: E402


def test_the_stamped_lora_build_records_producers_and_tiles():
    src = LT.stamped_lora_source(8, 1)
    assert "unsigned long long* tl) {" in src and src.count("stamp5(tl,") == 3  # non-last, last producer, tiles
    # the producers' marks: loads consumed before the counter, the last one's end after h is written
    assert src.index("t_loaded = gtime()") < src.index("atomicAdd(lcnt, 1)") < src.index("t_counted = gtime()")
    assert src.index("lh[i] = h_value(s);\n    }\n  }\n  __syncthreads();") < src.index(
        "stamp5(tl, t_start, t_loaded, t_counted, gtime())")
    # the tiles': chunks done before the wait for h, h read before the warps' sum
    waits = src.index("has_empty(v.x)")
    assert src.index("t_main = t_h = gtime()") < waits < src.index("    t_h = gtime();\n", waits)
    assert "while (false)" not in src
    assert "while (false)" in LT.stamped_lora_source(8, 1, wait=False)


def test_lora_timeline_statistics_per_call_from_the_first_cta():
    def call(rows):
        return torch.tensor(rows, dtype=torch.int64).flatten()

    # 2 producers then 2 tiles: (start, mark 1, mark 2, end, SM) in ns
    first = call([[0, 1, 2, 3, 0]] * 4)  # left out
    second = call([[1000, 3000, 4000, 4000, 0], [1000, 3500, 4500, 9000, 1],
                   [1200, 6000, 9500, 10000, 2], [1500, 8000, 8000, 8500, 3]])
    stats = LT.summarise_lora([first, second], producers=2)
    assert abs(stats["h_written_us"] - 8.0) < 1e-9 and abs(stats["producer_loaded_us"] - 2.25) < 1e-9
    assert abs(stats["tiles_chunks_first_us"] - 5.0) < 1e-9 and abs(stats["tiles_chunks_last_us"] - 7.0) < 1e-9
    assert abs(stats["wait_mean_us"] - 1.75) < 1e-9 and abs(stats["wait_max_us"] - 3.5) < 1e-9
    assert stats["tiles_waiting_over_1us"] == 1 and abs(stats["span_us"] - 9.0) < 1e-9


def test_lora_timeline_statistics_without_producers():
    first = torch.zeros(2 * LT.WORDS, dtype=torch.int64)
    second = torch.tensor([[1000, 5000, 5500, 6000, 0], [1200, 7000, 7200, 8000, 1]], dtype=torch.int64).flatten()
    stats = LT.summarise_lora([first, second], producers=0)
    assert stats["h_written_us"] != stats["h_written_us"]  # nan: h was there before the call
    assert abs(stats["wait_mean_us"] - 0.35) < 1e-9 and abs(stats["tiles_chunks_first_us"] - 4.0) < 1e-9
