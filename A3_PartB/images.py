"""The training images: listed, decoded once (bad files skipped by name), cached, and drawn as
augmented batches on the device.

Images are decoded once, cached in ``cache_folder`` (``~/.cache/a3_ddpm``, see
``files.default_cache_folder``) and kept on the device, where each batch is cropped and
flipped as the starter's transforms do.
"""
import hashlib
import json
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from afhq import download_hint
from files import read_cache, write_cache

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # PIL's modes of 16-bit gray images
CROP_MARGIN = 1.12  # the starter resizes to 1.12 x image_size, then crops image_size at random


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
