import os

import pytest
import torch

# Two threads per test process: the CI machine has 2 cores.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-dataset caches out of the user's home during tests."""
    monkeypatch.setenv("B2KD_CACHE", os.environ.get("B2KD_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache"))
