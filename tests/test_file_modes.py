"""Weights files get the mode the umask gives every other file (safetensors 0.8 writes them owner-only)."""

from __future__ import annotations

import os

import pytest
import torch

from finetune.checkpoint import save_sharded
from finetune.demo import make_demo_model
from finetune.file_modes import umask, weights_readable


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def _modes(directory) -> dict:
    return {p.name: oct(p.stat().st_mode & 0o777) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_the_demo_models_and_a_sharded_save_are_readable_as_their_config(tmp_path, umask_022):
    assert umask() == 0o022 and os.umask(0o022) == 0o022  # (reading it left it as it was)
    for model_dir in (make_demo_model(tmp_path / "float"), make_demo_model(tmp_path / "int4", int4=True)):
        modes = _modes(model_dir)
        assert modes["model.safetensors"] == modes["config.json"] == oct(umask_022), modes
    names = save_sharded({"a": torch.zeros(300), "b": torch.ones(300)}, tmp_path, max_shard_size="1KB")
    assert len(names) == 2 and {_modes(tmp_path)[n] for n in names} == {oct(umask_022)}


def test_an_adapter_saved_through_peft_is_readable_as_its_config(tmp_path, umask_022):
    from peft import LoraConfig, get_peft_model

    from finetune import load_model

    model = get_peft_model(load_model(make_demo_model(tmp_path / "m"), device="cpu", dtype="fp32"),
                           LoraConfig(r=4, target_modules=["c_attn"]))
    model.save_pretrained(tmp_path / "adapter")
    modes = _modes(tmp_path / "adapter")
    assert modes["adapter_model.safetensors"] == modes["adapter_config.json"] == oct(umask_022), modes


def test_only_files_written_since_the_save_began_are_changed(tmp_path, umask_022):
    from safetensors.torch import save_file

    old, new = tmp_path / "old.safetensors", tmp_path / "sub" / "new.safetensors"
    new.parent.mkdir()
    for path in (old, new):
        save_file({"a": torch.zeros(2)}, str(path))
    os.chmod(old, 0o600)
    past = new.stat().st_mtime - 60
    os.utime(old, (past, past))  # a file of an earlier save, left owner-only by whoever wrote it
    weights_readable(tmp_path, since=new.stat().st_mtime)
    assert _modes(tmp_path) == {"old.safetensors": oct(0o600), "new.safetensors": oct(umask_022)}
