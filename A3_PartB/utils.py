"""Wiring for Part B: the U-Net, the Diffusion and the Trainer built from the handout's settings.

``train_diffusion`` (Parts 1, 2, 5) and ``visualize_diffusion`` (Parts 3, 4, 6) take the
arguments of the handout's tables 1-3 (main.py's ``--demo`` trains briefly on synthetic images).
"""
import random
from pathlib import Path

import numpy as np
import torch

from diffusion import Diffusion as DefaultDiffusion
from trainer import CHECKPOINT_MINUTES, Trainer
from unet import Unet

SEED = 2024  # the starter's


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
                    checkpoint_minutes=CHECKPOINT_MINUTES, fid_feature_extractor=None,
                    cuda_graph=True):
    """Parts 1, 2 and 5: train (resuming from ``load_path`` if given); returns the Trainer.

    ``precision`` (beyond the starter's arguments): "auto" (mixed precision where the device
    runs it natively), "fp32", "bf16" or "fp16" (CUDA only); see ``trainer.autocast_dtype``.
    ``fid_feature_extractor``: the FID network, when the caller has built it (main.py's --fid
    check does); None builds clean-fid's Inception at the first FID. ``cuda_graph=False`` turns
    off the CUDA graph of the training step on a GPU (for a capture that fails; see
    ``Trainer.loss_and_gradients``).

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
