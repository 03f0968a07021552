"""Training's CUDA allocator setting (finetune/training/allocator.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from finetune.training.allocator import TRAINING_ALLOC_CONF, default_allocator_settings


def test_expandable_segments_unless_the_user_chose():
    env = {}
    assert default_allocator_settings(env) == TRAINING_ALLOC_CONF == "expandable_segments:True"
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for chosen in ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"},
                   {"PYTORCH_ALLOC_CONF": "max_split_size_mb:128"}):
        env = dict(chosen)
        assert default_allocator_settings(env) == next(iter(chosen.values()))
        assert env == chosen  # left as the user set it
    env = {"PYTORCH_CUDA_ALLOC_CONF": ""}  # set empty: torch's defaults, on purpose
    assert default_allocator_settings(env) is None and env == {"PYTORCH_CUDA_ALLOC_CONF": ""}


def test_train_main_sets_it_before_anything_else(tmp_path):
    """`python -m finetune.train` with bad flags exits early; the variable is already set when it does (it must be in
    place before the first CUDA use, so it comes first)."""
    code = ("import os, finetune.train as t; rc = t.main(['--no_such_flag', '1']); "
            "print(rc, os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "2 expandable_segments:True", (out.stdout, out.stderr[-2000:])
