"""Fixtures the training tests share: the tiny float demo model and the memorise set, made once a session
(read-only: a run writes only into its own output dir)."""

import pytest

from _helpers import write_memorise


@pytest.fixture(scope="session")
def model(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return write_memorise(tmp_path_factory.mktemp("data") / "memorise.json")
