"""utils.py (setup, train, visualize, demo) and the main.py command line."""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
import utils
from afhq_data import make_afhq_folder, part_b_environment  # noqa: F401 (autouse fixture)

PART_B = Path(__file__).resolve().parents[1] / "A3_PartB"
TINY = dict(unet_dim_mults=[1, 2], image_size=16, batch_size=4, time_steps=10, unet_dim=8,
            dataloader_workers=0)
pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


@pytest.fixture(scope="module")
def afhq(tmp_path_factory):
    return make_afhq_folder(tmp_path_factory.mktemp("afhq"), classes=("cat",), per_class=8,
                            size=64)


def run_part_b(arguments, environment=None, cwd=PART_B):
    """Run a Python command in A3_PartB with stdin closed, as a notebook or CI would."""
    return subprocess.run([sys.executable, *arguments], cwd=cwd, env=environment,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- utils


def test_utils_functions_take_the_handout_arguments():
    expected = ["train_steps", "save_and_sample_every", "fid", "save_folder", "data_path",
                "load_path", "unet_dim_mults", "image_size", "batch_size", "data_class",
                "time_steps", "unet_dim", "learning_rate", "dataloader_workers", "Diffusion"]
    defaults = dict(load_path=None, unet_dim_mults=[1, 2, 4, 8], image_size=32, batch_size=32,
                    data_class="cat", time_steps=50, unet_dim=16, learning_rate=1e-3,
                    dataloader_workers=16, Diffusion=None)
    for function in (utils.setup_diffusion, utils.train_diffusion, utils.visualize_diffusion):
        parameters = inspect.signature(function).parameters
        assert [name for name in parameters if name in expected] == expected
        assert {name: parameters[name].default for name in defaults} == defaults


def test_setup_is_seeded(afhq, tmp_path):
    first, _, _ = utils.setup_diffusion(1, 1, False, tmp_path, afhq, **TINY)
    torch.manual_seed(123)
    second, _, _ = utils.setup_diffusion(1, 1, False, tmp_path, afhq, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_setup_uses_a_given_diffusion_class(afhq, tmp_path):
    class CustomDiffusion(utils.DefaultDiffusion):
        pass

    _, diffusion, trainer = utils.setup_diffusion(1, 1, False, tmp_path, afhq,
                                                  Diffusion=CustomDiffusion, **TINY)
    assert isinstance(diffusion, CustomDiffusion) and trainer.model is diffusion
    assert diffusion.num_timesteps == 10 and diffusion.model.dim == 8


def test_train_then_visualize_with_the_default_checkpoint(afhq, tmp_path):
    trainer = utils.train_diffusion(train_steps=2, save_and_sample_every=2, fid=False,
                                    save_folder=tmp_path, data_path=afhq, **TINY)
    assert trainer.step == 2 and (tmp_path / "model.pt").is_file()
    forward, backward = utils.visualize_diffusion(train_steps=2, save_and_sample_every=2,
                                                  fid=False, save_folder=tmp_path,
                                                  data_path=afhq, **TINY)
    assert forward.is_file() and backward.is_file()


def test_visualize_without_a_checkpoint_says_to_train_first(afhq, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt: train first"):
        utils.visualize_diffusion(2, 2, False, tmp_path, afhq, **TINY)


def test_demo_writes_synthetic_cats_and_trains_briefly(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(utils, "train_diffusion", lambda **settings: calls.append(settings))
    monkeypatch.setattr(utils, "visualize_diffusion", lambda **settings: calls.append(settings))
    utils.run_demo(tmp_path)
    cats = list((tmp_path / "demo_data" / "train" / "cat").glob("*.png"))
    assert len(cats) == 300
    assert calls[0]["train_steps"] == 300 and calls[0]["save_and_sample_every"] == 100
    assert calls[1]["save_folder"] == tmp_path


def test_synthetic_writer_rejects_unknown_layouts(tmp_path):
    with pytest.raises(ValueError, match="layout must be 'v1' or 'v2'"):
        utils.write_synthetic_afhq(tmp_path, layout="v3")


# ---------------------------------------------------------------- command line


def test_help_lists_the_flags():
    result = run_part_b(["main.py", "--help"])
    assert result.returncode == 0
    for flag in ("--train_steps", "--save_and_sample_every", "--fid", "--data_class",
                 "--unet_dim_mults", "--visualize", "--demo"):
        assert flag in result.stdout


def test_flag_defaults_are_the_starters():
    arguments = vars(main.build_parser().parse_args([]))
    assert arguments == dict(
        train_steps=10000, save_and_sample_every=1000, fid=False, save_folder="./results",
        data_path="./data/train/", load_path=None, unet_dim_mults=[1, 2, 4, 8], image_size=32,
        batch_size=32, data_class="cat", time_steps=50, unet_dim=16, learning_rate=1e-3,
        dataloader_workers=16, visualize=False, demo=False)


def test_main_passes_settings_to_train_diffusion_by_keyword(monkeypatch):
    received = []
    monkeypatch.setattr(main, "train_diffusion", lambda **settings: received.append(settings))
    assert main.main(["--fid", "--unet_dim_mults", "1", "2", "--data_class", "all"]) == 0
    assert received[0]["fid"] is True and received[0]["unet_dim_mults"] == [1, 2]
    assert received[0]["data_class"] == "all" and received[0]["load_path"] is None


def test_visualize_flag_calls_visualize_diffusion(monkeypatch):
    received = []
    monkeypatch.setattr(main, "visualize_diffusion", lambda **settings: received.append(settings))
    assert main.main(["--visualize", "--save_folder", "runs/"]) == 0
    assert received[0]["save_folder"] == "runs/"


def test_demo_flag_runs_the_demo_in_the_save_folder(monkeypatch):
    received = []
    monkeypatch.setattr(main, "run_demo", received.append)
    assert main.main(["--demo", "--save_folder", "demo/"]) == 0
    assert received == ["demo/"]


def test_data_class_outside_the_choices_is_refused():
    with pytest.raises(SystemExit):
        main.main(["--data_class", "horse"])


def test_missing_data_exits_2_with_one_message_and_no_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_part_b(["main.py", "--data_path", str(missing), "--save_folder",
                         str(tmp_path / "results")])
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: Data folder {missing} does not exist")
    assert "gdown" in result.stderr and "Traceback" not in result.stderr


def test_training_finishes_offline_with_no_wandb_key_and_stdin_closed(afhq, tmp_path):
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("WANDB_MODE", "WANDB_API_KEY")}
    environment.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    script = ("import torch, utils; torch.set_num_threads(1); utils.train_diffusion("
              f"train_steps=1, save_and_sample_every=1, fid=False, save_folder=r'{tmp_path}', "
              f"data_path=r'{afhq}', **{TINY!r})")
    result = run_part_b(["-c", script], environment)
    assert result.returncode == 0, result.stderr
    assert "logging offline" in result.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*"))
