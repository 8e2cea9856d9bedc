"""The real cat photos the figures scripts train on, as an AFHQ-layout ``train`` folder.

Either AFHQ's own zip layout (``train/cat/*.jpg``; the project measures on AFHQ v2's 5,153
training cats at 36x36) or an ``.npz`` holding ``images``, uint8 of shape (N, 32, 32, 3).
"""
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "A3_PartB"))

import afhq  # noqa: E402
from main import save_unless_unchanged  # noqa: E402


def cats_train_folder(source, root):
    """``root/train`` holding ``cat/`` from ``source`` (a zip or an .npz); returns that folder.
    Files already there unchanged are kept, so a rerun in the same folder reuses the decoded
    images and the FID reference statistics cached under it."""
    source = Path(source)
    if source.suffix == ".npz":
        return write_npz_cats(source, root)
    return afhq.download_afhq(root, "cat", keep_zip=False,
                                        download=lambda zip_path: shutil.copy(source, zip_path))


def write_npz_cats(npz_path, root):
    """The .npz's images as ``root/train/cat/*.png``; returns the ``train`` folder."""
    folder = root / "train" / "cat"
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(np.load(npz_path)["images"]):
        save_unless_unchanged(Image.fromarray(image), folder / f"cat_{index:05d}.png")
    return root / "train"


def describe(source):
    """How a figures file names its photos."""
    name = Path(source).name
    if Path(source).suffix == ".npz":
        return f"{name}: real 32x32 cat photos standing in for AFHQ's cats"
    return f"{name}: AFHQ v2's training cats at 36x36 (resized to 32x32 by the trainer)"
