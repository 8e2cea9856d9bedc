"""a3_helper.py: device choice, MNIST loading, plotting helpers, one_hot and the training loop."""
import errno
import os
import random
from pathlib import Path
from urllib.error import URLError

import matplotlib.pyplot as plt
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

import a3_helper
from a3_helper import (
    count_params,
    initialize_weights,
    interpolate_latents,
    load_mnist,
    one_hot,
    pick_device,
    rel_error,
    reset_seed,
    show_images,
    train_vae,
    vae_optimizer,
)
from mnist_data import write_mnist_raw
from vae import CVAE, VAE

NUM_IMAGES = 256
BATCH_SIZE = 64


@pytest.fixture
def offline(monkeypatch):
    """Make every torchvision MNIST download attempt fail as it would without internet."""

    def no_network(*args, **kwargs):
        raise URLError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)


@pytest.fixture
def mnist_root(tmp_path):
    write_mnist_raw(tmp_path, num_images=NUM_IMAGES, seed=0)
    return tmp_path


@pytest.fixture
def mnist_loader(mnist_root):
    dataset = torchvision.datasets.MNIST(
        mnist_root, train=True, download=False, transform=torchvision.transforms.ToTensor()
    )
    return DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_write_mnist_raw_gives_torchvision_both_splits_with_every_digit(mnist_root):
    train = torchvision.datasets.MNIST(mnist_root, train=True, download=False)
    test = torchvision.datasets.MNIST(mnist_root, train=False, download=False)
    assert train.data.shape == test.data.shape == (NUM_IMAGES, 28, 28)
    assert set(train.targets.tolist()) == set(range(10))


def test_load_mnist_uses_existing_files_without_downloading(mnist_root, offline):
    dataset = load_mnist(mnist_root)
    image, label = dataset[0]
    assert len(dataset) == NUM_IMAGES
    assert image.shape == (1, 28, 28) and 0.0 <= image.min() and image.max() <= 1.0
    assert 0 <= label < 10


def test_load_mnist_says_where_to_put_the_files_when_the_download_fails(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte") as error:
        load_mnist(tmp_path / "MNIST_data")
    assert str(tmp_path / "MNIST_data" / "MNIST" / "raw") in str(error.value)


@pytest.mark.parametrize("name, cut", [
    ("train-images-idx3-ubyte", lambda data: data[:len(data) // 2]),  # in the pixels
    ("train-labels-idx1-ubyte", lambda data: data[:6]),  # in the header
    ("t10k-images-idx3-ubyte", lambda data: b""),  # empty
], ids=["pixels", "header", "empty"])
def test_load_mnist_names_a_damaged_raw_file_and_how_to_fetch_it_again(mnist_root, offline,
                                                                       name, cut):
    damaged = mnist_root / "MNIST" / "raw" / name
    damaged.write_bytes(cut(damaged.read_bytes()))
    with pytest.raises(ValueError) as error:
        load_mnist(mnist_root)
    assert str(error.value).startswith(f"{damaged} is damaged")
    assert f"Delete the folder {mnist_root / 'MNIST' / 'raw'} and load the data again" in str(
        error.value)


def test_load_mnist_names_a_raw_file_that_cannot_be_opened_in_one_line(mnist_root, offline,
                                                                      monkeypatch):
    locked = mnist_root / "MNIST" / "raw" / "train-labels-idx1-ubyte"

    def refuse_the_locked_file(path, *args, **kwargs):
        if Path(path) == locked:  # as chmod 000 does to a user other than root
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(a3_helper, "open", refuse_the_locked_file, raising=False)
    with pytest.raises(ValueError) as error:
        load_mnist(mnist_root)
    assert str(error.value).startswith(f"{locked} cannot be read (Permission denied)")
    assert "\n" not in str(error.value)


def test_pick_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")


def test_reset_seed_repeats_python_and_torch_random_draws():
    reset_seed(5)
    first = (random.random(), torch.rand(3))
    reset_seed(5)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0] and torch.equal(first[1], second[1])


def test_rel_error_is_max_difference_over_max_magnitude():
    x = torch.tensor([1.0, 2.0])
    y = torch.tensor([1.0, 2.5])
    assert rel_error(x, y) == pytest.approx(0.5 / 4.5)
    assert rel_error(torch.zeros(2), torch.zeros(2)) == 0.0


def test_count_params_counts_weights_and_biases():
    assert count_params(nn.Linear(3, 4)) == 3 * 4 + 4


def test_initialize_weights_zeroes_linear_biases_and_keeps_xavier_bounds():
    torch.manual_seed(0)
    layer = nn.Linear(30, 20)
    layer.apply(initialize_weights)
    xavier_bound = (6 / (30 + 20)) ** 0.5
    assert torch.equal(layer.bias, torch.zeros(20))
    assert layer.weight.abs().max() <= xavier_bound
    assert layer.weight.abs().max() > 0.9 * xavier_bound


def test_show_images_draws_a_square_grid_of_the_batch():
    figure = show_images(torch.rand(10, 784))
    grid = figure.axes[0].images[0].get_array()
    plt.close(figure)
    # make_grid: 4 columns and 3 rows of 28-pixel images with 2-pixel padding around each.
    assert grid.shape == (3 * 30 + 2, 4 * 30 + 2)


def test_interpolate_latents_walks_each_row_from_start_to_end():
    z_start, z_end = torch.zeros(2, 3), torch.tensor([[4.0, 4.0, 4.0], [8.0, 8.0, 8.0]])
    codes = interpolate_latents(z_start, z_end, num_steps=5)
    assert codes.shape == (10, 3)
    assert torch.allclose(codes[:5, 0], torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))
    assert torch.allclose(codes[5:, 0], torch.tensor([0.0, 2.0, 4.0, 6.0, 8.0]))


def test_one_hot_marks_the_label_column_of_each_row():
    encoded = one_hot(torch.tensor([2, 0, 9]), 10)
    assert encoded.dtype == torch.float32
    assert torch.equal(encoded.argmax(dim=1), torch.tensor([2, 0, 9]))
    assert torch.equal(encoded.sum(dim=1), torch.ones(3))


def test_one_hot_accepts_a_list_of_labels():
    assert torch.equal(one_hot([1, 0], 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.tensor([0.0, 1.0]), "integer"),
        (torch.tensor([True, False]), "integer"),
        (torch.tensor([-1, 2]), r"\[0, 9\]"),
        (torch.tensor([3, 10]), r"\[0, 9\]"),
    ],
)
def test_one_hot_rejects_labels_that_are_not_class_indices(labels, message):
    with pytest.raises(ValueError, match=message):
        one_hot(labels, 10)


def test_one_hot_rejects_a_class_size_that_is_not_positive():
    with pytest.raises(ValueError, match="class_size"):
        one_hot(torch.tensor([0]), 0)


def test_train_vae_lowers_the_loss_on_synthetic_mnist(mnist_loader):
    reset_seed(0)
    model = VAE(784, latent_size=15)
    losses = [train_vae(epoch, model, mnist_loader) for epoch in range(3)]
    assert losses[-1] < 0.75 * losses[0]


def test_train_vae_trains_a_cvae_on_the_labels(mnist_loader):
    reset_seed(0)
    model = CVAE(784, num_classes=10, latent_size=15)
    losses = [train_vae(epoch, model, mnist_loader, cond=True) for epoch in range(3)]
    assert losses[-1] < 0.75 * losses[0]


def test_train_vae_prints_and_returns_the_mean_loss_per_sample(monkeypatch, capsys):
    """Batches of 3 and 1 images whose fake per-sample loss is the pixel value: 1.0 and 5.0."""

    def pixel_value_loss(x_hat, x, mu, logvar):
        return (x_hat * 0).sum() + x.mean()

    monkeypatch.setattr(a3_helper, "loss_function", pixel_value_loss)
    batches = [(torch.full((3, 1, 28, 28), 1.0), torch.zeros(3)), (torch.full((1, 1, 28, 28), 5.0), torch.zeros(1))]
    mean_loss = train_vae(0, VAE(784), batches)
    assert mean_loss == pytest.approx((3 * 1.0 + 1 * 5.0) / 4)
    assert "Loss: 2.000000" in capsys.readouterr().out


def test_train_vae_keeps_one_adam_optimizer_per_model_across_epochs(mnist_loader):
    model = VAE(784)
    train_vae(0, model, mnist_loader)
    optimizer = vae_optimizer(model)
    train_vae(1, model, mnist_loader)
    first_weight = next(model.parameters())
    assert vae_optimizer(model) is optimizer
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 1e-3
    assert optimizer.state[first_weight]["step"] == 2 * len(mnist_loader)


def test_vae_optimizer_gives_each_model_its_own_optimizer():
    first_model, second_model = VAE(784), VAE(784)
    assert vae_optimizer(first_model) is not vae_optimizer(second_model)


def test_train_vae_rejects_an_empty_loader():
    with pytest.raises(ValueError, match="no batches"):
        train_vae(0, VAE(784), [])
