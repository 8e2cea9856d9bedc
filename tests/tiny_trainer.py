"""A tiny Trainer on a tiny AFHQ tree, for the tests of the Trainer and the modules it drives."""
import pytest
import torch

import images as images_module
from afhq_data import make_afhq_folder
from diffusion import Diffusion
from trainer import Trainer
from unet import Unet

PER_CLASS = 6
IMAGE_SIZE = 16


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


def count_decodes(monkeypatch):
    """The paths decode_image is called on from now on, a list that grows as it is called."""
    calls = []
    decode = images_module.decode_image

    def counting_decode(path, sizes):
        calls.append(path)
        return decode(path, sizes)

    monkeypatch.setattr(images_module, "decode_image", counting_decode)
    return calls
