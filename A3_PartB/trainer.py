"""Training of the DDPM in diffusion.py: the loop of Algorithm 1, checkpoints, FID and figures.

Provided by the course's starter, with its contract (``Trainer``'s arguments, attributes and
output names); it calls diffusion.py only through the skeleton's interface, so any correct
student diffusion.py runs in it. Read top to bottom: the constants, ``class Trainer`` (whose
``train`` shows one training step and one milestone), then the support code under headings.
Images are decoded once, cached in ``cache_folder`` (``~/.cache/a3_ddpm``) and kept on the
device, where each batch is cropped and flipped as the starter's transforms do.
"""
import contextlib
import csv
import ctypes
import errno
import hashlib
import io
import json
import math
import multiprocessing
import netrc
import os
import platform
import shutil
import stat
import sys
import tempfile
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from cleanfid import fid as clean_fid
from cleanfid.features import build_feature_extractor
from matplotlib.figure import Figure
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # PIL's modes of 16-bit gray images
CROP_MARGIN = 1.12  # the starter resizes to 1.12 x image_size, then crops image_size at random
WANDB_PROJECT = "DDPM_AFHQ"
VISUALIZED_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.99)
IMAGES_PER_PANEL = 16
METRIC_FIELDS = ("step", "loss", "fid")
AFHQ_DRIVE_ID = "1-1npXlqCw1CYQ5SBbrlSgZdA9TEwZre4"
AFHQ_ZIP_NAME = "afhq_v2.zip"
AFHQ_CLASSES = ("cat", "dog", "wild")
CHECKPOINT_MINUTES = 5  # model.pt is also written this often, so a kill loses minutes at most
CPU_SAMPLING_BATCH = 64  # on a CPU, batches of 64 sample the most images/s (32: 197, 64: 250, 512: 141)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # name -> autocast dtype

WRITE_ADVICE = {  # errno -> what to do when a file cannot be written
    errno.ENOSPC: "Free some space on that disk, or write to a folder on another disk",
    errno.EDQUOT: "Free some of your disk quota, or write to a folder on another disk",
    errno.EROFS: "That disk is read-only: write to a folder on another disk",
}
OTHER_WRITE_ADVICE = "Write to a folder you can write to, or make this one writable"


class Trainer:
    """Trains a Diffusion model (Algorithm 1) on the images of ``folder`` and evaluates it.

    The starter's arguments and attributes: ``model`` (the Diffusion), ``ds`` (the images:
    ``len(ds)``, and ``ds[i]`` in [0, 1] as the starter's Dataset), ``dl`` (endless batches in
    [-1, 1]), ``opt`` (Adam), ``step`` (steps done), ``batch_size``, ``image_size``,
    ``gradient_accumulate_every``, ``train_num_steps``, ``save_and_sample_every``,
    ``results_folder``, ``fid``, ``device``; ``dataset="train"`` turns augmentation on. Every
    ``save_and_sample_every`` steps and at the end: ``model.pt``, ``sample_{milestone}.png``,
    ``loss.png``, ``metrics.csv`` (and ``fid.png``); each step's loss is read from the device
    every ``log_every`` steps and logged.

    Beyond the starter's: ``image_set`` (an ``ImageSet`` instead of reading ``folder``),
    ``fid_feature_extractor`` (instead of clean-fid's Inception), ``num_fid_samples`` (512, the
    course protocol), ``num_samples`` (the grid), ``precision`` (see ``autocast_dtype``),
    ``cuda_graph`` (GPU only, see ``loss_and_gradients``), ``cache_folder``;
    ``dataloader_workers`` caps the decoding threads and clean-fid's workers at the CPU count;
    ``model.pt`` is also written once ``checkpoint_minutes`` of training have passed since the
    last checkpoint, so a kill (a Colab disconnect) loses at most that much.
    """

    def __init__(self, diffusion_model, folder, *, dataloader_workers=16, image_size=32,
                 train_batch_size=32, train_lr=1e-3, train_num_steps=10000,
                 gradient_accumulate_every=2, save_and_sample_every=1000,
                 results_folder="./results", load_path=None, dataset=None, shuffle=True,
                 data_class=None, device=None, fid=False, image_set=None,
                 fid_feature_extractor=None, num_fid_samples=512, num_samples=25, log_every=10,
                 cuda_graph=True, cache_folder=None, precision="auto",
                 checkpoint_minutes=CHECKPOINT_MINUTES):
        require_positive(train_batch_size=train_batch_size,
                         save_and_sample_every=save_and_sample_every,
                         gradient_accumulate_every=gradient_accumulate_every,
                         log_every=log_every, num_samples=num_samples,
                         num_fid_samples=num_fid_samples)
        require_above_zero(checkpoint_minutes=checkpoint_minutes)
        if image_size != diffusion_model.image_size:
            raise ValueError(f"image_size={image_size} but the model makes "
                             f"{diffusion_model.image_size}px images; pass the same size to both.")
        self.device = torch.device(device) if device is not None else default_device()
        self.amp_dtype = autocast_dtype(self.device, precision)  # which checks precision
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()
        self.model = move_to_device(diffusion_model, self.device)
        self.settings = model_settings(diffusion_model)
        self.image_size = image_size
        self.batch_size = train_batch_size
        self.train_num_steps = train_num_steps
        self.gradient_accumulate_every = gradient_accumulate_every
        self.save_and_sample_every = save_and_sample_every
        self.data_class = data_class
        self.fid = fid
        self.train_folder = folder
        self.cache_folder = Path(cache_folder) if cache_folder is not None else default_cache_folder()
        self.log_every = log_every
        self.num_samples = num_samples
        self.num_fid_samples = num_fid_samples
        self.results_folder = Path(results_folder)
        with reported_write_errors(self.results_folder):
            self.results_folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = self.results_folder / "model.pt"
        self.checkpoint_seconds = 60 * checkpoint_minutes
        self.config = {**self.settings, "data_class": data_class, "batch_size": train_batch_size,
                       "learning_rate": train_lr, "train_num_steps": train_num_steps, "fid": fid}
        self._prepare_optimization(train_lr, cuda_graph)
        self.step = 0
        self.history = []
        if load_path is not None:
            self.load(load_path)  # before the data, so a bad checkpoint fails before decoding

        # The starter draws gradient_accumulate_every batches of train_batch_size per step; dl
        # draws them as one batch of images_per_step, and the step makes one pass over it.
        images_per_step = train_batch_size * gradient_accumulate_every
        self._prepare_data(image_set, images_per_step, shuffle, augment=dataset == "train",
                           workers=dataloader_workers, fid_feature_extractor=fid_feature_extractor)

    def _prepare_data(self, image_set, batch_size, shuffle, augment, workers,
                      fid_feature_extractor):
        """The decoded images (``image_set``, or the cache of ``train_folder``), their batches
        and, with FID on, the scorer against them (its statistics cached by image set)."""
        decode_threads = max(1, min(workers, os.cpu_count() or 1))
        self.ds = image_set if image_set is not None else load_image_set(
            self.train_folder, self.data_class, self.image_size, self.cache_folder,
            decode_threads)
        print(f"dataset length: {len(self.ds)}, dataset class: {self.data_class}")
        self.batches = DeviceBatches(self.ds.train, self.image_size, batch_size, shuffle,
                                     self.device, augment)
        self.dl = endless_batches(self.batches)
        self.fid_scorer = None
        if self.fid:
            name = (f"fid_{extractor_name(fid_feature_extractor)}_{self.data_class or 'all'}_"
                    f"{self.image_size}px_{self.ds.key}.npz")
            self.fid_scorer = FidScorer(self.ds.reference, self.cache_folder / name,
                                        self.results_folder / "fid_samples", self.device,
                                        fid_worker_count(workers), fid_feature_extractor)

    def _prepare_optimization(self, learning_rate, cuda_graph):
        """Adam, a GradScaler (on for fp16) and ``gradient_pass``: the step's
        ``loss_and_gradients``, replayed as a CUDA graph on a GPU."""
        use_graph = cuda_graph and self.device.type == "cuda"
        self.gradient_pass = (CudaGraphed(self.loss_and_gradients) if use_graph
                              else self.loss_and_gradients)
        self.opt = adam(self.model.parameters(), learning_rate, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)

    # ------------------------------------------------------------ training

    def train(self):
        """Train from ``self.step`` up to ``train_num_steps`` (Algorithm 1). Ctrl-C saves a
        checkpoint (the last finished step), says how to resume and raises KeyboardInterrupt
        again, so a notebook's "Run all" stops there; a file that cannot be written raises
        SaveError, saying how to resume from the last checkpoint."""
        if self.step >= self.train_num_steps:
            print(f"Nothing to train: the model is at step {self.step} and train_num_steps is "
                  f"{self.train_num_steps}; raise train_num_steps to train on.")
            return
        if self.step:
            print(f"Resuming from step {self.step} of {self.train_num_steps}.")
        self.model.train()
        logger = WandbLogger(self.config, self.results_folder)
        progress = tqdm(initial=self.step, total=self.train_num_steps, desc="training")
        unread_losses = []  # on the device: reading a loss makes the host wait for the GPU
        self.last_checkpoint_time = time.monotonic()
        try:
            while self.step < self.train_num_steps:
                # -- one step: the loss and its gradients (a CUDA graph on a GPU), then Adam
                loss = self.gradient_pass().clone()  # the graph's next replay overwrites it
                self.scaler.step(self.opt)  # outside the graph, as PyTorch advises for a GradScaler
                self.scaler.update()
                self.step += 1
                progress.update(1)
                unread_losses.append(loss)

                # -- log: read the losses every log_every steps, at milestones and checkpoints
                milestone = (self.step % self.save_and_sample_every == 0
                             or self.step == self.train_num_steps)
                checkpoint_due = (time.monotonic() - self.last_checkpoint_time
                                  >= self.checkpoint_seconds)  # every checkpoint_minutes
                if not (milestone or checkpoint_due or len(unread_losses) == self.log_every):
                    continue
                row = self._record_losses(unread_losses, logger)  # logs all but this step
                unread_losses = []
                progress.set_postfix(loss=f"{row['loss']:.4f}")
                if not milestone:
                    logger.log(self.step, {"loss": row["loss"]})
                    if checkpoint_due:
                        self.save()
                    continue

                # -- milestone: save first, so a failure while sampling or scoring loses nothing
                self.save()
                row["fid"], grid_path = self._sample_grid_and_fid()
                metrics = {key: row[key] for key in ("loss", "fid") if row[key] is not None}
                logger.log(self.step, metrics, {"img": grid_path})  # one wandb.log per step
                self.save()  # again, now with this milestone's FID in the history
                self._write_metrics()
                self._plot_metrics()
        except KeyboardInterrupt:
            self._record_losses(unread_losses, logger)
            self.save()
            print(f"\nInterrupted at step {self.step}; checkpoint saved to {self.checkpoint_path}. "
                  f"{self._resume_hint()}")
            raise
        except SaveError as error:
            if not self.checkpoint_path.is_file():
                raise
            raise SaveError(error.path, error.os_error, self._resume_hint()) from None
        finally:
            progress.close()
            logger.finish()
            if not isinstance(sys.exc_info()[1], SaveError):  # the same disk would hide that error
                self._write_metrics()

    def loss_and_gradients(self):
        """The captured step: Algorithm 1's loss on one step's images, and its gradients.

        The batches: ``dl`` draws ``batch_size * gradient_accumulate_every`` images at once (64
        with the starter's 32 and 2), the starter's ``gradient_accumulate_every`` batches in one
        pass. The gradient is that of accumulating them one by one, as the starter does: the
        loss is a mean over images and GroupNorm normalises each image alone.

        On a GPU this method runs as a CUDA graph (``gradient_pass``, see ``CudaGraphed``), and
        what is written here must keep the graph's rules:
        * device work only: no host sync (no ``.item()``, ``print(loss)`` or ``if`` on a tensor);
        * no Python state: this code runs once, at the capture; each replay reruns its kernels on
          the same tensors, so reassigning ``self.dl`` or a Python number after the first step
          changes nothing (the random draws still change). Pass ``cuda_graph=False`` to edit
          freely;
        * the gradients are reset here, not after the optimizer step, so each replay writes them
          anew into the tensors Adam reads.
        Returns the loss, float32 whatever the precision, as a tensor on the device.
        """
        self.opt.zero_grad(set_to_none=True)
        x_0 = next(self.dl)  # the step's batches as one: batch_size * gradient_accumulate_every
        noise = torch.randn_like(x_0)  # Algorithm 1, line 4
        with self._autocast():
            loss = self.model(x_0, noise).float().mean()  # the starter's call
        self.scaler.scale(loss).backward()
        return loss.detach()

    def _autocast(self):
        """Mixed precision, without autocast's weight cache, which a CUDA graph cannot hold
        (and which saves nothing here: each weight is cast once per forward pass)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None, cache_enabled=False)

    def _record_losses(self, losses, logger):
        """Read the device losses of the last steps, add one history row per step and log every
        step but the last to wandb; returns the last row. Raises FloatingPointError on a nan."""
        if not losses:
            return None
        values = torch.stack(losses).tolist()
        first_step = self.step - len(values) + 1
        bad = [index for index, value in enumerate(values) if not math.isfinite(value)]
        if bad:
            raise FloatingPointError(
                f"The training loss became {values[bad[0]]} at step {first_step + bad[0]}, so "
                f"training stopped. The last good checkpoint (if any) is {self.checkpoint_path}; "
                "try a lower learning rate.")
        rows = [{"step": first_step + i, "loss": value, "fid": None}
                for i, value in enumerate(values)]
        self.history.extend(rows)
        for row in rows[:-1]:
            logger.log(row["step"], {"loss": row["loss"]})
        return rows[-1]

    def sample_grid_path(self, step):
        """The starter's name of the sample grid written after ``step`` steps:
        ``sample_{milestone}.png``, milestone = (step - 1) // save_and_sample_every."""
        return self.results_folder / f"sample_{(step - 1) // self.save_and_sample_every}.png"

    def _sample_grid_and_fid(self):
        """Sample the milestone's grid and, with FID on, score the samples; returns
        (FID or None, the grid's path)."""
        samples = self.sample_images(self.num_fid_samples if self.fid_scorer else self.num_samples)
        grid_path = self.sample_grid_path(self.step)
        atomic_write(grid_path, lambda file: save_image(
            samples[:self.num_samples], file, nrow=math.ceil(math.sqrt(self.num_samples)),
            format="png"))
        if not self.fid_scorer:
            return None, grid_path
        fid = self.score_samples(samples)
        print(f"step {self.step}: FID {fid:.2f}")
        return fid, grid_path

    def score_samples(self, samples):
        """The FID of samples in [0, 1] (``sample_images``'), rounded to 8 bits as a saved image
        is, against the training images of the class; needs ``fid=True``."""
        return self.fid_scorer.score((samples * 255).round().to(torch.uint8))

    def sample_images(self, count):
        """``count`` images of Algorithm 2 in [0, 1], float32, by the model's ``sample``: at once
        on a GPU, in batches of ``CPU_SAMPLING_BATCH`` on a CPU, where a smaller batch stays in
        the caches. Leaves the model in train mode (the skeleton's ``sample`` does not)."""
        batch = CPU_SAMPLING_BATCH if self.device.type == "cpu" else count
        with self._autocast():
            samples = torch.cat([self.model.sample(min(batch, count - done)).float()
                                 for done in range(0, count, batch)])
        self.model.train()
        return samples

    def _write_metrics(self):
        """Rewrite metrics.csv from the history (this run and the checkpoint it resumed)."""
        text = io.StringIO()
        writer = csv.DictWriter(text, METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write(self.results_folder / "metrics.csv",
                     lambda file: file.write(text.getvalue().encode()))

    def _plot_metrics(self):
        """Redraw loss.png, and fid.png once a milestone has an FID, from the history."""
        plot_curve([row["step"] for row in self.history], [row["loss"] for row in self.history],
                   "training loss (L1)", self.results_folder / "loss.png")
        scored = [row for row in self.history if row["fid"] is not None]
        if scored:
            plot_curve([row["step"] for row in scored], [row["fid"] for row in scored],
                       f"FID ({self.num_fid_samples} samples)", self.results_folder / "fid.png")

    # ------------------------------------------------------------ checkpoints

    def save(self, itrs=None):
        """Write ``model.pt`` (or ``model_{itrs}.pt``): the starter's ``{"step", "model"}`` plus
        the optimizer, the scaler, the settings and the metric history, atomically."""
        checkpoint = {"step": self.step, "model": self.model.state_dict(),
                      "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                      "settings": self.settings, "history": self.history}
        name = "model.pt" if itrs is None else f"model_{itrs}.pt"
        atomic_write(self.results_folder / name, lambda file: torch.save(checkpoint, file))
        self.last_checkpoint_time = time.monotonic()

    def _resume_hint(self):
        """The sentence that says how to resume from ``model.pt``."""
        return (f"Resume with load_path={str(self.checkpoint_path)!r} "
                f"(main.py: --load_path {self.checkpoint_path}).")

    def load(self, load_path):
        """Resume from a checkpoint of ``save`` (weights, optimizer, scaler, step and history)
        or of the starter's trainer (step and weights: the optimizer starts afresh)."""
        checkpoint = read_checkpoint(load_path, self.device)
        check_settings(checkpoint.get("settings"), self.settings, load_path)
        load_network_weights(self.model, checkpoint["model"], load_path)
        if "optimizer" in checkpoint:
            self.opt.load_state_dict(checkpoint["optimizer"])
        else:
            print(f"{load_path} holds no optimizer state (a starter checkpoint): "
                  "Adam starts afresh.")
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = checkpoint["step"]
        self.history = checkpoint.get("history", [])

    # ------------------------------------------------------------ visualisation

    def _timesteps(self, t, batch_size):
        """A batch of the time step ``t``, as p_sample and q_sample take it."""
        return torch.full((batch_size,), t, device=self.device, dtype=torch.long)

    def _forward_process(self, x_0, steps):
        """x_t = q_sample(x_0, t, noise) (eq. 2 with abar_t) at each of ``steps`` and x_T (t = T-1
        in code), all from one noise draw; returns (frames, x_T)."""
        noise = torch.randn_like(x_0)
        frames = [self.model.q_sample(x_0, self._timesteps(t, len(x_0)), noise) for t in steps]
        last = self.model.num_timesteps - 1
        return frames, self.model.q_sample(x_0, self._timesteps(last, len(x_0)), noise)

    def _backward_process(self, x_T, steps):
        """Algorithm 2 by ``p_sample`` from the raw x_T; the states after the reverse steps at
        each of ``steps``, from the noisiest (largest t) to the last (t = 0)."""
        frames = []
        x = x_T
        for t in reversed(range(self.model.num_timesteps)):
            x = self.model.p_sample(x, self._timesteps(t, len(x)), t)
            if t in steps:
                frames.append(x)
        return frames

    @torch.no_grad()
    def visualize_diffusion(self):
        """Parts 3 and 4: the forward and backward processes of the first training batch.

        Forward: q_sample at t = int(p T) for p in 0, 25, 50, 75, 99 %. Backward: p_sample steps
        from the raw x_T of that forward process (not clamped or rescaled), shown after the
        steps at the same t. Saves forward_diffusion.png and backward_diffusion.png, shows them
        in a notebook, logs them to wandb; returns the two paths.
        """
        self.model.eval()
        steps = [int(fraction * self.model.num_timesteps) for fraction in VISUALIZED_FRACTIONS]
        x_0 = to_model_range(self.batches.first_batch(self.batch_size))
        with self._autocast():
            forward, x_T = self._forward_process(x_0, steps)
            backward = self._backward_process(x_T, steps)
        labels = [f"{fraction:.0%}: t = {t}" for fraction, t in zip(VISUALIZED_FRACTIONS, steps)]
        paths = {}
        for name, frames, titles in (("forward_diffusion", forward, labels),
                                     ("backward_diffusion", backward, labels[::-1])):
            paths[name] = self.results_folder / f"{name}.png"
            plot_process([to_image_range(x.float()) for x in frames], titles, paths[name])
            show_in_notebook(paths[name])
        logger = WandbLogger(self.config, self.results_folder)
        logger.log(self.step, {}, paths)  # both figures in one wandb.log
        logger.finish()
        return paths["forward_diffusion"], paths["backward_diffusion"]


# ---------------------------------------------------------- checkpoints and files


class SaveError(OSError):
    """A file could not be written (a full disk, no permission): the message names the file,
    the reason and what to do, then ``next_step`` (how to resume, say). ``path``, the
    ``os_error`` and its ``reason`` are kept for callers that go on or add to the message."""

    def __init__(self, path, error, next_step=""):
        self.path = path
        self.os_error = error
        self.reason = error.strerror or str(error)
        advice = WRITE_ADVICE.get(error.errno, OTHER_WRITE_ADVICE)
        super().__init__(f"Cannot write {path}: {self.reason}. {advice}; files already saved "
                         f"there are intact. {next_step}".rstrip())
        self.errno = error.errno


@contextlib.contextmanager
def reported_write_errors(path):
    """Turn an OSError raised while writing ``path`` into a SaveError that explains it."""
    try:
        yield
    except SaveError:
        raise
    except OSError as error:
        raise SaveError(path, error) from None


def atomic_write(path, write):
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it to ``path``.

    A crash or Ctrl-C mid-write leaves the previous file intact instead of a truncated one, and
    a full disk or a folder without write permission raises SaveError, leaving no temporary file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with reported_write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as file:
                write(file)
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def model_settings(diffusion_model):
    """The settings a checkpoint must share with the model it is loaded into."""
    unet = diffusion_model.model  # a U-Net unpickled from the starter's unet.py has no dims
    return {"image_size": diffusion_model.image_size, "channels": diffusion_model.channels,
            "timesteps": diffusion_model.num_timesteps, "unet_dim": getattr(unet, "dim", None),
            "unet_dim_mults": list(getattr(unet, "dim_mults", []))}


def check_settings(saved, current, path):
    """Raise ValueError naming every setting where the checkpoint differs from the model.

    A starter checkpoint records no settings; its weights are checked when they are loaded.
    """
    mismatched = [f"{key}: checkpoint {saved.get(key)!r}, model {value!r}"
                  for key, value in current.items() if saved and saved.get(key) != value]
    if mismatched:
        raise ValueError(f"Checkpoint {path} does not match the model ({'; '.join(mismatched)}). "
                         "Build the model with the checkpoint's settings or train a new one.")


def read_checkpoint(path, device):
    """The dict saved by ``Trainer.save`` (ours or the starter's) at ``path``, on ``device``.

    Raises FileNotFoundError when there is no file, ValueError when it is not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: train first, or give the path of one.")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many kinds for a bad file
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}); it may be "
                         "truncated or another kind of file. Pass a model.pt written by training."
                         ) from None
    if not isinstance(checkpoint, dict) or not {"step", "model"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a training checkpoint (it has no 'step' and 'model'). "
                         "Pass a model.pt written by training.")
    return checkpoint


def load_network_weights(diffusion_model, state_dict, path):
    """Load the U-Net's weights (the ``model.*`` entries) of a Diffusion state_dict.

    Schedule buffers that a diffusion.py may have saved are skipped: they follow from T.
    """
    prefix = "model."
    weights = {key[len(prefix):]: value for key, value in state_dict.items()
               if key.startswith(prefix)}
    try:
        diffusion_model.model.load_state_dict(weights)
    except RuntimeError as error:
        reasons = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise ValueError(f"The weights in {path} do not fit this U-Net: {reasons} Use the "
                         "unet_dim and unet_dim_mults it was trained with.") from None


def move_to_device(diffusion_model, device):
    """``diffusion_model.to(device)``, and also the schedule tensors that a diffusion.py keeps as
    plain attributes rather than buffers (the skeleton allows it), which ``.to`` leaves behind."""
    diffusion_model.to(device)
    for name, value in list(vars(diffusion_model).items()):
        if isinstance(value, torch.Tensor):
            setattr(diffusion_model, name, value.to(device))
    return diffusion_model


# ---------------------------------------------------------------- data


def default_cache_folder():
    """Where decoded images and FID statistics are kept: shared by every results folder (Parts
    1, 2 and 5 decode once between them), in the user's cache (``$XDG_CACHE_HOME``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "a3_ddpm"


def afhq_root(folder):
    """The folder that AFHQ's zip goes into and unpacks in: the one above ``folder`` when it is a
    ``train`` folder (as ``./data/train``), else ``folder`` itself."""
    folder = Path(folder).expanduser()
    return folder.parent if folder.name == "train" else folder


def download_hint(folder):
    """How to download AFHQ (a 6.5 GB zip) so that ``folder`` holds the class folders: main.py's
    ``--download`` (``download_afhq``), which survives a cut-short download or unzip; paths are
    written relative to the working directory, where the user types them."""
    root = afhq_root(Path(folder).expanduser().resolve())
    relative = os.path.relpath(root)
    if not relative.startswith(".."):
        root = "." if relative == "." else f"./{Path(relative).as_posix()}"
    return (f"Download AFHQ (a 6.5 GB zip, into {root}) by running the command again with "
            "--download added (in the notebook: DOWNLOAD_AFHQ = True); a download or unzip cut "
            "short is completed by running it again.")


def afhq_class_names(data_class):
    """The AFHQ classes that ``data_class`` ("cat", "dog", "wild", or "all"/None) trains on."""
    if data_class in (None, "all"):
        return AFHQ_CLASSES
    if data_class not in AFHQ_CLASSES:
        raise ValueError(f"data_class must be one of {AFHQ_CLASSES} or 'all', got {data_class!r}.")
    return (data_class,)


def gdown_download(zip_path):
    """Download AFHQ's zip from Google Drive to ``zip_path``; gdown resumes its own partial file
    of an earlier, interrupted call."""
    import gdown  # only a download needs it

    try:
        gdown.download(id=AFHQ_DRIVE_ID, output=str(zip_path), quiet=False, resume=True)
    except Exception as error:  # noqa: BLE001 - the network and Google Drive fail in many ways
        raise ValueError(f"Could not download AFHQ ({type(error).__name__}: {error}). Check the "
                         "internet connection and run again: the download resumes.") from None


def download_afhq(folder, data_class="cat", keep_zip=True, download=gdown_download):
    """Make ``folder`` (``--data_path``: a ``train`` folder or the one above it) hold AFHQ's
    training images of ``data_class``, downloading the zip if needed; returns the train folder.

    Safe to run again after a disconnect at any point: a zip cut short is downloaded again (one
    line says so), each class is unzipped into a temporary folder renamed into place only when
    complete (a class folder missing files of the zip is unzipped again), and only the classes
    asked for are unzipped. The zip is kept, so another class needs no new download, unless
    ``keep_zip`` is False. ``download(zip_path)`` fetches the zip (tests pass their own).
    """
    root = afhq_root(folder)
    zip_path = root / AFHQ_ZIP_NAME
    train_folder = root / "train"
    for name in afhq_class_names(data_class):
        if not extracted_in_full(train_folder / name, zip_path):
            fetch_zip(zip_path, download)
            extract_class(zip_path, name, train_folder)
    if not keep_zip and zip_path.exists():
        zip_path.unlink()
        print(f"Deleted {zip_path}.")
    return train_folder


def zip_problem(zip_path):
    """None for a whole zip file, else what is wrong with it. A zip's directory is at its end,
    so a file cut short has none."""
    if not zip_path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(zip_path):
            return None
    except zipfile.BadZipFile as error:
        return f"not a whole zip ({error}; {zip_path.stat().st_size:,} bytes)"


def fetch_zip(zip_path, download):
    """Download the zip unless a whole one is there; one cut short is downloaded again."""
    problem = zip_problem(zip_path)
    if problem is None:
        return
    if problem != "missing":
        print(f"{zip_path} is {problem}, probably a download cut short: downloading it again.")
        zip_path.unlink()
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    download(zip_path)
    problem = zip_problem(zip_path)
    if problem is not None:
        raise ValueError(f"The download of {zip_path} is {problem} (Google Drive may refuse "
                         "for a while after many downloads): run the download again later.")


def class_members(archive, data_class):
    """``(member, path inside the class folder)`` of each file of ``train/<class>/`` in the zip
    (``afhq/train/<class>/`` in AFHQ v1). A name that would leave the class folder is refused."""
    prefixes = (f"train/{data_class}/", f"afhq/train/{data_class}/")
    members = []
    for member in archive.infolist():
        prefix = next((p for p in prefixes if member.filename.startswith(p)), None)
        if prefix is None or member.is_dir():
            continue
        inside = PurePosixPath(member.filename[len(prefix):])
        if inside.is_absolute() or ".." in inside.parts or ":" in member.filename:  # C: too
            raise ValueError(f"Refusing {member.filename!r} of the zip: it would be written "
                             "outside its class folder. Download AFHQ from its usual source.")
        members.append((member, inside))
    return members


def extracted_in_full(class_folder, zip_path):
    """Whether ``class_folder`` is there and, when the zip is at hand, holds each of the class's
    files of the zip at its full size (a folder unzipped by hand and cut short does not)."""
    if not class_folder.is_dir():
        return False
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = class_members(archive, class_folder.name)
    except (OSError, zipfile.BadZipFile):  # no zip (deleted) or one cut short: trust the folder
        return True
    missing = [inside for member, inside in members
               if not (class_folder / inside).is_file()
               or (class_folder / inside).stat().st_size != member.file_size]
    if missing:
        print(f"{class_folder} lacks {len(missing)} of the zip's {len(members)} files (an unzip "
              "cut short): unzipping it again.")
    return not missing


def extract_class(zip_path, data_class, train_folder):
    """Unzip ``train/<class>/`` into ``train_folder/<class>`` through a temporary folder beside
    ``train_folder``, renamed into place when complete; one left by a cut-short run is redone."""
    partial = train_folder.parent / f".{data_class}.unzipping"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = class_members(archive, data_class)
            if not members:
                raise ValueError(f"{zip_path} holds no train/{data_class}/ images: it is not "
                                 "AFHQ's zip. Delete it and download again.")
            for member, inside in tqdm(members, desc=f"unzipping train/{data_class}"):
                (partial / inside).parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(partial / inside, "wb") as target:
                    shutil.copyfileobj(source, target)
    except zipfile.BadZipFile as error:  # a damaged member: its checksum differs
        zip_path.unlink()
        raise ValueError(f"{zip_path} is damaged ({error}), so it is deleted: run again to "
                         "download it afresh.") from None
    train_folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(train_folder / data_class, ignore_errors=True)  # one cut short by hand
    os.replace(partial, train_folder / data_class)


@dataclass
class ImageSet:
    """Decoded training images, uint8 tensors of shape (N, 3, S, S) on the CPU.

    ``train`` is resized to ``int(1.12 * image_size)``, the source of the random crops;
    ``reference`` is resized to ``image_size``: the real images FID compares samples with.
    ``key`` identifies the source files and sizes (it names the cache files).
    """

    train: torch.Tensor
    reference: torch.Tensor
    key: str

    def __len__(self):
        return len(self.train)

    def __getitem__(self, index):
        """Image ``index`` as the starter's Dataset gives it without augmentation (resized to
        image_size, ToTensor's range): a float tensor (3, image_size, image_size) in [0, 1]."""
        return self.reference[index].float() / 255


def find_class_root(folder):
    """Return the folder that holds the class folders (cat/, dog/, wild/).

    ``folder`` is that folder itself (``data/train``, ``data/afhq/train``) or, for convenience, a
    dataset root that holds it: ``data`` with ``train/`` (AFHQ v2) or ``afhq/train/`` (AFHQ v1).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Data folder {folder} does not exist. {download_hint(folder)}")
    for class_root in (folder / "train", folder / "afhq" / "train"):
        if class_root.is_dir():
            return class_root.resolve()
    return folder.resolve()


def list_image_files(class_root, data_class):
    """The sorted image files of one class folder, or of every class folder for None/"all".

    A file or class folder that cannot be looked at or listed is skipped with a warning naming it
    (see ``listed_images``), so that it stops the run only when no image is left.
    """
    if data_class in (None, "all"):
        class_folders = sorted(path for path in class_root.iterdir() if path.is_dir())
    else:
        class_folders = [class_root / data_class]
        if not class_folders[0].is_dir():
            present = sorted(path.name for path in class_root.iterdir() if path.is_dir())
            raise FileNotFoundError(
                f"No folder {class_folders[0]} for data_class={data_class!r} (found {present}). "
                f"{download_hint(class_root)}")
    files = sorted(path for class_folder in class_folders for path in listed_images(class_folder))
    if not files:
        raise FileNotFoundError(
            f"No {'/'.join(IMAGE_SUFFIXES)} images in {[str(f) for f in class_folders]}. "
            f"{download_hint(class_root)}")
    return files


def listed_images(folder):
    """The image files (by suffix) in ``folder`` that are regular files: a FIFO would block the
    decoding forever, a folder or a dangling link cannot be read. Each entry left out, and the
    folder itself when it cannot be listed, is said in a warning naming it and why."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        warnings.warn(f"Skipping unreadable folder {folder}: {error.strerror or error}",
                      stacklevel=3)
        return []
    return [path for path in entries
            if path.suffix.lower() in IMAGE_SUFFIXES and is_regular_file(path)]


def is_regular_file(path):
    """Whether ``path`` is a regular file; if not, or if it cannot be looked at, a warning
    names it and says why."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError as error:
        warn_skipping(path, error.strerror or error)
        return False
    if not regular:
        warn_skipping(path, "not a regular file")
    return regular


def warn_skipping(path, reason):
    """The one warning of an image file that is left out, naming it and why."""
    warnings.warn(f"Skipping unreadable image {path}: {reason}", stacklevel=3)


def image_set_key(files, image_size):
    """A short hash of the file list (paths, sizes, modification times) and the image size."""
    stats = [(str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in files]
    text = json.dumps([image_size, CROP_MARGIN, stats])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_rgb(image):
    """The image in RGB. 16-bit gray levels are scaled to 8 bits first (PIL's own conversion
    clips them at 255, nearly all white); a palette or other image with a transparent colour
    goes through RGBA, as PIL asks; CMYK, grayscale and RGBA convert directly (alpha dropped)."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image, dtype=np.float64) / 257  # 65535 -> 255
        image = Image.fromarray(levels.round().clip(0, 255).astype(np.uint8))
    elif "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(path, sizes):
    """Decode one image as RGB (see ``to_rgb``) resized to each square size."""
    with Image.open(path) as image:
        rgb = to_rgb(image)
    return [np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC)) for size in sizes]


def _decode_or_error(path, sizes):
    """``decode_image``, or the exception it raised, so that one bad file skips only itself."""
    try:
        return decode_image(path, sizes)
    except Exception as error:  # noqa: BLE001 - PIL's decoders raise many kinds on hostile files
        return error


def decode_images(files, image_size, workers):
    """Decode every file once, on ``workers`` threads (PIL releases the GIL while decoding).

    Files that cannot be opened (no permission, gone) or that PIL cannot or will not decode
    (truncated, not images, decompression bombs) are skipped with a warning naming them;
    returns ``(train, reference)``.
    """
    sizes = (int(image_size * CROP_MARGIN), image_size)
    decoded = []
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(files), desc="decoding images") as progress:
        # PIL only warns of an image above Image.MAX_IMAGE_PIXELS (a possible decompression
        # bomb), without its name: as an error, it skips the image with the warning below
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for path, result in zip(files, pool.map(_decode_or_error, files, [sizes] * len(files))):
            progress.update()
            if isinstance(result, Exception):
                warn_skipping(path, result)
            else:
                decoded.append(result)
    if not decoded:
        raise ValueError(f"None of the {len(files)} images in {files[0].parent} could be read "
                         "(the warnings above say why): replace them with readable JPEG or PNG "
                         "images, or download AFHQ again.")
    if len(decoded) < len(files):
        print(f"Skipped {len(files) - len(decoded)} unreadable image(s) of {len(files)}.")
    return [torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
            for images in zip(*decoded)]


def read_cache(cache_file, read):
    """``read(cache_file)``, or None when there is no such file or it cannot be used.

    A cache cut short (by a full disk or a killed copy) or holding something else is said in one
    line and left for the caller to rebuild: it never stops a run, nor needs deleting by hand.
    ``read`` raises ValueError, saying why, for a readable file of the wrong content.
    """
    try:
        if not cache_file.is_file():  # which raises for a folder the user may not enter
            return None
        return read(cache_file)
    except ValueError as error:
        reason = str(error)
    except Exception as error:  # noqa: BLE001 - loading a damaged file fails in many ways
        reason = f"it cannot be read: {type(error).__name__}"
    print(f"Cache file {cache_file} is not usable ({reason}): rebuilding it.")
    return None


def write_cache(cache_file, write):
    """``atomic_write`` a cache file; one that cannot be written is said in one line, and the
    run goes on without it (the next run computes it again)."""
    try:
        atomic_write(cache_file, write)
    except SaveError as error:
        print(f"Cannot write the cache file {cache_file} ({error.reason}), so this run goes on "
              "without it. To keep the cache between runs, set XDG_CACHE_HOME (or pass "
              "cache_folder) to a folder you can write to.")


def read_image_cache(cache_file, image_size):
    """The ``{"train", "reference"}`` uint8 tensors saved by ``load_image_set`` for this size;
    ValueError if the file holds anything else."""
    cached = torch.load(cache_file, weights_only=True)
    sides = {"train": int(image_size * CROP_MARGIN), "reference": image_size}
    if not isinstance(cached, dict) or cached.keys() != sides.keys():
        raise ValueError("it does not hold the keys 'train' and 'reference'")
    for name, side in sides.items():
        images = cached[name]
        if (not isinstance(images, torch.Tensor) or images.dtype != torch.uint8
                or images.shape[1:] != (3, side, side) or len(images) == 0):
            raise ValueError(f"its {name!r} images are not uint8 of shape (N, 3, {side}, {side})")
    if len(cached["train"]) != len(cached["reference"]):
        raise ValueError("it holds different numbers of 'train' and 'reference' images")
    return cached


def load_image_set(folder, data_class, image_size, cache_folder, workers=1):
    """Decode the class's images once and cache them in ``cache_folder``; later calls reuse them.

    The cache file name holds a hash of the resolved file list with sizes and modification times,
    so adding, removing or changing an image (or another class or size) decodes afresh. A damaged
    cache file is decoded afresh too, and a cache folder that cannot be written only costs the
    decoding at the next run.
    """
    files = list_image_files(find_class_root(folder), data_class)
    key = image_set_key(files, image_size)
    cache_file = Path(cache_folder) / f"images_{data_class or 'all'}_{image_size}px_{key}.pt"
    cached = read_cache(cache_file, lambda path: read_image_cache(path, image_size))
    if cached is not None:
        return ImageSet(cached["train"], cached["reference"], key)
    train, reference = decode_images(files, image_size, workers)
    images = {"train": train, "reference": reference}
    write_cache(cache_file, lambda file: torch.save(images, file))
    return ImageSet(train, reference, key)


class DeviceBatches:
    """Endless training batches drawn, cropped and (with ``augment``) flipped on the device.

    The uint8 images (N, 3, S', S'), S' = int(1.12 * image_size), live on the device (5,000 cats
    at 35x35 are 18 MB). Each batch takes random images (in file order when ``shuffle`` is off)
    and, in one gather, an ``image_size`` crop of each: with ``augment`` a random crop, mirrored
    with probability 1/2 (the starter's RandomCrop and RandomHorizontalFlip per image, which
    torchvision's transforms do not do per sample of a batch tensor), else the centre crop (its
    CenterCrop). All of it is device work, with no host sync and no Python state, so a CUDA
    graph can capture it: even the file-order position is a tensor.
    """

    def __init__(self, images, image_size, batch_size, shuffle, device, augment=True):
        if images.shape[-1] < image_size:
            raise ValueError(f"Images of {images.shape[-1]} px cannot be cropped to {image_size}.")
        self.images = images.to(device)
        self.image_size = image_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.margin = images.shape[-1] - image_size
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.offsets = torch.arange(image_size, device=device)
        self.channels = torch.arange(images.shape[1], device=device).view(1, -1, 1, 1)

    def _indices(self):
        """The batch's image indices: random, or the next ones in file order (a device tensor)."""
        count = len(self.images)
        if self.shuffle:
            return torch.randint(count, (self.batch_size,), device=self.images.device)
        indices = (self.position + torch.arange(self.batch_size, device=self.images.device)) % count
        self.position.copy_((self.position + self.batch_size) % count)
        return indices

    def _crop_windows(self, count):
        """Rows and columns (count, image_size) of each image's crop, mirrored where flipped."""
        shape = (count, 1)
        device = self.images.device
        if not self.augment:
            centre = self.offsets + self.margin // 2
            return centre.expand(count, -1), centre.expand(count, -1)
        top = torch.randint(self.margin + 1, shape, device=device)
        left = torch.randint(self.margin + 1, shape, device=device)
        mirrored = torch.rand(shape, device=device) < 0.5
        return top + self.offsets, left + torch.where(mirrored, self.offsets.flip(0), self.offsets)

    def next_batch(self):
        """A float batch (B, 3, image_size, image_size) in [0, 1]."""
        indices = self._indices()
        rows, columns = self._crop_windows(len(indices))
        crops = self.images[indices.view(-1, 1, 1, 1), self.channels,
                            rows[:, None, :, None], columns[:, None, None, :]]
        return crops.float() / 255

    def first_batch(self, count):
        """The first ``count`` images in file order, centre-cropped, not flipped, in [0, 1]."""
        start = self.margin // 2
        window = slice(start, start + self.image_size)
        return self.images[:count, :, window, window].float() / 255


def endless_batches(batches):
    """The starter's ``Trainer.dl``: an endless iterator of training batches in [-1, 1]."""
    while True:
        yield to_model_range(batches.next_batch())


def to_model_range(images):
    """Map images from [0, 1] to the model's range [-1, 1]."""
    return images * 2 - 1


def to_image_range(x):
    """Map the model's images back to [0, 1], clamping what the process left outside [-1, 1]."""
    return ((x + 1) / 2).clamp(0, 1)


# ---------------------------------------------------------------- FID


class FidScorer:
    """FID (clean-fid, mode "clean") of generated images against the training images of the class.

    The reference statistics (mean and covariance of the features of ``reference_images``) are
    computed once and stored in ``cache_file`` (npz), which later evaluations and trainers reuse.
    Each evaluation writes its samples into an emptied ``samples_folder``, so nothing stale counts.
    Features come from clean-fid (its resize to 299x299 and its extractor), the distance from
    ``frechet_distance`` below.
    ``feature_extractor`` maps float images (B, 3, 299, 299) in [0, 255] to features (B, D); None
    builds clean-fid's Inception (downloaded by clean-fid on first use).
    """

    def __init__(self, reference_images, cache_file, samples_folder, device, workers,
                 feature_extractor=None):
        self.reference_images = reference_images
        self.cache_file = Path(cache_file)
        self.samples_folder = Path(samples_folder)
        self.device = device
        self.workers = workers
        self.feature_extractor = feature_extractor
        self.reference = None

    def _statistics(self, images, folder):
        """Mean and covariance of the features of uint8 images, saved as PNGs in ``folder``."""
        shutil.rmtree(folder, ignore_errors=True)
        with reported_write_errors(folder):
            folder.mkdir(parents=True)
            for index, image in enumerate(images):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.png")
        if self.feature_extractor is None:  # built at the first use, as it may be downloaded
            self.feature_extractor = build_feature_extractor(
                "clean", self.device, use_dataparallel=False)
        features = clean_fid.get_folder_features(
            str(folder), self.feature_extractor, num_workers=self.workers, device=self.device,
            mode="clean", verbose=False)
        return features.mean(axis=0), np.cov(features, rowvar=False)

    def reference_statistics(self):
        """(mu, sigma, sqrt of sigma) of the reference images: from memory, else from the cache
        file, else computed and cached (a damaged cache file is computed afresh)."""
        if self.reference is None:
            statistics = read_cache(self.cache_file, read_fid_statistics)
            if statistics is None:  # PNGs in a temporary folder: the cache may not be writable
                with tempfile.TemporaryDirectory() as folder:
                    statistics = self._statistics(self.reference_images, Path(folder) / "images")
                write_cache(self.cache_file, lambda file: np.savez(
                    file, mu=statistics[0], sigma=statistics[1]))
            mu, sigma = statistics
            self.reference = mu, sigma, psd_sqrt(sigma)
        return self.reference

    def score(self, images):
        """FID of uint8 images (N, 3, S, S) against the reference statistics."""
        reference = self.reference_statistics()
        mu, sigma = self._statistics(images.cpu(), self.samples_folder)
        return frechet_distance(mu, sigma, *reference)


def read_fid_statistics(cache_file):
    """(mu, sigma) saved by ``FidScorer``: a mean (D,) and a covariance (D, D) of finite floats;
    ValueError if the file holds anything else."""
    with np.load(cache_file) as cached:
        if sorted(cached.files) != ["mu", "sigma"]:
            raise ValueError("it does not hold the arrays 'mu' and 'sigma'")
        mu, sigma = cached["mu"], cached["sigma"]
    if (mu.ndim != 1 or sigma.shape != (len(mu), len(mu))
            or not all(np.issubdtype(array.dtype, np.floating) for array in (mu, sigma))
            or not (np.isfinite(mu).all() and np.isfinite(sigma).all())):
        raise ValueError("its 'mu' and 'sigma' are not a mean (D,) and a covariance (D, D) "
                         "of finite floats")
    return mu, sigma


def psd_sqrt(matrix):
    """The symmetric square root of a covariance matrix (round-off negative eigenvalues -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu_1, sigma_1, mu_2, sigma_2, sigma_2_sqrt):
    """FID = |mu_1 - mu_2|^2 + tr(sigma_1) + tr(sigma_2) - 2 tr((sigma_1 sigma_2)^(1/2)).

    With R = sigma_2^(1/2), tr((sigma_1 sigma_2)^(1/2)) is the sum of the square roots of the
    eigenvalues of the symmetric R sigma_1 R: exact, several times faster than the scipy sqrtm of
    clean-fid's frechet_distance, which passes an argument SciPy 1.18 removed.
    """
    eigenvalues = np.linalg.eigvalsh(sigma_2_sqrt @ sigma_1 @ sigma_2_sqrt)
    trace_of_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(((mu_1 - mu_2) ** 2).sum() + np.trace(sigma_1) + np.trace(sigma_2)
                 - 2 * trace_of_sqrt)


def fid_worker_count(requested):
    """clean-fid's DataLoader workers: none unless processes fork (its resize closure does not
    pickle under spawn, the default on Windows and macOS), and never more than the CPUs."""
    if multiprocessing.get_start_method() != "fork":
        return 0
    return max(0, min(requested, os.cpu_count() or 1))


def extractor_name(feature_extractor):
    """The part of the FID cache name that tells feature extractors apart: "inception" for
    clean-fid's own, whether built here or passed in (main.py builds it to check --fid)."""
    if (feature_extractor is None
            or getattr(feature_extractor, "__module__", "") == "cleanfid.features"):
        return "inception"
    return getattr(feature_extractor, "__name__", type(feature_extractor).__name__)


# ---------------------------------------------------------------- wandb


def wandb_key_available():
    """Whether wandb has an API key: WANDB_API_KEY or a ~/.netrc entry for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """A wandb run (project DDPM_AFHQ, named after the results folder, as the starter's) that
    never blocks and never breaks training.

    WANDB_MODE is respected. Without it and without an API key the run is offline (sync it later
    with ``wandb sync``): wandb never stops at its login question, in a terminal or not.
    A missing or failing wandb only warns.
    """

    def __init__(self, config, folder):
        self.wandb = None
        self.run = None
        try:
            import wandb
        except ImportError:
            print("wandb is not installed: metrics go to metrics.csv and the PNG figures only.")
            return
        mode = None
        if "WANDB_MODE" not in os.environ and not wandb_key_available():
            mode = "offline"
            print("wandb: no API key, so logging offline (run `wandb login` once to log online; "
                  "WANDB_MODE=disabled turns wandb off).")
        try:
            self.run = wandb.init(project=WANDB_PROJECT, name=Path(folder).resolve().name,
                                  config=config, mode=mode,
                                  dir=os.environ.get("WANDB_DIR", str(folder)))
            self.wandb = wandb
        except Exception as error:  # noqa: BLE001 - logging is optional, training must go on
            warnings.warn(f"wandb did not start ({error}); continuing without it.", stacklevel=2)

    def log(self, step, metrics, images=None):
        """One wandb.log call for this step: the metrics and the images (name -> PNG path)."""
        if self.run is None:
            return
        pictures = {name: self.wandb.Image(str(path)) for name, path in (images or {}).items()}
        self.run.log({**metrics, **pictures}, step=step)

    def finish(self):
        """End the wandb run (wandb syncs it), if one started."""
        if self.run is not None:
            self.run.finish()


# ---------------------------------------------------------------- figures


def plot_curve(steps, values, label, path):
    """Save a line plot of ``values`` against training steps as a PNG."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.plot(steps, values, marker="o" if len(steps) <= 30 else None)
    axes.set_xlabel("training step")
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))


def plot_process(frames, titles, path):
    """Save one panel per frame (a grid of the batch's images in [0, 1]) side by side."""
    figure = Figure(figsize=(3 * len(frames), 3.4))
    for axes, frame, title in zip(figure.subplots(1, len(frames)), frames, titles):
        grid = make_grid(frame[:IMAGES_PER_PANEL].float().cpu(), nrow=4, padding=1)
        axes.imshow(grid.permute(1, 2, 0).numpy())
        axes.set_title(title)
        axes.axis("off")
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))


def show_in_notebook(path):
    """Display a PNG inline when running under IPython (a notebook); do nothing elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import Image as NotebookImage, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(NotebookImage(filename=str(path)))


# ------------------------------------------------ devices, precision and the CUDA graph


def default_device():  # the same as Part A's a3_helper.pick_device, as each part ships alone
    """The starter's choice: CUDA, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_native_bf16():
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX) and PyTorch may use it
    (``ATEN_CPU_CAPABILITY=avx2`` forbids AVX-512): elsewhere bf16 is emulated, and slower
    than float32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    allowed = torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "ZVECTOR", "VSX")
    return allowed and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def keep_freed_memory_for_reuse():
    """Have glibc's malloc reuse the memory of freed tensors instead of returning it to the system.

    By default every tensor over 32 MB (q and k of the linear attention at 32x32, for a batch of
    64) is mapped fresh from the system and unmapped when freed, so each training step pays
    for touching those pages anew: about a third of a float32 step on a 2-core CPU. Mapping
    nothing and trimming nothing makes the heap keep them. PyTorch has no caching allocator on
    the CPU; this is the one knob. Linux with glibc only (elsewhere nothing changes).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2 ** 30)


def autocast_dtype(device, precision="auto"):
    """The dtype of mixed precision, None for float32.

    ``precision="auto"``: bf16 on GPUs that run it natively (compute capability 8.0, Ampere,
    and newer) and on CPUs with native bf16; fp16 (with a GradScaler) on older GPUs such as
    Colab's T4; float32 elsewhere. ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only) force one.
    """
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be 'auto' or one of {list(PRECISIONS)}, got {precision!r}.")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' needs a CUDA GPU; use 'bf16' or 'fp32' on a "
                         f"{device.type} device.")
    if precision != "auto":
        return PRECISIONS[precision]
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def adam(parameters, learning_rate, device):
    """Adam, fused into one kernel per step on a GPU and a CPU, not a loop over the U-Net's 276
    tensors. Fused, it also lets a GradScaler (fp16, as on a T4) skip an overflowing step on
    the GPU, where a plain Adam makes the host wait for the overflow check at every step."""
    return torch.optim.Adam(parameters, lr=learning_rate, fused=device.type in ("cuda", "cpu"))


def require_positive(**values):
    """Raise ValueError naming the first of the counts (name=value) below 1."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}.")


def require_above_zero(**values):
    """Raise ValueError naming the first amount (name=value) that is not above 0."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}.")


class CudaGraphed:
    """``function()`` run as a CUDA graph: the first call captures it, later calls replay it.

    The U-Net of the handout is so small that a GPU finishes each of its kernels sooner than
    Python can launch the next one; replaying a captured graph launches the thousands of
    kernels of a training step at once. ``function`` must keep the rules stated at
    ``Trainer.loss_and_gradients``. Its random draws still change at every replay (PyTorch's
    graph-safe RNG), and its output tensor is overwritten by the next replay. If the capture
    fails, a warning gives the reason and ``function`` runs eagerly.
    """

    WARMUP_CALLS = 3  # cuDNN and cuBLAS pick kernels and allocate workspaces before the capture

    def __init__(self, function):
        self.function = function
        self.graph = None
        self.output = None
        self.failed = False

    def __call__(self):
        """Replay the graph (capturing it at the first call), or run ``function`` if it failed."""
        if self.failed:
            return self.function()
        if self.graph is None:
            try:
                self._capture()
            except RuntimeError as error:
                self.failed = True
                warnings.warn(f"CUDA graph capture failed, so training goes on without it: {error}",
                              stacklevel=2)
                return self.function()
        self.graph.replay()
        return self.output

    def _capture(self):
        """Warm up on a side stream, then record one call of ``function`` on it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP_CALLS):
                self.function()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self.output = self.function()
        self.graph = graph
