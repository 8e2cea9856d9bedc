"""reporting.py through the Trainer: wandb, offline without a key, one log per step."""
import sys
import types

import pytest

from afhq_data import part_b_environment  # noqa: F401 (autouse fixture)
from reporting import WandbLogger
from tiny_trainer import afhq, make_trainer  # noqa: F401 (fixture)

pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step=None):
        self.calls.append((dict(data), step))

    def finish(self):
        self.calls.append(("finished", None))


def fake_wandb(monkeypatch):
    """Install a stand-in wandb module; returns (init keyword arguments, run calls)."""
    inits, calls = [], []

    def init(**options):
        inits.append(options)
        return FakeRun(calls)

    module = types.SimpleNamespace(init=init, Image=lambda path: f"image:{path}")
    monkeypatch.setitem(sys.modules, "wandb", module)
    return inits, calls


def test_one_wandb_log_per_step_with_explicit_step_though_read_in_groups(afhq, tmp_path,
                                                                        monkeypatch):
    _, calls = fake_wandb(monkeypatch)
    make_trainer(afhq, tmp_path, train_num_steps=4, log_every=3).train()
    logs = [call for call in calls if call[0] != "finished"]
    assert [step for _, step in logs] == [1, 2, 3, 4]
    assert set(logs[1][0]) == {"loss", "img"}  # milestone: loss and grid together


class Terminal:
    """A stand-in stdin attached to a terminal, where wandb would ask for a key."""

    def isatty(self):
        return True


@pytest.mark.parametrize("stdin", [None, Terminal()], ids=["no terminal", "terminal"])
def test_wandb_goes_offline_without_a_key_and_says_how_to_log_in(tmp_path, monkeypatch, capsys,
                                                                stdin):
    inits, _ = fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "stdin", stdin)
    WandbLogger({}, tmp_path / "part1")
    assert inits[0]["mode"] == "offline" and inits[0]["project"] == "DDPM_AFHQ"
    assert inits[0]["name"] == "part1"  # the starter names the run after the results folder
    assert "wandb login" in capsys.readouterr().out


def test_wandb_mode_from_environment_is_respected(tmp_path, monkeypatch):
    inits, _ = fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(sys, "stdin", None)
    WandbLogger({}, tmp_path)
    assert inits[0]["mode"] is None  # wandb reads WANDB_MODE itself


def test_training_works_without_wandb_installed(afhq, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    make_trainer(afhq, tmp_path, train_num_steps=1).train()
    assert (tmp_path / "model.pt").is_file()
