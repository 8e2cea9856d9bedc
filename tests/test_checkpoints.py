"""checkpoints.py through the Trainer: saving, resuming and refusing checkpoints, the starter's
included."""

import pytest
import torch

import trainer as trainer_module
from afhq_data import part_b_environment  # noqa: F401 (autouse fixture)
from diffusion import Diffusion
from trainer import Trainer
from unet import Unet
from tiny_trainer import (afhq, count_decodes, load_checkpoint, make_trainer,  # noqa: F401 (fixture)
                          IMAGE_SIZE)

pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


def test_resumed_training_says_where_it_resumes(afhq, tmp_path, capsys):
    make_trainer(afhq, tmp_path, train_num_steps=2).train()
    make_trainer(afhq, tmp_path, train_num_steps=3, load_path=tmp_path / "model.pt").train()
    assert "Resuming from step 2 of 3." in capsys.readouterr().out


def test_training_a_model_already_at_its_last_step_says_so(afhq, tmp_path, capsys):
    make_trainer(afhq, tmp_path, train_num_steps=2).train()
    trainer = make_trainer(afhq, tmp_path, train_num_steps=2, load_path=tmp_path / "model.pt")
    trainer.train()
    assert "Nothing to train: the model is at step 2" in capsys.readouterr().out


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
