"""Trainer: the training loop, its milestones and files, sampling and visualisation."""
import csv

import pytest
import torch

import reporting
import trainer as trainer_module
from afhq_data import part_b_environment  # noqa: F401 (autouse fixture)
from diffusion import Diffusion
from tiny_trainer import (afhq, count_decodes, load_checkpoint, make_trainer,  # noqa: F401 (fixture)
                          tiny_diffusion, IMAGE_SIZE, PER_CLASS)

pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


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


def test_image_size_must_match_the_model(afhq, tmp_path):
    with pytest.raises(ValueError, match="image_size=32"):
        make_trainer(afhq, tmp_path, image_size=32)


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


def test_cpu_samples_are_drawn_in_batches_of_the_cpu_sampling_batch(afhq, tmp_path, monkeypatch):
    trainer = make_trainer(afhq, tmp_path)
    sizes = []
    sample = trainer.model.sample

    def recording_sample(batch_size):
        sizes.append(batch_size)
        return sample(batch_size)

    monkeypatch.setattr(trainer.model, "sample", recording_sample)
    monkeypatch.setattr(trainer_module, "CPU_SAMPLING_BATCH", 8)
    count = 8 + 6
    images = trainer.sample_images(count)
    assert sizes == [8, 6]
    assert images.shape == (count, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
    assert trainer.model.training
