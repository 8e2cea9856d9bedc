"""images.py through the Trainer: finding, decoding and caching the training images, and the
batches they make."""

import pytest
import torch

from afhq_data import part_b_environment  # noqa: F401 (autouse fixture)
from main import write_synthetic_afhq
from images import DeviceBatches, find_class_root, load_image_set
from tiny_trainer import (afhq, count_decodes, make_trainer, IMAGE_SIZE,  # noqa: F401 (fixture)
                          PER_CLASS)

pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


@pytest.mark.parametrize("layout, given", [("v2", "."), ("v2", "train"), ("v1", "."),
                                           ("v1", "afhq"), ("v1", "afhq/train")])
def test_class_root_is_found_from_dataset_root_or_train_folder(tmp_path, layout, given):
    train_folder = write_synthetic_afhq(tmp_path, classes=("cat",), per_class=1, size=8,
                                        layout=layout)
    assert find_class_root(tmp_path / given) == train_folder.resolve()


@pytest.mark.parametrize("working_folder, root", [(".", "./A3_PartB/data"), ("A3_PartB", "./data")])
def test_missing_folder_error_says_to_add_download_and_where_the_zip_goes(
        tmp_path, monkeypatch, working_folder, root):
    (tmp_path / "A3_PartB").mkdir()
    monkeypatch.chdir(tmp_path / working_folder)
    missing = tmp_path / "A3_PartB" / "data" / "train"
    with pytest.raises(FileNotFoundError) as error:
        load_image_set(missing, "cat", IMAGE_SIZE, tmp_path / "cache")
    assert str(missing) in str(error.value)
    assert f"(a 6.5 GB zip, into {root}) by running the command again with --download added" \
        in str(error.value)


def test_decoding_progress_ends_at_every_image(afhq, tmp_path, capsys):
    load_image_set(afhq, "dog", IMAGE_SIZE, tmp_path)
    assert f"{PER_CLASS}/{PER_CLASS}" in capsys.readouterr().err


def test_class_folder_without_images_raises_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="No .jpg/.jpeg/.png images"):
        load_image_set(tmp_path, "cat", IMAGE_SIZE, tmp_path / "cache")


def test_unknown_class_error_lists_the_classes_present(afhq, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_class='horse'.*'cat', 'dog', 'wild'"):
        load_image_set(afhq, "horse", IMAGE_SIZE, tmp_path)


def test_corrupt_image_is_warned_by_name_and_skipped(afhq, tmp_path):
    with pytest.warns(UserWarning, match="corrupt_0.png"):
        images = load_image_set(afhq, "cat", IMAGE_SIZE, tmp_path)
    assert len(images.train) == PER_CLASS + 1  # the blobs and the grayscale image


def test_grayscale_image_is_converted_to_rgb(afhq, tmp_path):
    images = load_image_set(afhq, "cat", IMAGE_SIZE, tmp_path)
    grayscale = images.reference[-1]  # grayscale_0.png sorts last among the cats
    assert grayscale.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(grayscale[0], grayscale[1]) and torch.equal(grayscale[1], grayscale[2])


def test_images_are_resized_for_cropping_and_for_fid(afhq, tmp_path):
    images = load_image_set(afhq, "cat", 32, tmp_path)
    assert images.train.dtype == torch.uint8
    assert images.train.shape[1:] == (3, 35, 35)  # int(1.12 * 32), the starter's resize
    assert images.reference.shape[1:] == (3, 32, 32)


def test_all_classes_are_collected_for_data_class_all(afhq, tmp_path):
    images = load_image_set(afhq, "all", IMAGE_SIZE, tmp_path)
    assert len(images.train) == 3 * PER_CLASS + 1


def test_v1_layout_with_jpg_files_loads(tmp_path):
    write_synthetic_afhq(tmp_path / "data", classes=("cat", "dog"), per_class=3, size=40,
                         layout="v1")
    images = load_image_set(tmp_path / "data", "dog", IMAGE_SIZE, tmp_path / "cache")
    assert len(images.train) == 3


def test_images_are_decoded_once_then_read_from_the_cache(afhq, tmp_path, monkeypatch):
    decodes = count_decodes(monkeypatch)
    first = load_image_set(afhq, "dog", IMAGE_SIZE, tmp_path)
    assert len(decodes) == PER_CLASS
    second = load_image_set(afhq, "dog", IMAGE_SIZE, tmp_path)
    assert len(decodes) == PER_CLASS
    assert torch.equal(first.train, second.train) and first.key == second.key


def test_cache_is_rebuilt_when_an_image_is_added(tmp_path, monkeypatch):
    train = write_synthetic_afhq(tmp_path / "data", classes=("cat",), per_class=2, size=24)
    load_image_set(train, "cat", IMAGE_SIZE, tmp_path / "cache")
    write_synthetic_afhq(tmp_path / "data", classes=("cat",), per_class=3, size=24)
    decodes = count_decodes(monkeypatch)
    images = load_image_set(train, "cat", IMAGE_SIZE, tmp_path / "cache")
    assert len(decodes) == 3 and len(images.train) == 3


def test_batches_are_random_crops_of_the_stored_images():
    torch.manual_seed(0)
    shades = torch.arange(0, 250, 10, dtype=torch.uint8)  # image i is flat with value 10 i
    images = shades.view(-1, 1, 1, 1).expand(-1, 3, 18, 18).clone()
    batch = DeviceBatches(images, IMAGE_SIZE, 8, True, "cpu").next_batch()
    assert batch.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE) and batch.dtype == torch.float32
    flat_values = batch.flatten(1)
    assert torch.equal(flat_values.min(1).values, flat_values.max(1).values)
    assert set((flat_values[:, 0] * 255).round().tolist()) <= set(shades.float().tolist())


def test_batches_are_mirrored_about_half_of_the_time():
    torch.manual_seed(0)
    ramp = torch.arange(18, dtype=torch.uint8).expand(1, 3, 18, 18).clone()
    batch = DeviceBatches(ramp, IMAGE_SIZE, 400, True, "cpu").next_batch()
    mirrored = (batch[:, 0, 0, 0] > batch[:, 0, 0, -1]).float().mean()
    assert 0.4 < mirrored < 0.6


def test_crop_offsets_cover_the_margin():
    torch.manual_seed(0)
    ramp = torch.arange(18, dtype=torch.uint8).expand(1, 3, 18, 18).clone()
    batch = DeviceBatches(ramp, IMAGE_SIZE, 400, True, "cpu").next_batch()
    left_edges = (batch[:, 0, 0, :].min(1).values * 255).round()
    assert set(left_edges.tolist()) == {0.0, 1.0, 2.0}


def test_unshuffled_batches_follow_file_order_and_wrap_around():
    images = torch.arange(5, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 18, 18).clone()
    batches = DeviceBatches(images, IMAGE_SIZE, 3, False, "cpu")
    drawn = [(batches.next_batch()[:, 0, 0, 0] * 255).round().tolist() for _ in range(3)]
    assert drawn == [[0.0, 1.0, 2.0], [3.0, 4.0, 0.0], [1.0, 2.0, 3.0]]


def test_first_batch_is_centre_crop_in_file_order():
    images = torch.arange(5, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 18, 18).clone()
    images[:, :, 1, 1] = 200  # inside the centre crop (rows and columns 1..16)
    first = DeviceBatches(images, IMAGE_SIZE, 2, True, "cpu").first_batch(3)
    assert (first[:, 0, 0, 0] * 255).round().tolist() == [200.0, 200.0, 200.0]
    assert (first[:, 0, 5, 5] * 255).round().tolist() == [0.0, 1.0, 2.0]


def test_unaugmented_batches_are_centre_crops_never_flipped():
    torch.manual_seed(0)
    ramp = torch.arange(18, dtype=torch.uint8).expand(1, 3, 18, 18).clone()
    batch = DeviceBatches(ramp, IMAGE_SIZE, 50, True, "cpu", augment=False).next_batch()
    assert torch.equal(batch, DeviceBatches(ramp, IMAGE_SIZE, 1, True, "cpu").first_batch(1)
                       .expand(50, -1, -1, -1))


def test_trainer_augments_only_for_the_starters_train_dataset(afhq, tmp_path):
    assert make_trainer(afhq, tmp_path, dataset="train").batches.augment
    assert not make_trainer(afhq, tmp_path, dataset=None).batches.augment
