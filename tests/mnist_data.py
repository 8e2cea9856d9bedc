"""A tiny synthetic MNIST written in torchvision's raw format, for offline tests.

``write_mnist_raw(root)`` creates the four uncompressed idx-ubyte files under
``root/MNIST/raw/``. torchvision's ``MNIST._check_exists`` only checks that those
four files exist (no checksum), so afterwards both
``torchvision.datasets.MNIST(root, train=True, download=False)`` and
``download=True`` load them without touching the network.

Each image is a seven-segment drawing of its label's digit with a random
offset, size, slant and stroke width, softened like MNIST's anti-aliased
strokes: the classes differ clearly and a VAE's loss drops within a few epochs.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIDE = 28
NUM_CLASSES = 10

# Segment end points in a unit box: x to the right, y downwards, the middle bar at y = 0.5.
SEGMENTS = {
    "top": ((0.0, 0.0), (1.0, 0.0)),
    "upper_right": ((1.0, 0.0), (1.0, 0.5)),
    "lower_right": ((1.0, 0.5), (1.0, 1.0)),
    "bottom": ((0.0, 1.0), (1.0, 1.0)),
    "lower_left": ((0.0, 0.5), (0.0, 1.0)),
    "upper_left": ((0.0, 0.0), (0.0, 0.5)),
    "middle": ((0.0, 0.5), (1.0, 0.5)),
}
DIGIT_SEGMENTS = {
    0: ("top", "upper_right", "lower_right", "bottom", "lower_left", "upper_left"),
    1: ("upper_right", "lower_right"),
    2: ("top", "upper_right", "middle", "lower_left", "bottom"),
    3: ("top", "upper_right", "middle", "lower_right", "bottom"),
    4: ("upper_left", "middle", "upper_right", "lower_right"),
    5: ("top", "upper_left", "middle", "lower_right", "bottom"),
    6: ("top", "upper_left", "middle", "lower_left", "lower_right", "bottom"),
    7: ("top", "upper_right", "lower_right"),
    8: tuple(SEGMENTS),
    9: ("top", "upper_right", "lower_right", "bottom", "upper_left", "middle"),
}
RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# idx magic numbers: 0x08 = unsigned byte, then the number of dimensions.
IMAGES_MAGIC = 0x0803
LABELS_MAGIC = 0x0801


def draw_digit(digit, rng):
    """A (28, 28) uint8 image of ``digit`` drawn as seven-segment strokes with random jitter."""
    width, height = rng.uniform(8, 12), rng.uniform(14, 19)
    left = (IMAGE_SIDE - width) / 2 + rng.uniform(-2, 2)
    top = (IMAGE_SIDE - height) / 2 + rng.uniform(-2, 2)
    slant = rng.uniform(-0.25, 0.25)
    image = Image.new("L", (IMAGE_SIDE, IMAGE_SIDE), 0)
    pen = ImageDraw.Draw(image)
    for name in DIGIT_SEGMENTS[digit]:
        points = [
            (left + x * width + slant * (0.5 - y) * height, top + y * height) for x, y in SEGMENTS[name]
        ]
        pen.line(points, fill=255, width=int(rng.integers(2, 4)))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.uint8)


def _write_idx(path, array, magic):
    """Write ``array`` (uint8) as an idx file: big-endian magic, dimension sizes, then the bytes."""
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _write_split(raw_folder, split, num_images, rng):
    """Write one split's image and label files, every class present when num_images >= 10."""
    labels = rng.permutation(np.arange(num_images) % NUM_CLASSES).astype(np.uint8)
    images = np.stack([draw_digit(int(label), rng) for label in labels])
    images_name, labels_name = RAW_FILES[split]
    _write_idx(raw_folder / images_name, images, IMAGES_MAGIC)
    _write_idx(raw_folder / labels_name, labels, LABELS_MAGIC)


def write_mnist_raw(root, num_images=256, seed=0):
    """Write a synthetic MNIST with ``num_images`` training and ``num_images`` test images.

    Args:
        root: the directory passed to ``torchvision.datasets.MNIST`` as its root.
        num_images: images per split (train and t10k), labels cycling through 0-9.
        seed: seed of the random jitter; the same seed writes the same files.

    Returns:
        The folder ``root/MNIST/raw`` holding the four idx-ubyte files.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}.")
    raw_folder = Path(root) / "MNIST" / "raw"
    raw_folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split in RAW_FILES:
        _write_split(raw_folder, split, num_images, rng)
    return raw_folder
