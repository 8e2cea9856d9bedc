"""A fake AFHQ folder for tests (imported by the trainer, main and notebook tests).

``make_afhq_folder(root)`` writes ``root/train/{cat,dog,wild}/*.png`` (AFHQ v2, the course zip)
or ``root/afhq/train/{cat,dog,wild}/*.jpg`` (v1, with an empty ``val/``) of smooth colour blobs
that a diffusion model can learn quickly, plus ``corrupt`` unreadable files and ``grayscale``
one-channel images in the first class, and returns the folder holding the class folders.

``zip_folder`` zips such a tree as AFHQ's zip holds it.
``part_b_environment`` is an autouse fixture for Part B test modules (import it there).
"""
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from main import write_synthetic_afhq


def make_afhq_folder(root, classes=("cat", "dog", "wild"), per_class=8, size=512, corrupt=1,
                     grayscale=1, layout="v2"):
    """Write the fake tree; the first class gets ``corrupt`` + ``grayscale`` extra files.

    Readable images: ``per_class * len(classes) + grayscale``.
    """
    train_folder = write_synthetic_afhq(root, classes, per_class=per_class, size=size,
                                        layout=layout)
    first_class = train_folder / classes[0]
    suffix = ".jpg" if layout == "v1" else ".png"
    for index in range(corrupt):
        (first_class / f"corrupt_{index}{suffix}").write_bytes(b"this is not an image")
    for index in range(grayscale):
        shade = np.linspace(0, 255, size * size).reshape(size, size).astype(np.uint8)
        Image.fromarray(shade, mode="L").save(first_class / f"grayscale_{index}{suffix}")
    return train_folder


@pytest.fixture(autouse=True)
def part_b_environment(monkeypatch, tmp_path):
    """wandb disabled and writing into tmp_path; torch on one thread, which runs tiny models
    faster, and far faster when other processes share the CPUs."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zip_folder(folder, zip_path, extra=None):
    """Zip every file under ``folder`` by its path relative to it (``train/cat/cat_0000.png``, as
    AFHQ's zip names them), plus ``extra`` {name: bytes}; returns {name: bytes} of the files."""
    files = {path.relative_to(folder).as_posix(): path.read_bytes()
             for path in sorted(Path(folder).rglob("*")) if path.is_file()}
    files.update(extra or {})
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return files
