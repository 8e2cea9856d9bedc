"""Command line for Part B on your own machine (on Colab or Kaggle use run_diffusion.ipynb).

From the A3_PartB folder, each part in a results folder of its own (as the notebook does):

    python main.py --train_steps 1000 --save_and_sample_every 100 --save_folder ./results/part1
    python main.py --train_steps 1000 --save_and_sample_every 100 --fid --save_folder ./results/part2
    python main.py --visualize --save_folder ./results/part1      # Parts 3 and 4, from Part 1's model
    python main.py --demo          # synthetic images, no download, under 90 s on a 2-core CPU

Add --download to the first run to download AFHQ and unzip the class first, where missing; after
a disconnect, the same command completes a download or an unzip cut short.

The defaults are the starter's. Every flag is checked before any work starts: a bad one prints
one line on stderr that names it, and the exit status is 2; so does a file that cannot be
written (a full disk, no permission), and the checkpoint already saved is intact. Ctrl-C saves a
checkpoint, says how to resume, and exits with status 130.
"""
import argparse
import inspect
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer import (CHECKPOINT_MINUTES, PRECISIONS, SaveError, atomic_write, autocast_dtype,
                     build_feature_extractor, default_device, download_afhq, read_checkpoint,
                     require_above_zero, require_positive)
from unet import Unet, check_groups
from utils import SEED, train_diffusion, visualize_diffusion

COUNTS = ("train_steps", "save_and_sample_every", "batch_size", "image_size", "time_steps",
          "unet_dim")
GROUPS = inspect.signature(Unet).parameters["resnet_block_groups"].default  # as utils builds it
DEMO_STEPS = {"train_steps": 50, "save_and_sample_every": 25}  # shows blobs: docs/demo_backward.png
SYNTHETIC_BACKGROUND = np.array([40.0, 40.0, 55.0])
SYNTHETIC_COLOURS = {"cat": (230, 150, 60), "dog": (150, 110, 80), "wild": (90, 170, 80)}


def build_parser():
    """The starter's flags and defaults (the handout's tables 1-3), plus --demo, --download and
    options of this package's trainer."""
    parser = argparse.ArgumentParser(description="Train or visualize a DDPM on AFHQ.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train_steps", type=int, default=10000,
                        help="training iterations (Parts 1-2: 1000, Part 5: 10000)")
    parser.add_argument("--save_and_sample_every", type=int, default=1000,
                        help="steps between checkpoints, sample grids and FID (Parts 1-2: 100)")
    parser.add_argument("--fid", action="store_true", help="compute FID at every save (Part 2)")
    parser.add_argument("--save_folder", default="./results",
                        help="where the checkpoint, grids and figures go")
    parser.add_argument("--data_path", default="./data/train/",
                        help="folder holding cat/ dog/ wild/ (or the dataset root above it)")
    parser.add_argument("--load_path", default=None,
                        help="checkpoint to resume from, or to visualize "
                             "(for --visualize: SAVE_FOLDER/model.pt when not given)")
    parser.add_argument("--unet_dim_mults", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="U-Net channel multipliers, one per resolution")
    parser.add_argument("--image_size", type=int, default=32, help="side of the square images")
    parser.add_argument("--batch_size", type=int, default=32, help="images per batch")
    parser.add_argument("--data_class", default="cat", choices=["all", "cat", "dog", "wild"],
                        help="AFHQ class to train on")
    parser.add_argument("--time_steps", type=int, default=50, help="diffusion steps T")
    parser.add_argument("--unet_dim", type=int, default=16,
                        help="output channels of the U-Net's first layer (a multiple of 8)")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Adam's learning rate")
    parser.add_argument("--dataloader_workers", type=int, default=16,
                        help="decoding threads and clean-fid workers (capped at the CPU count)")
    parser.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS],
                        help="auto: mixed precision where the device runs it natively (bf16 on "
                             "recent GPUs and CPUs with native bf16, fp16 on older GPUs such as "
                             "the T4), else fp32; fp16 needs a CUDA GPU")
    parser.add_argument("--checkpoint_minutes", type=float, default=CHECKPOINT_MINUTES,
                        help="minutes of training between checkpoints besides the milestones, "
                             "so a kill loses at most that much")
    parser.add_argument("--no_cuda_graph", dest="cuda_graph", action="store_false",
                        help="on a GPU, run each training step eagerly instead of replaying it "
                             "as a CUDA graph (for a capture that fails)")
    parser.add_argument("--download", action="store_true",
                        help="first download AFHQ (a 6.5 GB zip, kept beside the train folder) "
                             "and unzip --data_class into --data_path, where missing; run again "
                             "after a download or unzip cut short, it completes them")
    parser.add_argument("--delete_zip", action="store_true",
                        help="with --download: delete the zip once unzipped (another class then "
                             "downloads it again)")
    parser.add_argument("--visualize", action="store_true",
                        help="draw the forward and backward processes of a trained model")
    parser.add_argument("--demo", action="store_true",
                        help="train on synthetic images written into SAVE_FOLDER ("
                             f"{DEMO_STEPS['train_steps']} steps with a grid every "
                             f"{DEMO_STEPS['save_and_sample_every']}, unless those flags are given)")
    return parser


# ---------------------------------------------------------------- the flags' checks


def check_numbers(settings):
    """Counts are positive, and the U-Net can be built for the image size (trainer's
    require_positive and unet's check_groups; the image size is checked here on purpose, as the
    U-Net checks it only at its first step)."""
    require_positive(**{f"--{flag}": settings[flag] for flag in COUNTS})
    require_above_zero(**{f"--{flag}": settings[flag]
                          for flag in ("learning_rate", "checkpoint_minutes")})
    if settings["dataloader_workers"] < 0:
        raise ValueError(f"--dataloader_workers must be 0 or more, got "
                         f"{settings['dataloader_workers']}.")
    mults = settings["unet_dim_mults"]
    if min(mults) < 1:
        raise ValueError(f"--unet_dim_mults must all be at least 1, got {mults}.")
    try:
        check_groups([settings["unet_dim"] * mult for mult in (1, *mults)], GROUPS)  # its widths
    except ValueError:
        raise ValueError(f"--unet_dim must be a multiple of {GROUPS} (the U-Net's GroupNorm "
                         f"groups), got {settings['unet_dim']}.") from None
    halvings = len(mults) - 1
    if settings["image_size"] % 2 ** halvings:
        raise ValueError(
            f"--image_size {settings['image_size']} cannot be halved {halvings} times, as "
            f"--unet_dim_mults {' '.join(map(str, mults))} needs: use a multiple of "
            f"{2 ** halvings}, or fewer --unet_dim_mults.")


def check_save_folder(folder):
    """The results folder exists (or can be made) and a file can be written in it."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"--save_folder {folder} cannot be written ({error.strerror or error}): "
                         "choose a folder you can write to.") from None


def check_checkpoint(settings, visualize):
    """The checkpoint to visualize or to resume is readable; one to resume is not already at
    --train_steps. Read here and again by the Trainer on purpose: only the command line knows
    it is to resume, and says so before the U-Net and the data are built."""
    path = settings["load_path"]
    if path is None and visualize:
        path = Path(settings["save_folder"]) / "model.pt"
    if path is None:
        return
    try:
        step = read_checkpoint(path, torch.device("cpu"))["step"]
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"--load_path: {error}") from None
    if not visualize and step >= settings["train_steps"]:
        raise ValueError(f"--load_path {path} is at step {step}, and --train_steps is "
                         f"{settings['train_steps']}: pass a larger --train_steps to train on.")


def fid_network():
    """clean-fid's Inception network on the training device (downloaded once, on first use):
    built here, so that a failed download is said before any work, and passed on to training."""
    try:
        return build_feature_extractor("clean", default_device(), use_dataparallel=False)
    except Exception as error:  # noqa: BLE001 - a download fails in many ways
        raise ValueError(f"--fid needs clean-fid's Inception network, which is downloaded from "
                         f"the internet once ({type(error).__name__}: {error}). Connect once, or "
                         "run without --fid.") from None


def check_flags(settings, visualize):
    """Every check that can fail, before any image is decoded or any run is started; returns
    the FID network that the --fid check built for training (None without --fid).

    The checks are the package's own under the flags' names; the Trainer and the U-Net repeat
    the cheap ones where their arguments enter, for the notebook's calls, which skip this file.
    """
    check_numbers(settings)
    try:
        autocast_dtype(default_device(), settings["precision"])
    except ValueError as error:
        raise ValueError(f"--precision: {error}") from None
    check_save_folder(settings["save_folder"])
    check_checkpoint(settings, visualize)
    return fid_network() if settings["fid"] and not visualize else None


# ---------------------------------------------------------------- the demo


def synthetic_image(rng, size, colour):
    """A smooth Gaussian blob of ``colour`` (jittered) on a dark background, as a PIL image."""
    y, x = np.mgrid[0:size, 0:size] / size
    centre_x, centre_y = rng.uniform(0.35, 0.65, size=2)
    radius = rng.uniform(0.15, 0.3)
    weight = np.exp(-((x - centre_x) ** 2 + (y - centre_y) ** 2) / (2 * radius ** 2))[..., None]
    blob = np.asarray(colour, dtype=float) + rng.normal(0, 15, size=3)
    pixels = SYNTHETIC_BACKGROUND * (1 - weight) + blob * weight
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_synthetic_afhq(root, classes=("cat", "dog", "wild"), per_class=100, size=64,
                         layout="v2", seed=SEED):
    """Write a fake AFHQ tree of blob images; returns the folder that holds the class folders.

    ``layout="v2"`` (the course's zip): ``root/train/{class}/*.png``;
    ``layout="v1"``: ``root/afhq/train/{class}/*.jpg`` with an empty ``root/afhq/val/``.
    The images depend on ``seed`` only, so writing them again keeps the files already there.
    """
    if layout not in ("v1", "v2"):
        raise ValueError(f"layout must be 'v1' or 'v2', got {layout!r}.")
    train_folder = Path(root) / ("afhq/train" if layout == "v1" else "train")
    suffix = ".jpg" if layout == "v1" else ".png"
    if layout == "v1":
        (Path(root) / "afhq" / "val").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in classes:
        class_folder = train_folder / name
        class_folder.mkdir(parents=True, exist_ok=True)
        colour = SYNTHETIC_COLOURS.get(name, (200, 200, 200))
        for index in range(per_class):
            save_unless_unchanged(synthetic_image(rng, size, colour),
                                  class_folder / f"{name}_{index:04d}{suffix}")
    return train_folder


def save_unless_unchanged(image, path):
    """Save ``image`` as ``path`` (atomically), unless the file already holds those bytes: a
    rerun of the demo keeps the files' modification times, and with them the cache of the
    decoded images, which is keyed by them."""
    encoded = io.BytesIO()
    image.save(encoded, format=Image.registered_extensions()[path.suffix])
    if not (path.is_file() and path.read_bytes() == encoded.getvalue()):
        atomic_write(path, lambda file: file.write(encoded.getvalue()))


def run_demo(save_folder="./results", train_steps=DEMO_STEPS["train_steps"],
             save_and_sample_every=DEMO_STEPS["save_and_sample_every"], fid=False,
             checkpoint_minutes=CHECKPOINT_MINUTES, fid_feature_extractor=None, cuda_graph=True,
             **settings):
    """Train on 300 synthetic 64x64 "cats" and draw both process figures; needs no download.

    With the handout's model, the demo takes under 90 s on a 2-core CPU. ``settings`` are
    ``train_diffusion``'s other arguments; the synthetic images, written into
    ``save_folder/demo_data``, replace ``data_path``. Returns the paths of the two figures.
    """
    data_path = write_synthetic_afhq(Path(save_folder) / "demo_data", classes=("cat",),
                                     per_class=300, size=64)
    settings = {**settings, "save_folder": save_folder, "data_path": data_path, "fid": fid,
                "train_steps": train_steps, "save_and_sample_every": save_and_sample_every}
    train_diffusion(**settings, checkpoint_minutes=checkpoint_minutes,
                    fid_feature_extractor=fid_feature_extractor, cuda_graph=cuda_graph)
    return visualize_diffusion(**{**settings, "load_path": None})  # the model just trained


def demo_settings(settings, defaults):
    """--demo's settings: its step counts unless the flags are given (a flag left at its default
    counts as not given); its own synthetic images instead of --data_path."""
    if settings["data_path"] != defaults["data_path"]:
        print("--demo trains on synthetic images it writes itself; --data_path is ignored.")
    steps = {flag: value for flag, value in DEMO_STEPS.items()
             if settings[flag] == defaults[flag]}
    return {**settings, **steps}


def main(argv=None):
    """Run the command line; returns the exit status."""
    parser = build_parser()
    settings = vars(parser.parse_args(argv))
    demo = settings.pop("demo")
    visualize = settings.pop("visualize")
    download, delete_zip = settings.pop("download"), settings.pop("delete_zip")
    if delete_zip and not download:
        parser.error("--delete_zip goes with --download")
    if demo:
        settings = demo_settings(settings, vars(parser.parse_args([])))
    try:
        training = {"fid_feature_extractor": check_flags(settings, visualize),  # training only
                    "checkpoint_minutes": settings.pop("checkpoint_minutes"),
                    "cuda_graph": settings.pop("cuda_graph")}
        if download and not demo:
            download_afhq(settings["data_path"], settings["data_class"], keep_zip=not delete_zip)
        if demo:
            run_demo(**settings, **training)
        elif visualize:
            visualize_diffusion(**settings)
        else:
            train_diffusion(**settings, **training)
    except (ValueError, FileNotFoundError, FloatingPointError, SaveError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
