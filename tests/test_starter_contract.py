"""The provided files keep the starter's contract: a student's diffusion.py runs in them.

A student hands in one Part B file, diffusion.py, and runs it with the provided trainer.py,
unet.py, utils.py and main.py. These tests do just that, in a copy of Part B whose diffusion.py
is tests/skeleton_style_diffusion/diffusion.py: a correct file with only the skeleton's
interface (schedule in plain tensor attributes, ``noise`` required, ``p_sample_loop(img)``
alone, no normalize helper). They also resume and visualize a checkpoint in the starter
trainer's format, ``{"step", "model"}``.
"""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afhq_data import make_afhq_folder, part_b_environment  # noqa: F401 (autouse fixture)
from make_submission import PART_FILES

TESTS = Path(__file__).resolve().parent
PART_B = TESTS.parent / "A3_PartB"
PROVIDED_FILES = [name for name in PART_FILES["B"] if name.endswith(".py") and name != "diffusion.py"]
# (what make_submission.py packs: the starter's provided files and the modules they import)
STUDENT_DIFFUSION = TESTS / "skeleton_style_diffusion" / "diffusion.py"
TINY = dict(unet_dim=8, unet_dim_mults=[1, 2], image_size=16, batch_size=4, time_steps=5,
            dataloader_workers=0)
TINY_FLAGS = ["--unet_dim", "8", "--unet_dim_mults", "1", "2", "--image_size", "16",
              "--batch_size", "4", "--time_steps", "5", "--dataloader_workers", "0"]
pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


@pytest.fixture(scope="module")
def afhq(tmp_path_factory):
    return make_afhq_folder(tmp_path_factory.mktemp("afhq"), classes=("cat",), per_class=6,
                            size=32, corrupt=0, grayscale=0)


@pytest.fixture(scope="module")
def student_part_b(tmp_path_factory):
    """A3_PartB as a student has it: the provided files and their own diffusion.py."""
    folder = tmp_path_factory.mktemp("student") / "A3_PartB"
    folder.mkdir()
    for name in PROVIDED_FILES:
        shutil.copy(PART_B / name, folder / name)
    shutil.copy(STUDENT_DIFFUSION, folder / "diffusion.py")
    return folder


def run_python(folder, arguments):
    """Run Python in ``folder`` as a student would, with wandb off and stdin closed."""
    environment = {**os.environ, "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, *arguments], cwd=folder, env=environment,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def checkpoint_step(path):
    return torch.load(path, weights_only=True)["step"]


@pytest.fixture(scope="module")
def student_run(student_part_b, afhq):
    """Two steps of training through main.py with the student's diffusion.py."""
    run_python(student_part_b, ["main.py", "--train_steps", "2", "--save_and_sample_every", "1",
                                "--save_folder", "results", "--data_path", str(afhq),
                                *TINY_FLAGS])
    return student_part_b / "results"


def test_student_diffusion_trains_through_main(student_run):
    assert checkpoint_step(student_run / "model.pt") == 2
    assert (student_run / "sample_0.png").is_file() and (student_run / "sample_1.png").is_file()
    assert (student_run / "loss.png").is_file()


def test_student_diffusion_resumes_through_main(student_part_b, student_run, afhq):
    result = run_python(student_part_b, [
        "main.py", "--train_steps", "3", "--save_and_sample_every", "1", "--save_folder",
        "resumed", "--load_path", str(student_run / "model.pt"), "--data_path", str(afhq),
        *TINY_FLAGS])
    assert "Resuming from step 2 of 3." in result.stdout
    assert checkpoint_step(student_part_b / "resumed" / "model.pt") == 3


def test_student_diffusion_draws_both_figures_through_main(student_part_b, student_run, afhq):
    run_python(student_part_b, ["main.py", "--visualize", "--save_folder", str(student_run),
                                "--data_path", str(afhq), *TINY_FLAGS])
    for name in ("forward_diffusion.png", "backward_diffusion.png"):
        assert (student_run / name).read_bytes().startswith(b"\x89PNG")


def test_student_diffusion_trains_and_scores_fid_through_utils(student_part_b, afhq, tmp_path):
    """utils.train_diffusion, as the notebook calls it, with clean-fid's Inception replaced by
    a small feature extractor (its weights cannot be downloaded here)."""
    script = f"""
import torch, fid_score, utils

def colour_statistics(images):
    return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1) / 255

fid_score.build_feature_extractor = lambda *args, **kwargs: colour_statistics
utils.train_diffusion(train_steps=2, save_and_sample_every=1, fid=True,
                      save_folder={str(tmp_path)!r}, data_path={str(afhq)!r}, **{TINY!r})
"""
    run_python(student_part_b, ["-c", script])
    with open(tmp_path / "metrics.csv", newline="") as file:
        scores = [float(row["fid"]) for row in csv.DictReader(file) if row["fid"]]
    assert len(scores) == 2 and all(score > 0 for score in scores)
    assert (tmp_path / "fid.png").is_file()


@pytest.fixture(scope="module")
def starter_checkpoint(tmp_path_factory):
    """A checkpoint as the starter's Trainer.save writes it: only the step and the weights."""
    script = f"""
import torch
from diffusion import Diffusion
from unet import Unet

diffusion = Diffusion(Unet({TINY['unet_dim']}, dim_mults={tuple(TINY['unet_dim_mults'])}),
                      image_size={TINY['image_size']}, timesteps={TINY['time_steps']})
torch.save({{"step": 1, "model": diffusion.state_dict()}}, "starter.pt")
"""
    folder = tmp_path_factory.mktemp("starter_checkpoint")
    run_python(folder, ["-c", f"import sys; sys.path.insert(0, {str(PART_B)!r})\n{script}"])
    return folder / "starter.pt"


def test_starter_checkpoint_resumes_through_main(starter_checkpoint, afhq, tmp_path):
    result = run_python(PART_B, [
        "main.py", "--train_steps", "2", "--save_and_sample_every", "2", "--save_folder",
        str(tmp_path), "--load_path", str(starter_checkpoint), "--data_path", str(afhq),
        *TINY_FLAGS])
    assert "Adam starts afresh" in result.stdout
    assert checkpoint_step(tmp_path / "model.pt") == 2


def test_starter_checkpoint_is_visualized_through_main(starter_checkpoint, afhq, tmp_path):
    run_python(PART_B, ["main.py", "--visualize", "--save_folder", str(tmp_path), "--load_path",
                        str(starter_checkpoint), "--data_path", str(afhq), *TINY_FLAGS])
    assert (tmp_path / "backward_diffusion.png").is_file()
