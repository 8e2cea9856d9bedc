"""Wiring for Part B: the U-Net, the Diffusion and the Trainer built from the handout's settings.

``train_diffusion`` (Parts 1, 2, 5) and ``visualize_diffusion`` (Parts 3, 4, 6) take the
arguments of the handout's tables 1-3, with the starter's names, order and defaults (from
``settings.SETTINGS``); main.py's ``--demo`` trains briefly on synthetic images.
"""
import random
from pathlib import Path

import numpy as np
import torch

from checkpoints import model_settings, resumable_checkpoint
from diffusion import Diffusion as DefaultDiffusion
from settings import SETTINGS
from trainer import Trainer
from unet import Unet

SEED = SETTINGS.seed


def seed_everything(seed=SEED):
    """Seed Python, NumPy and torch (CPU and every GPU) so runs repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_diffusion(train_steps, save_and_sample_every, fid, save_folder, data_path,
                    load_path=None, unet_dim_mults=list(SETTINGS.unet_dim_mults),
                    image_size=SETTINGS.image_size, batch_size=SETTINGS.batch_size,
                    data_class=SETTINGS.data_class, time_steps=SETTINGS.time_steps,
                    unet_dim=SETTINGS.unet_dim, learning_rate=SETTINGS.learning_rate,
                    dataloader_workers=SETTINGS.dataloader_workers, Diffusion=None, *,
                    precision=SETTINGS.precision, checkpoint_minutes=SETTINGS.checkpoint_minutes,
                    fid_feature_extractor=None, cuda_graph=SETTINGS.cuda_graph, cache_folder=None,
                    num_fid_samples=SETTINGS.num_fid_samples, num_samples=SETTINGS.num_samples,
                    log_every=SETTINGS.log_every, image_set=None, resume=False):
    """Build ``(model, diffusion, trainer)`` as the starter does, seeded with 2024.

    The defaults are the handout's (``unet_dim_mults`` is a list there too; it is only read).
    ``Diffusion`` is the diffusion class to use (default: the one in diffusion.py); training
    augments the images (``dataset="train"``) and accumulates 2 batches per step, as the
    starter's. The keyword-only arguments are the Trainer's own (see ``Trainer``), and
    ``resume``: without a ``load_path``, resume from ``save_folder/model.pt`` when it holds
    this model's settings (a checkpoint of other settings is kept aside, see
    ``checkpoints.resumable_checkpoint``).
    """
    seed_everything()
    model = Unet(dim=unet_dim, dim_mults=tuple(unet_dim_mults))
    diffusion_class = DefaultDiffusion if Diffusion is None else Diffusion
    diffusion = diffusion_class(model, image_size=image_size, timesteps=time_steps)
    if resume and load_path is None:
        load_path = resumable_checkpoint(Path(save_folder) / "model.pt", model_settings(diffusion))
    trainer = Trainer(
        diffusion, data_path, image_size=image_size, train_batch_size=batch_size,
        train_lr=learning_rate, train_num_steps=train_steps,
        save_and_sample_every=save_and_sample_every, results_folder=save_folder,
        gradient_accumulate_every=SETTINGS.gradient_accumulate_every, load_path=load_path,
        dataset="train", data_class=data_class, fid=fid, dataloader_workers=dataloader_workers,
        precision=precision, checkpoint_minutes=checkpoint_minutes,
        fid_feature_extractor=fid_feature_extractor, cuda_graph=cuda_graph,
        cache_folder=cache_folder, num_fid_samples=num_fid_samples, num_samples=num_samples,
        log_every=log_every, image_set=image_set)
    return model, diffusion, trainer


def train_diffusion(train_steps, save_and_sample_every, fid, save_folder, data_path,
                    load_path=None, unet_dim_mults=list(SETTINGS.unet_dim_mults),
                    image_size=SETTINGS.image_size, batch_size=SETTINGS.batch_size,
                    data_class=SETTINGS.data_class, time_steps=SETTINGS.time_steps,
                    unet_dim=SETTINGS.unet_dim, learning_rate=SETTINGS.learning_rate,
                    dataloader_workers=SETTINGS.dataloader_workers, Diffusion=None,
                    precision=SETTINGS.precision, checkpoint_minutes=SETTINGS.checkpoint_minutes,
                    fid_feature_extractor=None, cuda_graph=SETTINGS.cuda_graph, resume=False):
    """Parts 1, 2 and 5: train (resuming from ``load_path`` if given); returns the Trainer.

    ``resume=True`` (the notebook's, so that *Run all* picks up where it stopped): without a
    ``load_path``, go on from ``save_folder/model.pt`` when it holds the same model settings; a
    finished run is not trained again (its figures stay as they are), and a checkpoint of
    other settings is kept aside under another name, never overwritten.

    ``precision`` (beyond the starter's arguments): "auto" (mixed precision where the device
    runs it natively), "fp32", "bf16" or "fp16" (CUDA only); see ``device.autocast_dtype``.
    ``fid_feature_extractor``: the FID network, when the caller has built it (main.py's --fid
    check does); None builds clean-fid's Inception at the first FID. ``cuda_graph=False`` turns
    off the CUDA graph of the training step on a GPU (for a capture that fails; see
    ``Trainer.loss_and_gradients``).

    ``trainer.history`` holds the logged rows (step, loss, fid); the checkpoint, sample grids,
    loss.png, fid.png and metrics.csv are in ``save_folder``. Besides the milestones, model.pt
    is written every ``checkpoint_minutes`` of training, so a disconnect loses minutes at most.
    """
    _, _, trainer = setup_diffusion(
        train_steps, save_and_sample_every, fid, save_folder, data_path, load_path=load_path,
        unet_dim_mults=unet_dim_mults, image_size=image_size, batch_size=batch_size,
        data_class=data_class, time_steps=time_steps, unet_dim=unet_dim,
        learning_rate=learning_rate, dataloader_workers=dataloader_workers, Diffusion=Diffusion,
        precision=precision, checkpoint_minutes=checkpoint_minutes,
        fid_feature_extractor=fid_feature_extractor, cuda_graph=cuda_graph, resume=resume)
    trainer.train()
    return trainer


def visualize_diffusion(train_steps, save_and_sample_every, fid, save_folder, data_path,
                        load_path=None, unet_dim_mults=list(SETTINGS.unet_dim_mults),
                        image_size=SETTINGS.image_size, batch_size=SETTINGS.batch_size,
                        data_class=SETTINGS.data_class, time_steps=SETTINGS.time_steps,
                        unet_dim=SETTINGS.unet_dim, learning_rate=SETTINGS.learning_rate,
                        dataloader_workers=SETTINGS.dataloader_workers, Diffusion=None,
                        precision=SETTINGS.precision):
    """Parts 3, 4 and 6: forward and backward process figures of a trained model.

    Loads ``load_path`` (default ``save_folder/model.pt``); returns the paths of
    forward_diffusion.png and backward_diffusion.png. ``precision`` as for ``train_diffusion``.
    """
    if load_path is None:
        load_path = Path(save_folder) / "model.pt"
    _, _, trainer = setup_diffusion(
        train_steps, save_and_sample_every, fid, save_folder, data_path, load_path=load_path,
        unet_dim_mults=unet_dim_mults, image_size=image_size, batch_size=batch_size,
        data_class=data_class, time_steps=time_steps, unet_dim=unet_dim,
        learning_rate=learning_rate, dataloader_workers=dataloader_workers, Diffusion=Diffusion,
        precision=precision)
    return trainer.visualize_diffusion()
