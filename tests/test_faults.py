"""Faults of the machine lose nothing and end in one clear line: damaged caches, hostile
images, a full or unwritable disk, and a run killed between milestones."""
import builtins
import errno
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import files as files_module
import images as images_module
import main
import trainer as trainer_module
from afhq_data import part_b_environment  # noqa: F401 (autouse fixture)
from diffusion import Diffusion
from test_fid import CountingExtractor
from files import SaveError
from images import decode_images, load_image_set
from trainer import Trainer
from unet import Unet
from utils import train_diffusion

IMAGE_SIZE = 16
PER_CLASS = 4
TINY = dict(unet_dim_mults=[1, 2], image_size=IMAGE_SIZE, batch_size=4, time_steps=10,
            unet_dim=8, dataloader_workers=0)
TINY_FLAGS = ["--unet_dim_mults", "1", "2", "--image_size", str(IMAGE_SIZE), "--batch_size", "4",
              "--time_steps", "10", "--unet_dim", "8", "--dataloader_workers", "0"]
pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


@pytest.fixture(scope="module")
def afhq(tmp_path_factory):
    """Four small blob cats, readable by every test."""
    return main.write_synthetic_afhq(tmp_path_factory.mktemp("afhq"), classes=("cat",),
                                per_class=PER_CLASS, size=24)


@pytest.fixture
def cats(tmp_path):
    """A cat folder of this test's own, to add hostile files to; returns (class root, cat/)."""
    root = main.write_synthetic_afhq(tmp_path / "data", classes=("cat",), per_class=PER_CLASS,
                                     size=24)
    return root, root / "cat"


def tiny_trainer(data, results, **options):
    torch.manual_seed(0)
    diffusion = Diffusion(Unet(8, dim_mults=(1, 2)), image_size=IMAGE_SIZE, timesteps=10)
    settings = dict(image_size=IMAGE_SIZE, train_batch_size=4, train_num_steps=4,
                    gradient_accumulate_every=1, save_and_sample_every=2, results_folder=results,
                    data_class="cat", device="cpu", dataloader_workers=0, num_samples=4,
                    log_every=1, cache_folder=results / "cache")
    settings.update(options)
    return Trainer(diffusion, data, **settings)


def temporary_files(folder):
    return [path.name for path in folder.rglob("*.tmp")]


class UnwritableFile:
    """A file opened for writing whose every write fails with ``error_number``."""

    def __init__(self, file, error_number):
        self.file = file
        self.error_number = error_number

    def write(self, data):
        raise OSError(self.error_number, os.strerror(self.error_number))

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.file.close()


def fail_writes(monkeypatch, error_number, names=None):
    """Make the trainer's file writes fail with ``error_number``, as a full disk does: the
    temporary file is created, then writing it fails. Only files whose temporary name holds
    one of ``names`` fail, when given."""
    def failing_open(path, mode="r", *args, **kwargs):
        file = builtins.open(path, mode, *args, **kwargs)
        if "w" in mode and (names is None or any(name in str(path) for name in names)):
            return UnwritableFile(file, error_number)
        return file

    monkeypatch.setattr(files_module, "open", failing_open, raising=False)  # atomic_write's


def read_only_folder(folder, monkeypatch):
    """``folder`` made read-only with chmod; where that does not stop writes (as root), the
    trainer's writes into it fail with EACCES as they would. Returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    probe = folder / "probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return folder
    probe.unlink()

    def refusing_open(path, mode="r", *args, **kwargs):
        if "w" in mode and folder.resolve() in Path(path).resolve().parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(files_module, "open", refusing_open, raising=False)  # atomic_write's
    return folder


def run_main(arguments, capsys):
    """main.main in this process; returns (status, stdout, the error lines of stderr), after
    checking that stderr holds no traceback (it also holds the progress bars)."""
    status = main.main(arguments)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    return status, captured.out, errors


# ---------------------------------------------------------------- caches


def image_cache_file(cache):
    (cache_file,) = cache.glob("images_*.pt")
    return cache_file


def count_decodes(monkeypatch):
    calls = []
    decode = images_module.decode_image
    monkeypatch.setattr(images_module, "decode_image",
                        lambda path, sizes: calls.append(path) or decode(path, sizes))
    return calls


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage", [
    truncate,
    lambda path: torch.save({"images": torch.zeros(1)}, path),
    lambda path: torch.save({"train": torch.zeros(4, 3, 17, 17),
                             "reference": torch.zeros(4, 3, 16, 16)}, path),
    lambda path: torch.save({"train": torch.zeros(4, 3, 9, 9, dtype=torch.uint8),
                             "reference": torch.zeros(4, 3, 8, 8, dtype=torch.uint8)}, path),
], ids=["truncated", "wrong keys", "wrong dtype", "wrong shapes"])
def test_a_damaged_image_cache_is_rebuilt_with_one_line(afhq, tmp_path, monkeypatch, capsys,
                                                        damage):
    first = load_image_set(afhq, "cat", IMAGE_SIZE, tmp_path)
    damage(image_cache_file(tmp_path))
    decodes = count_decodes(monkeypatch)
    again = load_image_set(afhq, "cat", IMAGE_SIZE, tmp_path)
    assert len(decodes) == PER_CLASS and torch.equal(again.train, first.train)
    assert f"Cache file {image_cache_file(tmp_path)} is not usable" in capsys.readouterr().out


def test_a_rebuilt_image_cache_is_read_at_the_next_run(afhq, tmp_path, monkeypatch):
    load_image_set(afhq, "cat", IMAGE_SIZE, tmp_path)
    truncate(image_cache_file(tmp_path))
    load_image_set(afhq, "cat", IMAGE_SIZE, tmp_path)
    decodes = count_decodes(monkeypatch)
    load_image_set(afhq, "cat", IMAGE_SIZE, tmp_path)
    assert decodes == []


@pytest.mark.parametrize("damage", [
    truncate,
    lambda path: np.savez(path, mean=np.zeros(6)),
    lambda path: np.savez(path, mu=np.zeros((6, 6)), sigma=np.eye(6)),
    lambda path: np.savez(path, mu=np.zeros(6), sigma=np.full((6, 6), np.nan)),
], ids=["truncated", "wrong keys", "wrong shapes", "not finite"])
def test_damaged_fid_statistics_are_rebuilt_with_one_line(afhq, tmp_path, capsys, damage):
    tiny_trainer(afhq, tmp_path, fid=True, fid_feature_extractor=CountingExtractor(),
                 num_fid_samples=8).fid_scorer.reference_statistics()
    (cache_file,) = (tmp_path / "cache").glob("fid_*.npz")
    damage(cache_file)
    extractor = CountingExtractor()
    scorer = tiny_trainer(afhq, tmp_path, fid=True, fid_feature_extractor=extractor,
                          num_fid_samples=8).fid_scorer
    mu, sigma, _ = scorer.reference_statistics()
    assert extractor.images_seen == PER_CLASS and mu.shape == (6,) and np.isfinite(sigma).all()
    assert f"Cache file {cache_file} is not usable" in capsys.readouterr().out


# ---------------------------------------------------------------- hostile images


def write_noise_png(path, side):
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("side", [40, 48], ids=["above the limit", "above twice the limit"])
def test_a_decompression_bomb_is_skipped_by_name(cats, tmp_path, monkeypatch, side):
    root, cat = cats
    write_noise_png(cat / "bomb.png", side)  # 1,600 or 2,304 pixels; the blobs have 576
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(UserWarning, match="bomb.png"):
        images = load_image_set(root, "cat", IMAGE_SIZE, tmp_path / "cache")
    assert len(images) == PER_CLASS


def test_a_truncated_png_is_skipped_by_name(cats, tmp_path):
    root, cat = cats
    write_noise_png(cat / "cut.png", 24)
    truncate(cat / "cut.png")
    with pytest.warns(UserWarning, match="cut.png"):
        images = load_image_set(root, "cat", IMAGE_SIZE, tmp_path / "cache")
    assert len(images) == PER_CLASS


def dangling_link(path):
    path.symlink_to(path.parent / "gone")  # stat() fails: the size cannot be read


def folder_named_like_an_image(path):
    path.mkdir()


def fifo(path):
    os.mkfifo(path)  # opening it would wait forever for a writer


@pytest.mark.parametrize("make, reason", [
    (dangling_link, "No such file or directory"),
    (folder_named_like_an_image, "not a regular file"),
    (fifo, "not a regular file"),
])
def test_an_entry_that_is_not_a_readable_file_is_left_out_of_the_listing_by_name(
        cats, make, reason):
    root, cat = cats
    make(cat / "odd.png")
    with pytest.warns(UserWarning, match=f"Skipping unreadable image {cat / 'odd.png'}: {reason}"):
        files = images_module.list_image_files(root, "cat")
    assert [path.name for path in files] == [f"cat_{index:04d}.png" for index in range(PER_CLASS)]


def test_a_file_that_cannot_be_opened_is_skipped_by_name(cats, tmp_path, monkeypatch):
    root, cat = cats
    locked = cat / "cat_0001.png"
    image_open = Image.open

    def refuse_the_locked_file(path, *args, **kwargs):
        if Path(path) == locked:  # as chmod 000 does to a user other than root
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return image_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", refuse_the_locked_file)
    with pytest.warns(UserWarning, match=f"Skipping unreadable image {locked}: .*Permission "
                                         "denied"):
        images = load_image_set(root, "cat", IMAGE_SIZE, tmp_path / "cache")
    assert len(images) == PER_CLASS - 1


def test_a_class_folder_that_cannot_be_listed_leaves_out_only_its_class(tmp_path, monkeypatch):
    root = main.write_synthetic_afhq(tmp_path / "data", classes=("cat", "dog"), per_class=2,
                                     size=24)
    iterdir = Path.iterdir

    def refuse_dog(folder):
        if folder == root / "dog":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        return iterdir(folder)

    monkeypatch.setattr(Path, "iterdir", refuse_dog)
    with pytest.warns(UserWarning, match=f"Skipping unreadable folder {root / 'dog'}: "
                                         "Permission denied"):
        files = images_module.list_image_files(root, "all")
    assert [path.parent.name for path in files] == ["cat", "cat"]


def test_main_trains_past_every_kind_of_unreadable_file_with_a_warning_for_each(
        cats, tmp_path, capsys):
    root, cat = cats
    dangling_link(cat / "gone.png")
    folder_named_like_an_image(cat / "folder.png")
    fifo(cat / "pipe.png")
    (cat / "text.png").write_text("not an image")
    write_noise_png(cat / "cut.png", 24)
    truncate(cat / "cut.png")
    with pytest.warns(UserWarning) as warned:
        status, out, errors = run_main([*TINY_FLAGS, "--train_steps", "2",
                                        "--save_and_sample_every", "2", "--data_path", str(root),
                                        "--save_folder", str(tmp_path / "results")], capsys)
    skipped = sorted(Path(str(warning.message).split(": ")[0].split()[-1]).name
                     for warning in warned if "Skipping unreadable" in str(warning.message))
    assert skipped == ["cut.png", "folder.png", "gone.png", "pipe.png", "text.png"]
    assert status == 0 and errors == [] and (tmp_path / "results" / "model.pt").is_file()
    assert f"Skipped 2 unreadable image(s) of {PER_CLASS + 2}." in out


def decode_one(path):
    """The reference image (3, S, S) that the trainer decodes from ``path``."""
    _, reference = decode_images([path], IMAGE_SIZE, workers=1)
    return reference[0]


def test_a_16_bit_gray_image_keeps_its_gray_levels(tmp_path):
    Image.fromarray(np.full((24, 24), 128 * 257, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    assert torch.equal(decode_one(tmp_path / "deep.png").unique(), torch.tensor([128],
                                                                                dtype=torch.uint8))


def test_a_cmyk_image_is_converted_to_rgb(tmp_path):
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(tmp_path / "print.jpg")
    red, green, blue = decode_one(tmp_path / "print.jpg").float().mean((1, 2)).tolist()
    assert red > 240 and green < 15 and blue < 15


def test_a_palette_image_with_transparency_decodes_to_its_colours_without_a_warning(
        tmp_path, recwarn):
    image = Image.new("P", (24, 24), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] * 128)
    image.save(tmp_path / "palette.png", transparency=bytes([0, 128]))
    pixels = decode_one(tmp_path / "palette.png")
    assert pixels[:, 0, 0].tolist() == [0, 0, 255]
    assert [str(warning.message) for warning in recwarn] == []


def test_main_with_no_decodable_image_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    cat = tmp_path / "data" / "train" / "cat"
    cat.mkdir(parents=True)
    write_noise_png(cat / "bomb.png", 48)
    (cat / "text.png").write_text("not an image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    status, _, errors = run_main([*TINY_FLAGS, "--data_path", str(tmp_path / "data"),
                                  "--save_folder", str(tmp_path / "results")], capsys)
    assert status == 2
    assert len(errors) == 1 and errors[0].startswith("error: None of the 2 images")


# ---------------------------------------------------------------- no space, no permission


def test_a_full_disk_raises_a_save_error_naming_the_checkpoint_the_reason_and_what_to_do(
        afhq, tmp_path, monkeypatch):
    fail_writes(monkeypatch, errno.ENOSPC, names=["model.pt"])
    with pytest.raises(SaveError) as error:
        train_diffusion(2, 2, False, tmp_path, afhq, **TINY)
    assert str(error.value).startswith(f"Cannot write {tmp_path / 'model.pt'}: No space left")
    assert "Free some space on that disk" in str(error.value)


def test_a_full_disk_keeps_the_last_checkpoint_and_leaves_no_temporary_file(afhq, tmp_path,
                                                                            monkeypatch):
    train_diffusion(2, 2, False, tmp_path, afhq, **TINY)
    fail_writes(monkeypatch, errno.ENOSPC)
    with pytest.raises(SaveError, match="Resume with load_path="):
        train_diffusion(4, 2, False, tmp_path, afhq, load_path=tmp_path / "model.pt", **TINY)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["step"] == 2
    assert temporary_files(tmp_path) == []


@pytest.mark.parametrize("name", ["model.pt", "sample_0.png", "metrics.csv", "loss.png"])
def test_each_output_that_cannot_be_written_is_named(afhq, tmp_path, monkeypatch, name):
    fail_writes(monkeypatch, errno.ENOSPC, names=[f".{name}."])
    with pytest.raises(SaveError, match=re.escape(f"Cannot write {tmp_path / name}: No space")):
        tiny_trainer(afhq, tmp_path).train()
    assert temporary_files(tmp_path) == []


def test_main_on_a_full_disk_exits_2_with_one_error_line(afhq, tmp_path, capsys, monkeypatch):
    fail_writes(monkeypatch, errno.ENOSPC)
    status, _, errors = run_main([*TINY_FLAGS, "--train_steps", "2", "--save_and_sample_every",
                                  "2", "--data_path", str(afhq), "--save_folder", str(tmp_path)],
                                 capsys)
    assert status == 2
    assert len(errors) == 1 and errors[0].startswith(f"error: Cannot write {tmp_path}")


ON_A_SMALL_DISK = """
mount -t tmpfs -o size=256k tmpfs "$1" && cd "$2" && exec "$3" main.py "${@:4}"
"""


def unshare_mounts():
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("unshare") or not unshare_mounts(), reason="no user and mount namespaces here")
def test_main_on_a_disk_that_really_fills_up_exits_2_with_one_error_line(afhq, tmp_path):
    """A 256 KB file system as the results folder, in a mount namespace of the test's own, and
    the starter's network, whose checkpoint does not fit: torch.save's zip writer alone would end
    in a traceback of its RuntimeError ('unexpected pos')."""
    (tmp_path / "results").mkdir()
    flags = ["--image_size", str(IMAGE_SIZE), "--batch_size", "4", "--time_steps", "10", "--dataloader_workers", "0",
             "--train_steps", "2", "--save_and_sample_every", "2", "--data_path", str(afhq),
             "--save_folder", str(tmp_path / "results")]
    run = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", ON_A_SMALL_DISK, "-",
                          str(tmp_path / "results"), str(Path(main.__file__).parent), sys.executable, *flags],
                         capture_output=True, text=True, timeout=600)
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr[-2000:]
    assert errors[-1].startswith(f"error: Cannot write {tmp_path / 'results'}") and "No space left on device" in errors[-1]
    assert "Traceback" not in run.stderr


def test_a_results_folder_that_cannot_be_made_raises_a_save_error(afhq, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SaveError, match="a_file"):
        train_diffusion(2, 2, False, tmp_path / "a_file" / "results", afhq, **TINY)


def test_an_unwritable_image_cache_is_said_in_one_line_and_not_fatal(afhq, tmp_path, capsys,
                                                                     monkeypatch):
    cache = read_only_folder(tmp_path / "cache", monkeypatch)
    images = load_image_set(afhq, "cat", IMAGE_SIZE, cache)
    assert len(images) == PER_CLASS and list(cache.iterdir()) == []
    assert "so this run goes on without it" in capsys.readouterr().out


def test_an_unwritable_fid_cache_is_not_fatal(afhq, tmp_path, monkeypatch):
    scorer = tiny_trainer(afhq, tmp_path, fid=True, fid_feature_extractor=CountingExtractor(),
                          num_fid_samples=8).fid_scorer
    scorer.cache_file = read_only_folder(tmp_path / "locked", monkeypatch) / "fid.npz"
    mu, _, _ = scorer.reference_statistics()
    assert mu.shape == (6,) and not scorer.cache_file.exists()


def test_main_with_an_unwritable_cache_folder_trains_and_says_so(afhq, tmp_path, capsys,
                                                                 monkeypatch):
    cache = read_only_folder(tmp_path / "xdg", monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    status, out, _ = run_main([*TINY_FLAGS, "--train_steps", "2", "--save_and_sample_every", "2",
                               "--data_path", str(afhq), "--save_folder", str(tmp_path / "run")],
                              capsys)
    assert status == 0 and (tmp_path / "run" / "model.pt").is_file()
    assert out.count("so this run goes on without it") == 1


# ---------------------------------------------------------------- time-based checkpoints


class Killed(BaseException):
    """A kill in the middle of a step (SIGKILL runs no handler; neither does this test)."""


def minutes_per_step(monkeypatch, trainer, kill_at_step=None):
    """Make each training step take one minute of the trainer's clock (no sleeping); with
    ``kill_at_step``, the run dies in that step. Returns the steps of every save."""
    clock = {"minutes": 0}
    monkeypatch.setattr(trainer_module, "time",
                        types.SimpleNamespace(monotonic=lambda: 60 * clock["minutes"]))
    train_step, save = trainer.gradient_pass, trainer.save
    saved_steps = []

    def slow_step():
        if trainer.step + 1 == kill_at_step:
            raise Killed
        clock["minutes"] += 1
        return train_step()

    def recorded_save(*args):
        saved_steps.append(trainer.step)
        save(*args)

    monkeypatch.setattr(trainer, "gradient_pass", slow_step)
    monkeypatch.setattr(trainer, "save", recorded_save)
    return saved_steps


def test_model_pt_is_also_written_every_checkpoint_minutes(afhq, tmp_path, monkeypatch):
    trainer = tiny_trainer(afhq, tmp_path, train_num_steps=7, save_and_sample_every=100,
                           checkpoint_minutes=3)
    saved_steps = minutes_per_step(monkeypatch, trainer)
    trainer.train()
    assert sorted(set(saved_steps)) == [3, 6, 7]


def test_a_time_based_checkpoint_holds_the_losses_of_every_step_before_it(afhq, tmp_path,
                                                                          monkeypatch):
    trainer = tiny_trainer(afhq, tmp_path, train_num_steps=7, save_and_sample_every=100,
                           checkpoint_minutes=3, log_every=10)
    minutes_per_step(monkeypatch, trainer, kill_at_step=5)
    with pytest.raises(Killed):
        trainer.train()
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    assert [row["step"] for row in checkpoint["history"]] == [1, 2, 3]


def test_a_run_killed_between_milestones_resumes_from_its_time_based_checkpoint(afhq, tmp_path,
                                                                                monkeypatch):
    trainer = tiny_trainer(afhq, tmp_path, train_num_steps=7, save_and_sample_every=100,
                           checkpoint_minutes=3)
    minutes_per_step(monkeypatch, trainer, kill_at_step=5)
    with pytest.raises(Killed):
        trainer.train()
    resumed = tiny_trainer(afhq, tmp_path, train_num_steps=7, save_and_sample_every=100,
                           load_path=tmp_path / "model.pt")
    assert resumed.step == 3


def test_time_based_checkpoints_add_no_other_output(afhq, tmp_path, monkeypatch):
    trainer = tiny_trainer(afhq, tmp_path, train_num_steps=4, save_and_sample_every=2,
                           checkpoint_minutes=1)
    minutes_per_step(monkeypatch, trainer)
    trainer.train()
    outputs = sorted(path.name for path in tmp_path.iterdir() if path.is_file())
    assert outputs == ["loss.png", "metrics.csv", "model.pt", "sample_0.png", "sample_1.png"]


def test_checkpoint_minutes_must_be_positive(afhq, tmp_path):
    with pytest.raises(ValueError, match="checkpoint_minutes must be positive, got 0"):
        tiny_trainer(afhq, tmp_path, checkpoint_minutes=0)


def test_train_diffusion_passes_checkpoint_minutes_to_the_trainer(afhq, tmp_path):
    trainer = train_diffusion(1, 1, False, tmp_path, afhq, checkpoint_minutes=0.5, **TINY)
    assert trainer.checkpoint_seconds == 30


def test_main_passes_checkpoint_minutes_to_train_diffusion(tmp_path, monkeypatch):
    received = []
    monkeypatch.setattr(main, "train_diffusion", lambda **settings: received.append(settings))
    assert main.main(["--checkpoint_minutes", "2.5", "--save_folder", str(tmp_path)]) == 0
    assert received[0]["checkpoint_minutes"] == 2.5
