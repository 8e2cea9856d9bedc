"""FID (clean-fid, mode "clean") of generated images against the training images of the class,
with the reference statistics computed once and cached (the starter recomputed them at every
evaluation: why its Part 2 took up to an hour). The images go to clean-fid's resize and network
from memory: the values are those of clean-fid's folder path, without writing and reading PNGs."""
from contextlib import nullcontext

import numpy as np
import torch
from cleanfid.features import build_feature_extractor
from cleanfid.fid import get_batch_features
from cleanfid.resize import build_resizer
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from files import read_cache, write_cache

# Images per Inception forward, channels-last throughout: 63-65, 61-65 and 61-62 ms an image at
# 16, 32 and 64, within the drift of a shared 2-core AMD EPYC Zen 4 (AVX-512), fp32.
FID_BATCH = 32


def inception_network(device):
    """clean-fid's Inception network on ``device``, downloaded by clean-fid on first use; a
    failed download raises ValueError saying what to do."""
    try:
        return build_feature_extractor("clean", device, use_dataparallel=False)
    except Exception as error:  # noqa: BLE001 - a download fails in many ways
        raise ValueError(f"FID needs clean-fid's Inception network, which is downloaded from "
                         f"the internet once ({type(error).__name__}: {error}). Connect once, or "
                         "turn FID off.") from None


def clean_resized(images):
    """clean-fid's "clean" resize (PIL bicubic of each channel in float32, to 299x299) of uint8
    images (N, 3, S, S): float32 (N, 3, 299, 299) in [0, 255], channels-last, the values its
    ResizeDataset makes of the same images read from PNG files."""
    resize = build_resizer("clean")
    resized = np.stack([resize(image) for image in images.permute(0, 2, 3, 1).numpy()])
    return torch.from_numpy(resized).permute(0, 3, 1, 2)  # (N, H, W, 3) seen as (N, 3, H, W)


VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def channels_last_only(tensor):
    """Whether ``tensor`` is a feature map in channels-last memory that is not also contiguous."""
    return (tensor.dim() == 4 and not tensor.is_contiguous()
            and tensor.is_contiguous(memory_format=torch.channels_last))


class ChannelsLastKept(TorchDispatchMode):
    """Within it, ``x.contiguous()`` of a channels-last feature map keeps it channels-last.

    clean-fid's Inception (a TorchScript file) makes each branch of its first mixed block
    contiguous before concatenating them, so every later layer runs channels-first, where the
    CPU's convolutions take 1.1x the time and its pooling 10x (profiled on Zen 4). The same
    operations on the same values in the other memory layout: the features differ by round-off
    (6e-7 of their largest), and an Inception forward takes 1.14x less time (Zen 4), 1.16-1.27x
    under the AVX2 caps. A view that channels-last strides cannot give (``reshape``,
    ``.contiguous().view()``) is taken of the channels-first copy that the mode put off.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in VIEWS and channels_last_only(args[0]):
            try:
                return func(*args, **kwargs)
            except RuntimeError:  # no view of these strides has that shape
                return func(args[0].contiguous(), *args[1:], **kwargs)
        if (func is torch.ops.aten.clone.default and channels_last_only(args[0])
                and kwargs.get("memory_format") == torch.contiguous_format):
            kwargs = {**kwargs, "memory_format": torch.preserve_format}
        if func is torch.ops.aten.contiguous.default and channels_last_only(args[0]):
            return args[0]  # under inference mode, contiguous() comes whole, not as a clone
        return func(*args, **kwargs)


class FidScorer:
    """FID (clean-fid, mode "clean") of generated images against the training images of the class.

    The reference statistics (mean and covariance of the features of ``reference_images``) are
    computed once and stored in ``cache_file`` (npz), which later evaluations and trainers reuse.
    Features come from clean-fid (its resize to 299x299 and its extractor), the distance from
    ``frechet_distance`` below.
    ``feature_extractor`` maps float images (B, 3, 299, 299) in [0, 255] to features (B, D); None
    builds clean-fid's Inception (downloaded by clean-fid on first use).
    """

    def __init__(self, reference_images, cache_file, device, feature_extractor=None):
        self.reference_images = reference_images
        self.cache_file = cache_file
        self.device = device
        self.feature_extractor = feature_extractor
        self.reference = None

    def features(self, images, description):
        """Features (N, D), float32, of uint8 images (N, 3, S, S), ``FID_BATCH`` at a time."""
        if self.feature_extractor is None:  # built at the first use, as it may be downloaded
            self.feature_extractor = inception_network(self.device)
        batches = tqdm(images.cpu().split(FID_BATCH), desc=description, leave=False)
        on_cpu = torch.device(self.device).type == "cpu"
        with ChannelsLastKept() if on_cpu else nullcontext():
            return np.concatenate([get_batch_features(clean_resized(batch),
                                                      self.feature_extractor, self.device)
                                   for batch in batches])

    def statistics(self, images, description):
        """Mean and covariance of the features of uint8 images."""
        features = self.features(images, description)
        return features.mean(axis=0), np.cov(features, rowvar=False)

    def reference_statistics(self):
        """(mu, sigma, sqrt of sigma) of the reference images: from memory, else from the cache
        file, else computed and cached (a damaged cache file is computed afresh)."""
        if self.reference is None:
            statistics = read_cache(self.cache_file, read_fid_statistics)
            if statistics is None:
                statistics = self.statistics(self.reference_images, "FID: training images")
                write_cache(self.cache_file, lambda file: np.savez(
                    file, mu=statistics[0], sigma=statistics[1]))
            mu, sigma = statistics
            self.reference = mu, sigma, psd_sqrt(sigma)
        return self.reference

    def score(self, images):
        """FID of uint8 images (N, 3, S, S) against the reference statistics."""
        reference = self.reference_statistics()
        return frechet_distance(*self.statistics(images, "FID: samples"), *reference)


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


def extractor_name(feature_extractor):
    """The part of the FID cache name that tells feature extractors apart: "inception" for
    clean-fid's own, whether built here or passed in (main.py builds it to check --fid)."""
    if (feature_extractor is None
            or getattr(feature_extractor, "__module__", "") == "cleanfid.features"):
        return "inception"
    return getattr(feature_extractor, "__name__", type(feature_extractor).__name__)
