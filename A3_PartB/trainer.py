"""Training of the DDPM in diffusion.py: the loop of Algorithm 1, its milestones and checkpoints.

Provided by the course's starter, with its contract (``Trainer``'s arguments, attributes and
output names); it calls diffusion.py only through the skeleton's interface, so any correct
student diffusion.py runs in it. Read ``Trainer.train`` first: one training step, then what
happens every ``save_and_sample_every`` steps, every ``checkpoint_minutes`` and every
``log_every`` steps. The rest of Part B lives in rooms of its own: ``images`` (the decoded
images and their batches), ``afhq`` (the download), ``fid_score``, ``reporting`` (wandb, the
figures), ``device`` (precision, Adam, the CUDA graph), ``checkpoints`` and ``files``.
"""
import math
import os
import sys
import time
from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm import tqdm

from checkpoints import check_settings, load_network_weights, model_settings, read_checkpoint
from device import (adam, autocast, autocast_dtype, CudaGraphed, default_device,
                    keep_freed_memory_for_reuse, move_to_device)
from fid_score import extractor_name, FidScorer
from files import atomic_write, default_cache_folder, reported_write_errors, SaveError
from images import DeviceBatches, endless_batches, load_image_set, to_image_range, to_model_range
from reporting import (plot_metrics, plot_process, show_in_notebook, WandbLogger,
                       write_metrics)
from settings import SETTINGS

VISUALIZED_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.99)
CPU_SAMPLING_BATCH = 256  # images through the U-Net per second on a 2-core Zen 4, batches of
# 64/256/512: 482/558/570 in bf16, 298/314/274 in fp32 under the AVX2 caps


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
    ``dataloader_workers`` caps the decoding threads at the CPU count;
    ``model.pt`` is also written once ``checkpoint_minutes`` of training have passed since the
    last checkpoint, so a kill (a Colab disconnect) loses at most that much.
    """

    def __init__(self, diffusion_model, folder, *, dataloader_workers=SETTINGS.dataloader_workers,
                 image_size=SETTINGS.image_size, train_batch_size=SETTINGS.batch_size,
                 train_lr=SETTINGS.learning_rate, train_num_steps=SETTINGS.train_steps,
                 gradient_accumulate_every=SETTINGS.gradient_accumulate_every,
                 save_and_sample_every=SETTINGS.save_and_sample_every,
                 results_folder=SETTINGS.save_folder, load_path=None, dataset=None, shuffle=True,
                 data_class=None, device=None, fid=SETTINGS.fid, image_set=None,
                 fid_feature_extractor=None, num_fid_samples=SETTINGS.num_fid_samples,
                 num_samples=SETTINGS.num_samples, log_every=SETTINGS.log_every,
                 cuda_graph=SETTINGS.cuda_graph, cache_folder=None, precision=SETTINGS.precision,
                 checkpoint_minutes=SETTINGS.checkpoint_minutes):
        require_positive(train_batch_size=train_batch_size,
                         save_and_sample_every=save_and_sample_every,
                         gradient_accumulate_every=gradient_accumulate_every,
                         log_every=log_every, num_samples=num_samples,
                         num_fid_samples=num_fid_samples)
        require_above_zero(train_lr=train_lr, checkpoint_minutes=checkpoint_minutes)
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
        self.cache_folder = (Path(cache_folder) if cache_folder is not None
                             else default_cache_folder())
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
            self.fid_scorer = FidScorer(self.ds.reference, self.cache_folder / name, self.device,
                                        fid_feature_extractor)

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
        self.unread_losses = []  # on the device: reading a loss makes the host wait for the GPU
        self.last_checkpoint_time = time.monotonic()
        try:
            while self.step < self.train_num_steps:
                # Algorithm 1, lines 2-6: the batch, t, the noise, x_t, the L1 loss and its
                # gradients (``loss_and_gradients``, replayed as a CUDA graph on a GPU) ...
                self.unread_losses.append(self.gradient_pass().clone())  # a replay overwrites it
                self.scaler.step(self.opt)  # ... and line 6's optimizer step, outside the graph
                self.scaler.update()
                self.step += 1
                progress.update(1)

                if self._at_milestone():  # every save_and_sample_every steps, and at the end
                    fid, grid_path = self._sample_grid_and_fid()
                    self._record_losses(logger, progress, fid=fid, images={"img": grid_path})
                    self.save()
                    write_metrics(self.history, self.results_folder / "metrics.csv")
                    plot_metrics(self.history, self.results_folder, self.num_fid_samples)
                elif time.monotonic() - self.last_checkpoint_time >= self.checkpoint_seconds:
                    self._record_losses(logger, progress)
                    self.save()
                elif len(self.unread_losses) == self.log_every:
                    self._record_losses(logger, progress)
        except KeyboardInterrupt:
            self._record_losses(logger, progress)
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
                write_metrics(self.history, self.results_folder / "metrics.csv")

    def _at_milestone(self):
        return self.step % self.save_and_sample_every == 0 or self.step == self.train_num_steps

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
        x_0 = next(self.dl)  # Algorithm 1, line 2: the step's batches as one
        noise = torch.randn_like(x_0)  # line 4; the model's forward draws t (line 3), makes x_t
        with autocast(self.device, self.amp_dtype):  # (line 5) and returns line 6's L1 loss
            loss = self.model(x_0, noise).float().mean()  # the starter's call
        self.scaler.scale(loss).backward()  # line 6's gradient
        return loss.detach()

    def _record_losses(self, logger, progress, fid=None, images=None):
        """Read the losses of the steps since the last call from the device: one history row
        and one wandb.log per step, the last step's with ``fid`` and ``images`` (a milestone's).
        Raises FloatingPointError on a nan."""
        if not self.unread_losses:
            return
        values = torch.stack(self.unread_losses).tolist()
        self.unread_losses = []
        first_step = self.step - len(values) + 1
        bad = [index for index, value in enumerate(values) if not math.isfinite(value)]
        if bad:
            raise FloatingPointError(
                f"The training loss became {values[bad[0]]} at step {first_step + bad[0]}, so "
                f"training stopped. The last good checkpoint (if any) is {self.checkpoint_path}; "
                "try a lower learning rate.")
        rows = [{"step": first_step + i, "loss": value, "fid": None}
                for i, value in enumerate(values)]
        rows[-1]["fid"] = fid
        self.history.extend(rows)
        for row in rows:
            metrics = {key: row[key] for key in ("loss", "fid") if row[key] is not None}
            logger.log(row["step"], metrics, images if row is rows[-1] else None)
        progress.set_postfix(loss=f"{values[-1]:.4f}")

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
        on a GPU, in batches of ``CPU_SAMPLING_BATCH`` on a CPU, where all 512 of an FID at once
        are slower without native bf16. Leaves the model in train mode (the skeleton's
        ``sample`` does not)."""
        batch = CPU_SAMPLING_BATCH if self.device.type == "cpu" else count
        starts = range(0, count, batch)  # a minute for FID's 512 on a 2-core CPU: shown
        with autocast(self.device, self.amp_dtype):
            samples = torch.cat([self.model.sample(min(batch, count - done)).float() for done in
                                 tqdm(starts, desc="sampling", leave=False, disable=len(starts) == 1)])
        self.model.train()
        return samples

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
        with autocast(self.device, self.amp_dtype):
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
