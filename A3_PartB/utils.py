"""Wiring for Part B: the U-Net, the Diffusion and the Trainer built from the handout's settings.

``train_diffusion`` (Parts 1, 2, 5) and ``visualize_diffusion`` (Parts 3, 4, 6) take the
arguments of the handout's tables 1-3; ``run_demo`` trains briefly on synthetic images.
"""
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion import Diffusion as DefaultDiffusion
from trainer import CHECKPOINT_MINUTES, Trainer
from unet import Unet

SEED = 2024  # the starter's
DEMO_STEPS = {"train_steps": 150, "save_and_sample_every": 50}  # a few minutes on a CPU
SYNTHETIC_BACKGROUND = np.array([40.0, 40.0, 55.0])
SYNTHETIC_COLOURS = {"cat": (230, 150, 60), "dog": (150, 110, 80), "wild": (90, 170, 80)}


def seed_everything(seed=SEED):
    """Seed Python, NumPy and torch (CPU and every GPU) so runs repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_diffusion(train_steps, save_and_sample_every, fid, save_folder, data_path,
                    load_path=None, unet_dim_mults=[1, 2, 4, 8], image_size=32, batch_size=32,
                    data_class="cat", time_steps=50, unet_dim=16, learning_rate=1e-3,
                    dataloader_workers=16, Diffusion=None, **trainer_options):
    """Build ``(model, diffusion, trainer)`` as the starter does, seeded with 2024.

    The defaults are the handout's (``unet_dim_mults`` is a list there too; it is only read).
    ``Diffusion`` is the diffusion class to use (default: the one in diffusion.py); training
    augments the images (``dataset="train"``) and accumulates 2 batches per step, as the
    starter's; ``trainer_options`` are passed on to ``Trainer`` (e.g. ``fid_feature_extractor``).
    """
    seed_everything()
    model = Unet(dim=unet_dim, dim_mults=tuple(unet_dim_mults))
    diffusion_class = DefaultDiffusion if Diffusion is None else Diffusion
    diffusion = diffusion_class(model, image_size=image_size, timesteps=time_steps)
    trainer = Trainer(
        diffusion, data_path, image_size=image_size, train_batch_size=batch_size,
        train_lr=learning_rate, train_num_steps=train_steps,
        save_and_sample_every=save_and_sample_every, results_folder=save_folder,
        gradient_accumulate_every=2, load_path=load_path, dataset="train",
        data_class=data_class, fid=fid, dataloader_workers=dataloader_workers,
        **trainer_options)
    return model, diffusion, trainer


def train_diffusion(train_steps, save_and_sample_every, fid, save_folder, data_path,
                    load_path=None, unet_dim_mults=[1, 2, 4, 8], image_size=32, batch_size=32,
                    data_class="cat", time_steps=50, unet_dim=16, learning_rate=1e-3,
                    dataloader_workers=16, Diffusion=None, precision="auto",
                    checkpoint_minutes=CHECKPOINT_MINUTES):
    """Parts 1, 2 and 5: train (resuming from ``load_path`` if given); returns the Trainer.

    ``precision`` (beyond the starter's arguments): "auto" (mixed precision where the device
    runs it natively), "fp32", "bf16" or "fp16" (CUDA only); see ``trainer.autocast_dtype``.

    ``trainer.history`` holds the logged rows (step, loss, fid); the checkpoint, sample grids,
    loss.png, fid.png and metrics.csv are in ``save_folder``. Besides the milestones, model.pt
    is written every ``checkpoint_minutes`` of training, so a disconnect loses minutes at most.
    """
    _, _, trainer = setup_diffusion(**locals())  # every argument, passed on by name
    trainer.train()
    return trainer


def visualize_diffusion(train_steps, save_and_sample_every, fid, save_folder, data_path,
                        load_path=None, unet_dim_mults=[1, 2, 4, 8], image_size=32,
                        batch_size=32, data_class="cat", time_steps=50, unet_dim=16,
                        learning_rate=1e-3, dataloader_workers=16, Diffusion=None,
                        precision="auto"):
    """Parts 3, 4 and 6: forward and backward process figures of a trained model.

    Loads ``load_path`` (default ``save_folder/model.pt``); returns the paths of
    forward_diffusion.png and backward_diffusion.png. ``precision`` as for ``train_diffusion``.
    """
    if load_path is None:
        load_path = Path(save_folder) / "model.pt"
    _, _, trainer = setup_diffusion(**locals())  # every argument, passed on by name
    return trainer.visualize_diffusion()


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
            synthetic_image(rng, size, colour).save(class_folder / f"{name}_{index:04d}{suffix}")
    return train_folder


def run_demo(save_folder="./results", train_steps=DEMO_STEPS["train_steps"],
             save_and_sample_every=DEMO_STEPS["save_and_sample_every"], fid=False,
             checkpoint_minutes=CHECKPOINT_MINUTES, **settings):
    """Train on 300 synthetic 64x64 "cats" and draw both process figures; needs no download.

    With the handout's model, the demo's steps take a few minutes on a CPU. ``settings`` are
    ``train_diffusion``'s other arguments; the synthetic images, written into
    ``save_folder/demo_data``, replace ``data_path``. Returns the paths of the two figures.
    """
    data_path = write_synthetic_afhq(Path(save_folder) / "demo_data", classes=("cat",),
                                     per_class=300, size=64)
    settings = {**settings, "save_folder": save_folder, "data_path": data_path, "fid": fid,
                "train_steps": train_steps, "save_and_sample_every": save_and_sample_every}
    train_diffusion(**settings, checkpoint_minutes=checkpoint_minutes)
    return visualize_diffusion(**{**settings, "load_path": None})  # the model just trained
