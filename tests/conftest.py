"""Settings shared by every test.

The tests use tiny networks, for which one CPU thread is much faster than several:
thread hand-offs cost more than the arithmetic, and far more on a busy machine.

Tests never write to the user's own folders: before collection imports anything, every
per-user folder that the code or its libraries write to (~/.cache, ~/.config, ~/.local/share,
~/.ipython, matplotlib's and wandb's) is pointed at one temporary folder of the session. The
environment is inherited by everything that runs later: module-scoped fixtures, the Jupyter
kernels they start and the subprocesses tests start.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses tests start
torch.set_num_threads(1)

PER_USER_FOLDERS = {  # variable -> its subfolder in the session's temporary folder
    "XDG_CACHE_HOME": "cache",  # the trainer's decoded images and FID statistics, torch's cache
    "XDG_CONFIG_HOME": "config",
    "XDG_DATA_HOME": "data",  # Jupyter's runtime files, wandb's data
    "MPLCONFIGDIR": "matplotlib",  # its font cache, built once for the whole session
    "IPYTHONDIR": "ipython",  # the kernels' history database
    "WANDB_CONFIG_DIR": "wandb_config",  # wandb does not follow XDG_CONFIG_HOME
}
SESSION_HOME = pytest.StashKey()
SLOW_FIXTURES = {  # module fixtures that grade files in boxes or train: every test using one is slow
    "graded", "results", "verdicts_by_file", "checked_run", "student_run", "student_part_b", "starter_checkpoint"}


def pytest_configure(config):
    """Point every per-user folder at a new temporary folder, before collection imports the
    code (a3_helper imports matplotlib, which writes its font cache at import)."""
    home = Path(tempfile.mkdtemp(prefix="a3_tests_home_"))
    environment = pytest.MonkeyPatch()
    for variable, subfolder in PER_USER_FOLDERS.items():
        environment.setenv(variable, str(home / subfolder))
    config.stash[SESSION_HOME] = home, environment


def pytest_collection_modifyitems(items):
    """Mark ``slow`` every test that uses one of SLOW_FIXTURES; single slow tests and whole slow
    modules carry the mark themselves. ``python -m pytest -m "not slow"`` is the fast tier.
    Then the modules holding slow tests go first, each in its own order, so that the workers of
    ``-n auto --dist loadscope`` start on the long modules and end together."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    slow_modules = {module_of(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: module_of(item) not in slow_modules)  # stable: each module's order kept


def module_of(item):
    return item.nodeid.split("::")[0]


def pytest_unconfigure(config):
    """Restore the environment and delete the session's temporary folder."""
    home, environment = config.stash[SESSION_HOME]
    environment.undo()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(autouse=True)
def private_cache_folder(monkeypatch, tmp_path):
    """Each test starts from an empty cache of decoded images and FID statistics of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
