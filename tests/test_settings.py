"""The FINETUNE_* switches read from the environment (finetune/settings.py)."""

import pytest

from finetune.settings import ENV, SettingsError, from_environ, yes_no


def test_yes_no_words():
    assert [yes_no(w) for w in ("1", "true", " YES ", "On")] == [True] * 4
    assert [yes_no(w) for w in ("0", "False", "no ", "OFF")] == [False] * 4
    for bad in ("2", "maybe", ""):
        with pytest.raises(ValueError):
            yes_no(bad)


def test_switches_from_the_environment():
    s = from_environ({ENV["compile"]: " off ", ENV["cuda_graphs"]: "1", ENV["gptq_backend"]: "Torch",
                      ENV["compact_embedding"]: ""})  # empty: the default
    assert (s.compile, s.cuda_graphs, s.gptq_backend, s.compact_embedding) == (False, True, "torch", True)
    with pytest.raises(SettingsError, match=r"^FINETUNE_COMPILE='maybe': expected 1 or 0$"):
        from_environ({ENV["compile"]: "maybe"})
    with pytest.raises(SettingsError, match="FINETUNE_GPTQ_BACKEND='cuda': expected one of auto, triton, torch"):
        from_environ({ENV["gptq_backend"]: "cuda"})
