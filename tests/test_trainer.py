"""Trainer: data pipeline, training loop, checkpoints, figures, visualisation and wandb."""
import contextlib
import csv
import math
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import device as device_module
import images as images_module
import reporting
import trainer as trainer_module
from afhq_data import make_afhq_folder, part_b_environment  # noqa: F401 (autouse fixture)
from diffusion import Diffusion
from main import write_synthetic_afhq
from device import adam, autocast_dtype, CudaGraphed
from images import DeviceBatches, find_class_root, load_image_set
from reporting import WandbLogger
from trainer import Trainer
from unet import Unet

PER_CLASS = 6
IMAGE_SIZE = 16
pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


@pytest.fixture(scope="module")
def afhq(tmp_path_factory):
    """A v2 AFHQ tree: 6 blobs per class, plus one corrupt and one grayscale cat."""
    return make_afhq_folder(tmp_path_factory.mktemp("afhq"), per_class=PER_CLASS)


def tiny_diffusion(dim=8):
    torch.manual_seed(0)
    return Diffusion(Unet(dim, dim_mults=(1, 2)), image_size=IMAGE_SIZE, timesteps=10)


def make_trainer(afhq, results, **options):
    settings = dict(image_size=IMAGE_SIZE, train_batch_size=4, train_num_steps=3,
                    gradient_accumulate_every=1, save_and_sample_every=2, results_folder=results,
                    data_class="cat", device="cpu", dataloader_workers=0, num_samples=4,
                    log_every=1, dataset="train")
    settings.update(options)
    return Trainer(tiny_diffusion(), afhq, **settings)


def load_checkpoint(path):
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------- data


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


def test_resumed_training_says_where_it_resumes(afhq, tmp_path, capsys):
    make_trainer(afhq, tmp_path, train_num_steps=2).train()
    make_trainer(afhq, tmp_path, train_num_steps=3, load_path=tmp_path / "model.pt").train()
    assert "Resuming from step 2 of 3." in capsys.readouterr().out


def test_training_a_model_already_at_its_last_step_says_so(afhq, tmp_path, capsys):
    make_trainer(afhq, tmp_path, train_num_steps=2).train()
    trainer = make_trainer(afhq, tmp_path, train_num_steps=2, load_path=tmp_path / "model.pt")
    trainer.train()
    assert "Nothing to train: the model is at step 2" in capsys.readouterr().out


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


def count_decodes(monkeypatch):
    calls = []
    decode = images_module.decode_image

    def counting_decode(path, sizes):
        calls.append(path)
        return decode(path, sizes)

    monkeypatch.setattr(images_module, "decode_image", counting_decode)
    return calls


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


# ---------------------------------------------------------------- batches


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


# ---------------------------------------------------------------- training and checkpoints


def test_training_without_fid_saves_checkpoint_and_samples_at_milestones_and_end(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path, train_num_steps=3, save_and_sample_every=2)
    trainer.train()
    assert load_checkpoint(tmp_path / "model.pt")["step"] == 3
    # the starter's names: sample_{milestone}.png, milestone = (step - 1) // save_and_sample_every
    assert (tmp_path / "sample_0.png").is_file() and (tmp_path / "sample_1.png").is_file()


def test_training_reads_batches_from_memory_without_decoding(afhq, tmp_path, monkeypatch):
    trainer = make_trainer(afhq, tmp_path, train_num_steps=2, dataloader_workers=16)
    decodes = count_decodes(monkeypatch)
    trainer.train()
    assert decodes == []


def test_nested_results_folder_is_created(afhq, tmp_path):
    make_trainer(afhq, tmp_path / "runs" / "cat" / "first", train_num_steps=1).train()
    assert (tmp_path / "runs" / "cat" / "first" / "model.pt").is_file()


def test_training_reduces_the_loss_on_blob_images(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path, train_num_steps=30, save_and_sample_every=30,
                           train_lr=3e-3)
    trainer.train()
    losses = [row["loss"] for row in trainer.history]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_metrics_csv_and_loss_plot_are_written(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path, train_num_steps=4, log_every=2)
    trainer.train()
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"]
    assert [float(row["loss"]) for row in rows] == pytest.approx(
        [row["loss"] for row in trainer.history], rel=1e-6)
    assert len({row["loss"] for row in rows}) == 4 and all(row["fid"] == "" for row in rows)
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "fid.png").exists()


def test_files_are_written_only_at_milestones(afhq, tmp_path, monkeypatch):
    trainer = make_trainer(afhq, tmp_path, train_num_steps=6, save_and_sample_every=3, log_every=1)
    write_steps = []
    atomic_write = trainer_module.atomic_write  # files.atomic_write, as each module imports it

    def recorded_write(path, write):
        write_steps.append(trainer.step)
        atomic_write(path, write)

    for module in (trainer_module, reporting):  # the checkpoint and grid; metrics and plots
        monkeypatch.setattr(module, "atomic_write", recorded_write)
    trainer.train()
    assert write_steps and set(write_steps) == {3, 6}


def test_checkpoint_is_written_atomically(afhq, tmp_path, monkeypatch):
    trainer = make_trainer(afhq, tmp_path)
    trainer.save()

    def interrupted_save(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module.torch, "save", interrupted_save)
    trainer.step = 7
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    assert load_checkpoint(tmp_path / "model.pt")["step"] == 0
    assert [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")] == []


def test_resume_restores_weights_optimizer_and_step_then_trains_on(afhq, tmp_path):
    make_trainer(afhq, tmp_path, train_num_steps=2).train()
    saved = load_checkpoint(tmp_path / "model.pt")
    resumed = make_trainer(afhq, tmp_path, train_num_steps=4, load_path=tmp_path / "model.pt")
    assert resumed.step == 2
    assert torch.equal(resumed.opt.state_dict()["state"][0]["exp_avg"],
                       saved["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(resumed.model.state_dict()["model.init_conv.weight"],
                       saved["model"]["model.init_conv.weight"])
    resumed.train()
    assert [row["step"] for row in resumed.history] == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / "model.pt")["step"] == 4


def test_trainer_has_the_starters_attributes(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path, fid=False)
    assert isinstance(trainer.model, Diffusion) and isinstance(trainer.opt, torch.optim.Adam)
    assert len(trainer.ds) == PER_CLASS + 1  # the blobs and the grayscale cat
    batch = next(trainer.dl)
    assert batch.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and -1 <= batch.min() < 0 < batch.max() <= 1
    assert (trainer.step, trainer.batch_size, trainer.image_size) == (0, 4, IMAGE_SIZE)
    assert (trainer.gradient_accumulate_every, trainer.train_num_steps) == (1, 3)
    assert (trainer.save_and_sample_every, trainer.fid) == (2, False)
    assert trainer.results_folder == tmp_path and trainer.device == torch.device("cpu")


def test_ds_indexes_like_the_starters_dataset(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path)
    images = [trainer.ds[index] for index in range(len(trainer.ds))]
    assert all(image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) for image in images)
    assert all(image.dtype == torch.float32 for image in images)
    assert min(image.min() for image in images) >= 0 and max(image.max() for image in images) <= 1
    assert torch.equal(images[0], trainer.ds.reference[0].float() / 255)


def test_save_with_itrs_writes_a_numbered_checkpoint_in_the_starters_format(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path)
    trainer.step = 7
    trainer.save(7)
    checkpoint = load_checkpoint(tmp_path / "model_7.pt")
    assert checkpoint["step"] == 7 and checkpoint["model"].keys() == trainer.model.state_dict().keys()
    assert not (tmp_path / "model.pt").exists()


def test_starter_checkpoint_resumes_with_a_fresh_optimizer(afhq, tmp_path, capsys):
    source = make_trainer(afhq, tmp_path / "starter")
    torch.save({"step": 2, "model": source.model.state_dict()}, tmp_path / "starter.pt")
    resumed = make_trainer(afhq, tmp_path / "resumed", train_num_steps=3,
                           load_path=tmp_path / "starter.pt")
    assert "Adam starts afresh" in capsys.readouterr().out
    assert resumed.step == 2 and resumed.opt.state_dict()["state"] == {}
    assert torch.equal(resumed.model.model.init_conv.weight, source.model.model.init_conv.weight)
    resumed.train()
    assert load_checkpoint(tmp_path / "resumed" / "model.pt")["step"] == 3


def test_checkpoint_with_extra_schedule_buffers_loads_its_network_weights(afhq, tmp_path):
    source = make_trainer(afhq, tmp_path / "source")
    state = {**source.model.state_dict(), "alpha_bar": torch.ones(10)}  # a student's buffer
    torch.save({"step": 1, "model": state}, tmp_path / "student.pt")
    resumed = make_trainer(afhq, tmp_path / "resumed", load_path=tmp_path / "student.pt")
    assert torch.equal(resumed.model.model.final_conv.bias, source.model.model.final_conv.bias)


def test_checkpoint_of_another_network_says_which_settings_to_use(afhq, tmp_path):
    wider = Diffusion(Unet(16, dim_mults=(1, 2)), image_size=IMAGE_SIZE, timesteps=10)
    torch.save({"step": 1, "model": wider.state_dict()}, tmp_path / "wider.pt")
    with pytest.raises(ValueError, match="do not fit this U-Net.*unet_dim and unet_dim_mults"):
        make_trainer(afhq, tmp_path, load_path=tmp_path / "wider.pt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated"],
                         ids=["empty", "text", "truncated zip"])
def test_unreadable_checkpoint_raises_a_clear_value_error(afhq, tmp_path, content):
    (tmp_path / "model.pt").write_bytes(content)
    with pytest.raises(ValueError, match="not a readable checkpoint.*written by training"):
        make_trainer(afhq, tmp_path, load_path=tmp_path / "model.pt")


def test_a_saved_tensor_is_not_taken_for_a_checkpoint(afhq, tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        make_trainer(afhq, tmp_path, load_path=tmp_path / "tensor.pt")


def test_bad_checkpoint_fails_before_any_image_is_decoded(afhq, tmp_path, monkeypatch):
    (tmp_path / "model.pt").write_bytes(b"junk")
    decodes = count_decodes(monkeypatch)
    with pytest.raises(ValueError):
        make_trainer(afhq, tmp_path, load_path=tmp_path / "model.pt", data_class="dog")
    assert decodes == []


def test_plain_tensor_attributes_of_a_diffusion_follow_it_to_the_device():
    class PlainSchedule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2))
            self.alphas = torch.ones(5)  # a plain attribute, as a student may keep it

    moved = device_module.move_to_device(PlainSchedule(), torch.device("meta"))
    assert moved.alphas.device.type == "meta" and moved.weight.device.type == "meta"


def test_training_goes_on_in_train_mode_after_sampling_in_eval_mode(afhq, tmp_path, monkeypatch):
    trainer = make_trainer(afhq, tmp_path, train_num_steps=3, save_and_sample_every=1)
    sample = trainer.model.sample

    def sample_left_in_eval_mode(batch_size):  # as the skeleton's sample() does
        images = sample(batch_size)
        trainer.model.eval()
        return images

    monkeypatch.setattr(trainer.model, "sample", sample_left_in_eval_mode)
    modes = []
    gradient_pass = trainer.gradient_pass

    def recording_gradient_pass():
        modes.append(trainer.model.model.training)
        return gradient_pass()

    monkeypatch.setattr(trainer, "gradient_pass", recording_gradient_pass)
    trainer.train()
    assert modes == [True, True, True]


def test_the_grid_of_each_milestone_has_the_starters_name(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path, save_and_sample_every=100)
    assert [trainer.sample_grid_path(step).name for step in (100, 200, 1000, 1050)] == [
        "sample_0.png", "sample_1.png", "sample_9.png", "sample_10.png"]


def test_checkpoint_with_other_settings_raises_naming_them(afhq, tmp_path):
    make_trainer(afhq, tmp_path, train_num_steps=0).save()
    wider = Diffusion(Unet(16, dim_mults=(1, 2)), image_size=IMAGE_SIZE, timesteps=20)
    mismatch = r"timesteps: checkpoint 10, model 20; unet_dim: checkpoint 8, model 16"
    with pytest.raises(ValueError, match=mismatch) as error:
        Trainer(wider, afhq, image_size=IMAGE_SIZE, results_folder=tmp_path / "other",
                data_class="cat", device="cpu", load_path=tmp_path / "model.pt")
    assert "image_size" not in str(error.value)


def test_missing_checkpoint_raises_file_not_found(afhq, tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        make_trainer(afhq, tmp_path, load_path=tmp_path / "absent.pt")


def test_nan_loss_stops_training_and_keeps_last_good_checkpoint(afhq, tmp_path, monkeypatch):
    make_trainer(afhq, tmp_path, train_num_steps=2).train()
    good = load_checkpoint(tmp_path / "model.pt")
    trainer = make_trainer(afhq, tmp_path, train_num_steps=6, load_path=tmp_path / "model.pt")
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda x_0, noise: forward(x_0, noise) * float("nan"))
    with pytest.raises(FloatingPointError, match="became nan at step 3"):
        trainer.train()
    kept = load_checkpoint(tmp_path / "model.pt")
    assert kept["step"] == 2
    assert torch.equal(kept["model"]["model.init_conv.weight"],
                       good["model"]["model.init_conv.weight"])


def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_stops(afhq, tmp_path, monkeypatch,
                                                                 capsys):
    trainer = make_trainer(afhq, tmp_path, train_num_steps=10, save_and_sample_every=10)
    train_step = trainer.gradient_pass
    calls = []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return train_step()

    monkeypatch.setattr(trainer, "gradient_pass", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint["step"] == 2
    assert [row["step"] for row in checkpoint["history"]] == [1, 2]
    assert f"--load_path {tmp_path / 'model.pt'}" in capsys.readouterr().out


def test_a_step_runs_its_accumulated_batches_through_the_model_in_one_pass(afhq, tmp_path,
                                                                           monkeypatch):
    trainer = make_trainer(afhq, tmp_path, train_batch_size=4, gradient_accumulate_every=3)
    batch_sizes = []
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward",
                        lambda x_0, noise: batch_sizes.append(len(x_0)) or forward(x_0, noise))
    trainer.gradient_pass()
    assert batch_sizes == [12]


def test_the_loss_is_float32_whatever_the_precision_of_the_model(afhq, tmp_path, monkeypatch):
    trainer = make_trainer(afhq, tmp_path, precision="bf16")
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward",
                        lambda x_0, noise: forward(x_0, noise).to(torch.bfloat16))
    assert trainer.gradient_pass().dtype == torch.float32


def test_one_pass_over_the_accumulated_batches_gives_the_gradient_of_accumulating_them():
    diffusion = tiny_diffusion()
    x_0 = torch.rand(6, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    t, noise = torch.randint(0, 10, (6,)), torch.randn_like(x_0)
    diffusion.p_losses(x_0, t, noise).backward()
    fused = [p.grad.clone() for p in diffusion.parameters()]
    diffusion.zero_grad()
    for half in (slice(0, 3), slice(3, 6)):
        (diffusion.p_losses(x_0[half], t[half], noise[half]) / 2).backward()
    for fused_grad, parameter in zip(fused, diffusion.parameters()):
        torch.testing.assert_close(fused_grad, parameter.grad, rtol=1e-4, atol=1e-6)


def test_each_step_computes_its_gradients_afresh(afhq, tmp_path, monkeypatch):
    trainer = make_trainer(afhq, tmp_path)
    weight = trainer.model.model.final_conv.bias
    monkeypatch.setattr(trainer.model, "forward", lambda x_0, noise: (weight * 3).sum())
    trainer.loss_and_gradients()
    trainer.loss_and_gradients()
    assert torch.equal(weight.grad, torch.full_like(weight, 3.0))


class RecordedOps(TorchDispatchMode):
    """Records the name of every aten op run, the backward pass's included."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        self.names.add(str(op.overloadpacket))
        return op(*args, **(kwargs or {}))


HOST_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.equal",
                 "aten.is_nonzero", "aten._unique2", "aten.repeat_interleave"}


@pytest.mark.parametrize("shuffle", [True, False])
def test_gradient_computation_never_waits_for_the_device(afhq, tmp_path, shuffle):
    trainer = make_trainer(afhq, tmp_path, shuffle=shuffle, gradient_accumulate_every=2)
    with RecordedOps() as recorded:
        trainer.loss_and_gradients()
    assert "aten.convolution_backward" in recorded.names  # the backward pass was seen
    assert not recorded.names & HOST_SYNC_OPS


def test_cpu_training_is_not_captured_in_a_cuda_graph(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path, cuda_graph=True)
    assert not isinstance(trainer.gradient_pass, CudaGraphed)


class FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on a machine without a GPU: counts replays."""

    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """torch.cuda's streams and graphs replaced by fakes; returns the graphs made."""
    graphs = []
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: graphs.append(FakeGraph()) or graphs[-1])
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream: contextlib.nullcontext())
    return graphs


def test_cuda_graph_logic_with_fake_graphs_captures_after_warm_up_then_only_replays(
        fake_cuda_graphs):
    calls = []
    graphed = CudaGraphed(lambda: calls.append(1) or torch.tensor(float(len(calls))))
    outputs = [graphed() for _ in range(3)]
    assert len(calls) == CudaGraphed.WARMUP_CALLS + 1
    assert len(fake_cuda_graphs) == 1 and fake_cuda_graphs[0].replays == 3
    assert all(output is outputs[0] for output in outputs)
    assert outputs[0].item() == CudaGraphed.WARMUP_CALLS + 1


def test_cuda_graph_logic_with_a_faked_capture_failure_warns_and_runs_eagerly(monkeypatch):
    def no_capture():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", no_capture)
    calls = []
    graphed = CudaGraphed(lambda: calls.append(1) or torch.tensor(float(len(calls))))
    with pytest.warns(UserWarning, match="CUDA graph capture failed.*not permitted"):
        first = graphed()
    second = graphed()
    assert (first.item(), second.item()) == (1.0, 2.0)


@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_mixed_precision_logic_with_faked_gpu_capabilities_is_fp16_on_a_t4_bf16_from_ampere(
        monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert autocast_dtype(torch.device("cuda")) == dtype


@pytest.mark.parametrize("device, fused", [("cuda", True), ("cpu", True), ("mps", False)])
def test_adam_is_built_fused_for_a_gpu_so_a_grad_scaler_needs_no_host_sync(device, fused):
    optimizer = adam([torch.nn.Parameter(torch.zeros(3))], 1e-3, torch.device(device))
    assert optimizer.defaults["fused"] is fused
    assert getattr(optimizer, "_step_supports_amp_scaling", False) is fused


def test_fused_adam_on_a_cpu_takes_the_plain_adams_steps():
    torch.manual_seed(0)
    start, gradients = torch.randn(5, 7), [torch.randn(5, 7) for _ in range(3)]
    plain, fused = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizers = torch.optim.Adam([plain], lr=1e-3), adam([fused], 1e-3, torch.device("cpu"))
    for gradient in gradients:
        for parameter, optimizer in zip((plain, fused), optimizers):
            parameter.grad = gradient.clone()
            optimizer.step()
    assert not torch.equal(plain, start)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("native_bf16, dtype", [(True, torch.bfloat16), (False, None)])
def test_mixed_precision_logic_with_a_faked_cpu_flag_is_bf16_only_where_the_cpu_has_it(
        monkeypatch, native_bf16, dtype):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native_bf16)
    assert autocast_dtype(torch.device("cpu")) is dtype


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_precision_can_be_forced_either_way(monkeypatch, precision, dtype):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: dtype is None)
    assert autocast_dtype(torch.device("cpu"), precision) is dtype


@pytest.mark.parametrize("precision, message", [("fp16", "needs a CUDA GPU"),
                                                ("half", "must be 'auto' or one of")])
def test_a_precision_the_device_cannot_run_is_refused_when_the_trainer_is_built(
        afhq, tmp_path, precision, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(afhq, tmp_path, precision=precision)


def test_bf16_on_a_cpu_trains_without_a_grad_scaler(afhq, tmp_path):
    trainer = make_trainer(afhq, tmp_path, precision="bf16", train_num_steps=2)
    trainer.train()
    assert trainer.amp_dtype == torch.bfloat16 and not trainer.scaler.is_enabled()
    assert all(math.isfinite(row["loss"]) for row in trainer.history)


def test_image_size_must_match_the_model(afhq, tmp_path):
    with pytest.raises(ValueError, match="image_size=32"):
        make_trainer(afhq, tmp_path, image_size=32)


# ---------------------------------------------------------------- wandb


class FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step=None):
        self.calls.append((dict(data), step))

    def finish(self):
        self.calls.append(("finished", None))


def fake_wandb(monkeypatch):
    """Install a stand-in wandb module; returns (init keyword arguments, run calls)."""
    inits, calls = [], []

    def init(**options):
        inits.append(options)
        return FakeRun(calls)

    module = types.SimpleNamespace(init=init, Image=lambda path: f"image:{path}")
    monkeypatch.setitem(sys.modules, "wandb", module)
    return inits, calls


def test_one_wandb_log_per_step_with_explicit_step_though_read_in_groups(afhq, tmp_path,
                                                                        monkeypatch):
    _, calls = fake_wandb(monkeypatch)
    make_trainer(afhq, tmp_path, train_num_steps=4, log_every=3).train()
    logs = [call for call in calls if call[0] != "finished"]
    assert [step for _, step in logs] == [1, 2, 3, 4]
    assert set(logs[1][0]) == {"loss", "img"}  # milestone: loss and grid together


class Terminal:
    """A stand-in stdin attached to a terminal, where wandb would ask for a key."""

    def isatty(self):
        return True


@pytest.mark.parametrize("stdin", [None, Terminal()], ids=["no terminal", "terminal"])
def test_wandb_goes_offline_without_a_key_and_says_how_to_log_in(tmp_path, monkeypatch, capsys,
                                                                stdin):
    inits, _ = fake_wandb(monkeypatch)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(sys, "stdin", stdin)
    WandbLogger({}, tmp_path / "part1")
    assert inits[0]["mode"] == "offline" and inits[0]["project"] == "DDPM_AFHQ"
    assert inits[0]["name"] == "part1"  # the starter names the run after the results folder
    assert "wandb login" in capsys.readouterr().out


def test_wandb_mode_from_environment_is_respected(tmp_path, monkeypatch):
    inits, _ = fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(sys, "stdin", None)
    WandbLogger({}, tmp_path)
    assert inits[0]["mode"] is None  # wandb reads WANDB_MODE itself


def test_training_works_without_wandb_installed(afhq, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    make_trainer(afhq, tmp_path, train_num_steps=1).train()
    assert (tmp_path / "model.pt").is_file()


# ---------------------------------------------------------------- visualisation


def test_visualize_writes_forward_and_backward_figures(afhq, tmp_path):
    forward, backward = make_trainer(afhq, tmp_path).visualize_diffusion()
    assert forward == tmp_path / "forward_diffusion.png"
    assert backward == tmp_path / "backward_diffusion.png"
    assert all(path.read_bytes().startswith(b"\x89PNG") for path in (forward, backward))


def record_calls(monkeypatch, instance, name):
    """Wrap ``instance.name`` so that every call's arguments and result are kept; returns the
    list of ``(args, result)``."""
    calls = []
    method = getattr(instance, name)

    def recording(*args):
        result = method(*args)
        calls.append((args, result))
        return result

    monkeypatch.setattr(instance, name, recording)
    return calls


def test_backward_process_steps_p_sample_from_the_raw_x_T_of_the_forward_process(afhq, tmp_path,
                                                                                   monkeypatch):
    trainer = make_trainer(afhq, tmp_path)
    q_samples = record_calls(monkeypatch, trainer.model, "q_sample")
    p_samples = record_calls(monkeypatch, trainer.model, "p_sample")
    trainer.visualize_diffusion()
    last = trainer.model.num_timesteps - 1
    x_T = next(result for (x_0, t, noise), result in q_samples if t[0] == last)
    first_input = p_samples[0][0][0]
    assert torch.equal(first_input, x_T)
    assert first_input.min() < 0  # not clamped or rescaled to [0, 1]
    assert [t_index for (x, t, t_index), _ in p_samples] == list(range(last, -1, -1))


def test_forward_frames_are_at_the_handouts_fractions_of_T(afhq, tmp_path, monkeypatch):
    trainer = make_trainer(afhq, tmp_path)  # T = 10
    q_samples = record_calls(monkeypatch, trainer.model, "q_sample")
    trainer.visualize_diffusion()
    assert [int(t[0]) for (x_0, t, noise), _ in q_samples][:5] == [0, 2, 5, 7, 9]


def test_trainers_of_different_results_folders_share_the_decoded_images(afhq, tmp_path, monkeypatch):
    decodes = count_decodes(monkeypatch)
    make_trainer(afhq, tmp_path / "part1")
    decoded_by_first = len(decodes)
    make_trainer(afhq, tmp_path / "part2")
    assert decoded_by_first > 0 and len(decodes) == decoded_by_first


# ---------------------------------------------------------------- CPU speed


def test_cpu_samples_are_drawn_in_batches_of_the_cpu_sampling_batch(afhq, tmp_path, monkeypatch):
    trainer = make_trainer(afhq, tmp_path)
    sizes = []
    sample = trainer.model.sample

    def recording_sample(batch_size):
        sizes.append(batch_size)
        return sample(batch_size)

    monkeypatch.setattr(trainer.model, "sample", recording_sample)
    count = trainer_module.CPU_SAMPLING_BATCH + 6
    images = trainer.sample_images(count)
    assert sizes == [trainer_module.CPU_SAMPLING_BATCH, 6]
    assert images.shape == (count, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
    assert trainer.model.training


def test_bf16_is_not_native_where_pytorch_is_capped_below_avx512(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert device_module.cpu_has_native_bf16()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not device_module.cpu_has_native_bf16()


FREED_TENSOR_KEPT = """
import ctypes, sys, torch
sys.path.insert(0, {part_b!r})
import device

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def free_heap_bytes_after_freeing_a_large_tensor():
    tensor = torch.ones(12 * 2 ** 20)  # 48 MB, above glibc's largest mmap threshold
    del tensor
    return libc.mallinfo2().fordblks

before = free_heap_bytes_after_freeing_a_large_tensor()
device.keep_freed_memory_for_reuse()
print(before, free_heap_bytes_after_freeing_a_large_tensor())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc only")
def test_freed_large_tensors_stay_in_the_heap_for_the_next_step(tmp_path):
    import subprocess
    from pathlib import Path
    part_b = str(Path(trainer_module.__file__).parent)
    result = subprocess.run([sys.executable, "-c", FREED_TENSOR_KEPT.format(part_b=part_b)],
                            capture_output=True, text=True, check=True, timeout=120)
    before, after = map(int, result.stdout.split())
    assert before < 2 ** 25 <= 48 * 2 ** 20 <= after  # returned to the system, then kept
