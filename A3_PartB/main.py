"""Command line for Part B on your own machine (on Colab or Kaggle use run_diffusion.ipynb).

From the A3_PartB folder, each part in a results folder of its own (as the notebook does):

    python main.py --train_steps 1000 --save_and_sample_every 100 --save_folder ./results/part1
    python main.py --train_steps 1000 --save_and_sample_every 100 --fid --save_folder ./results/part2
    python main.py --visualize --save_folder ./results/part1      # Parts 3 and 4, from Part 1's model
    python main.py --demo          # synthetic images, no download, under 90 s on a 2-core CPU

Add --download to the first run to download AFHQ and unzip the class first, where missing; after
a disconnect, the same command completes a download or an unzip cut short.

The defaults are the starter's (``settings.SETTINGS``). Every flag but --data_path is checked
before any work starts: a bad one is named on stderr, and the exit status is 2 (argparse's usage
and error for a number out of range, one line for the rest); a file that cannot be written (a
full disk, no permission) also exits with 2, and the checkpoint already saved is intact. Ctrl-C
saves a checkpoint, says how to resume, and exits with status 130.
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

from afhq import download_afhq
from checkpoints import read_checkpoint
from device import autocast_dtype, default_device, PRECISIONS
from fid_score import inception_network
from files import atomic_write, SaveError
from settings import SETTINGS
from unet import check_groups, check_halvings, Unet
from utils import SEED, train_diffusion, visualize_diffusion

GROUPS = inspect.signature(Unet).parameters["resnet_block_groups"].default  # as utils builds it
DEMO_STEPS = {"train_steps": 50, "save_and_sample_every": 25}  # blobs by t = 0 in its backward figure
SYNTHETIC_BACKGROUND = np.array([40.0, 40.0, 55.0])
SYNTHETIC_COLOURS = {"cat": (230, 150, 60), "dog": (150, 110, 80), "wild": (90, 170, 80)}


def at_least_one(text):
    """argparse's type of a count: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def zero_or_more(text):
    """argparse's type of a number of workers: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def above_zero(text):
    """argparse's type of an amount: a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value:g}")
    return value


def build_parser():
    """The starter's flags with its defaults (the handout's tables 1-3, from ``SETTINGS``), plus
    --demo, --download and options of this package's trainer."""
    parser = argparse.ArgumentParser(description="Train or visualize a DDPM on AFHQ.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train_steps", type=at_least_one, default=SETTINGS.train_steps,
                        help="training iterations (Parts 1-2 pass 1000; the default is Part 5's)")
    parser.add_argument("--save_and_sample_every", type=at_least_one,
                        default=SETTINGS.save_and_sample_every,
                        help="steps between checkpoints, sample grids and FID (Parts 1-2: 100)")
    parser.add_argument("--fid", action="store_true", help="compute FID at every save (Part 2)")
    parser.add_argument("--save_folder", default=SETTINGS.save_folder,
                        help="where the checkpoint, grids and figures go")
    parser.add_argument("--data_path", default=SETTINGS.data_path,
                        help="folder holding cat/ dog/ wild/ (or the dataset root above it)")
    parser.add_argument("--load_path", default=None,
                        help="checkpoint to resume from, or to visualize "
                             "(for --visualize: SAVE_FOLDER/model.pt when not given)")
    parser.add_argument("--unet_dim_mults", type=at_least_one, nargs="+",
                        default=list(SETTINGS.unet_dim_mults),
                        help="U-Net channel multipliers, one per resolution")
    parser.add_argument("--image_size", type=at_least_one, default=SETTINGS.image_size,
                        help="side of the square images")
    parser.add_argument("--batch_size", type=at_least_one, default=SETTINGS.batch_size,
                        help="images per batch")
    parser.add_argument("--data_class", default=SETTINGS.data_class,
                        choices=["all", "cat", "dog", "wild"], help="AFHQ class to train on")
    parser.add_argument("--time_steps", type=at_least_one, default=SETTINGS.time_steps,
                        help="diffusion steps T")
    parser.add_argument("--unet_dim", type=at_least_one, default=SETTINGS.unet_dim,
                        help=f"output channels of the U-Net's first layer (a multiple of {GROUPS})")
    parser.add_argument("--learning_rate", type=above_zero, default=SETTINGS.learning_rate,
                        help="Adam's learning rate")
    parser.add_argument("--dataloader_workers", type=zero_or_more,
                        default=SETTINGS.dataloader_workers,
                        help="decoding threads and clean-fid workers (capped at the CPU count)")
    parser.add_argument("--precision", default=SETTINGS.precision, choices=["auto", *PRECISIONS],
                        help="auto: mixed precision where the device runs it natively (bf16 on "
                             "recent GPUs and CPUs with native bf16, fp16 on older GPUs such as "
                             "the T4), else fp32; fp16 needs a CUDA GPU")
    parser.add_argument("--checkpoint_minutes", type=above_zero,
                        default=SETTINGS.checkpoint_minutes,
                        help="minutes of training between checkpoints besides the milestones, "
                             "so a kill loses at most that much")
    parser.add_argument("--resume", action="store_true",
                        help="without --load_path: go on from SAVE_FOLDER/model.pt when it holds "
                             "the same model settings (one of other settings is kept aside under "
                             "another name); a finished run is not trained again")
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


def check_network(args):
    """The U-Net's own checks of its widths and of the image size, under the flags' names
    (the U-Net checks the image size only at its first step, after the images are decoded)."""
    try:
        check_groups([args.unet_dim * mult for mult in (1, *args.unet_dim_mults)], GROUPS)
    except ValueError:
        raise ValueError(f"--unet_dim must be a multiple of {GROUPS} (the U-Net's GroupNorm "
                         f"groups), got {args.unet_dim}.") from None
    try:
        check_halvings(args.image_size, levels=len(args.unet_dim_mults))
    except ValueError:
        halvings = len(args.unet_dim_mults) - 1
        raise ValueError(
            f"--image_size {args.image_size} cannot be halved {halvings} times, as "
            f"--unet_dim_mults {' '.join(map(str, args.unet_dim_mults))} needs: use a multiple "
            f"of {2 ** halvings}, or fewer --unet_dim_mults.") from None


def check_save_folder(folder):
    """The results folder exists (or can be made) and a file can be written in it."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"--save_folder {folder} cannot be written ({error.strerror or error}): "
                         "choose a folder you can write to.") from None


def check_checkpoint(args):
    """The checkpoint to visualize or to resume is readable; one to resume is not already at
    --train_steps. Read here and again by the Trainer on purpose: only the command line knows
    it is to resume, and says so before the U-Net and the data are built."""
    path = args.load_path
    if path is None and args.visualize:
        path = Path(args.save_folder) / "model.pt"
    if path is None:
        return
    try:
        step = read_checkpoint(path, torch.device("cpu"))["step"]
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"--load_path: {error}") from None
    if not args.visualize and step >= args.train_steps:
        raise ValueError(f"--load_path {path} is at step {step}, and --train_steps is "
                         f"{args.train_steps}: pass a larger --train_steps to train on.")


def fid_network():
    """clean-fid's Inception network on the training device (downloaded once, on first use):
    built here, so that a failed download is said before any work, and passed on to training."""
    try:
        return inception_network(default_device())
    except ValueError as error:
        raise ValueError(f"--fid: {error}") from None


def check_flags(args):
    """The checks that span flags (argparse's types check each number), before any image is
    decoded or any run is started; returns the FID network that the --fid check built for
    training (None without --fid). Each calls the package's own check, under the flags' names.
    """
    check_network(args)
    try:
        autocast_dtype(default_device(), args.precision)
    except ValueError as error:
        raise ValueError(f"--precision: {error}") from None
    check_save_folder(args.save_folder)
    check_checkpoint(args)
    return fid_network() if args.fid and not args.visualize else None


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


def run_demo(args, fid_network=None):
    """Train on 300 synthetic 64x64 "cats" and draw both process figures; needs no download.

    With the handout's model, the demo takes under 90 s on a 2-core CPU. The synthetic images,
    written into ``SAVE_FOLDER/demo_data``, replace --data_path. Returns the paths of the two
    figures.
    """
    data_path = write_synthetic_afhq(Path(args.save_folder) / "demo_data", classes=("cat",),
                                     per_class=300, size=64)
    train(args, data_path, fid_network)
    return visualize(args, data_path, load_path=None)  # the model just trained


def train(args, data_path, fid_network):
    """``train_diffusion`` with the flags, each by name."""
    return train_diffusion(
        train_steps=args.train_steps, save_and_sample_every=args.save_and_sample_every,
        fid=args.fid, save_folder=args.save_folder, data_path=data_path,
        load_path=args.load_path, unet_dim_mults=args.unet_dim_mults,
        image_size=args.image_size, batch_size=args.batch_size, data_class=args.data_class,
        time_steps=args.time_steps, unet_dim=args.unet_dim, learning_rate=args.learning_rate,
        dataloader_workers=args.dataloader_workers, precision=args.precision,
        checkpoint_minutes=args.checkpoint_minutes, fid_feature_extractor=fid_network,
        cuda_graph=args.cuda_graph, resume=args.resume)


def visualize(args, data_path, load_path):
    """``visualize_diffusion`` with the flags, each by name."""
    return visualize_diffusion(
        train_steps=args.train_steps, save_and_sample_every=args.save_and_sample_every,
        fid=args.fid, save_folder=args.save_folder, data_path=data_path, load_path=load_path,
        unet_dim_mults=args.unet_dim_mults, image_size=args.image_size,
        batch_size=args.batch_size, data_class=args.data_class, time_steps=args.time_steps,
        unet_dim=args.unet_dim, learning_rate=args.learning_rate,
        dataloader_workers=args.dataloader_workers, precision=args.precision)


def parse_flags(argv=None):
    """The flags; with --demo, its step counts unless those flags are given (a flag left at
    its default counts as not given)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.delete_zip and not args.download:
        parser.error("--delete_zip goes with --download")
    if args.demo:
        if args.data_path != SETTINGS.data_path:
            print("--demo trains on synthetic images it writes itself; --data_path is ignored.")
        for flag, steps in DEMO_STEPS.items():
            if getattr(args, flag) == getattr(SETTINGS, flag):
                setattr(args, flag, steps)
    return args


def main(argv=None):
    """Run the command line; returns the exit status."""
    args = parse_flags(argv)
    try:
        fid_network = check_flags(args)
        if args.download and not args.demo:
            download_afhq(args.data_path, args.data_class, keep_zip=not args.delete_zip)
        if args.demo:
            run_demo(args, fid_network)
        elif args.visualize:
            visualize(args, args.data_path, args.load_path)
        else:
            train(args, args.data_path, fid_network)
    except (ValueError, FileNotFoundError, FloatingPointError, SaveError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
