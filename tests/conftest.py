"""Settings shared by every test.

The tests use tiny networks, for which one CPU thread is much faster than several:
thread hand-offs cost more than the arithmetic, and far more on a busy machine.
"""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses tests start
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def private_cache_folder(monkeypatch, tmp_path):
    """Decoded images and FID statistics go to the test's own folder, never to ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
