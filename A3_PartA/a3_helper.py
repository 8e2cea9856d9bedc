"""Helpers for the VAE notebook: seeding, device choice, MNIST loading, plotting and the training loop."""
import math
import random
import struct
import weakref
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.transforms import ToTensor
from tqdm import tqdm

from vae import loss_function

LEARNING_RATE = 1e-3
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# One Adam per model, kept across calls to train_vae. Weak keys let a model
# (and its optimizer) be freed as soon as the notebook drops the model.
_OPTIMIZERS = weakref.WeakKeyDictionary()


def hello_helper():
    """Print a greeting, to check that a3_helper.py is importable from the notebook."""
    print("Hello from a3_helper.py!")


def reset_seed(number):
    """Seed Python's and PyTorch's random number generators with ``number``."""
    random.seed(number)
    torch.manual_seed(number)


def pick_device():
    """Return the best available device: CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def rel_error(x, y, eps=1e-10):
    """Relative error max|x - y| / max(|x| + |y|) between two tensors, guarded by ``eps``."""
    top = (x - y).abs().max().item()
    bottom = (x.abs() + y.abs()).clamp(min=eps).max().item()
    return top / bottom


def idx_shape(path):
    """The shape an idx-ubyte file (MNIST's raw format) declares in its header.

    Raises ValueError, saying what is wrong, when the file does not start as an idx file of
    bytes or its size is not the header's (a file cut short).
    """
    with open(path, "rb") as file:
        magic = file.read(4)
        if len(magic) < 4 or magic[:3] != b"\x00\x00\x08":
            raise ValueError("it does not start as an idx file of bytes")
        dimensions = file.read(4 * magic[3])
    if len(dimensions) < 4 * magic[3]:
        raise ValueError("its header is cut short")
    shape = struct.unpack(f">{magic[3]}i", dimensions)
    expected = 4 + len(dimensions) + math.prod(shape)
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"it holds {size:,} bytes where its header announces {expected:,}")
    return shape


def check_mnist_files(data_dir):
    """Raise ValueError naming a damaged or unreadable raw MNIST file in ``data_dir`` and what to
    do.

    torchvision downloads the four raw files only when one is missing, and reads them without
    checking them: a file cut short by an interrupted download or a full disk would otherwise
    fail deep inside torchvision at every later run.
    """
    raw_folder = Path(data_dir) / "MNIST" / "raw"
    paths = [raw_folder / name for name in MNIST_RAW_FILES]
    if not all(path.is_file() for path in paths):
        return  # torchvision downloads them all afresh
    fetch_again = (f"Delete the folder {raw_folder} and load the data again: torchvision "
                   "downloads MNIST afresh.")
    for path in paths:
        try:
            idx_shape(path)
        except ValueError as error:
            raise ValueError(f"{path} is damaged ({error}), probably by an interrupted download. "
                             f"{fetch_again}") from None
        except OSError as error:
            raise ValueError(f"{path} cannot be read ({error.strerror or error}): make it "
                             f"readable, or: {fetch_again}") from None


def load_mnist(data_dir, train=True):
    """MNIST as tensors in [0, 1], downloaded into ``data_dir`` by torchvision when missing.

    Raises ValueError naming a damaged file (see ``check_mnist_files``), and FileNotFoundError,
    saying where to put the files by hand, when the download fails (no internet, blocked mirror).
    """
    check_mnist_files(data_dir)
    try:
        return torchvision.datasets.MNIST(data_dir, train=train, download=True, transform=ToTensor())
    except (RuntimeError, OSError) as error:
        check_mnist_files(data_dir)  # a download cut short
        raw_folder = Path(data_dir) / "MNIST" / "raw"
        raise FileNotFoundError(
            f"Could not download MNIST into {data_dir} ({error}). Download the four files "
            f"{', '.join(name + '.gz' for name in MNIST_RAW_FILES)} (for example from {MNIST_MIRROR}), "
            f"unzip them with gunzip and put {', '.join(MNIST_RAW_FILES)} in {raw_folder}, "
            "then load the data again."
        ) from error


def show_images(images):
    """Show a batch of one-channel images in a square grid and return the matplotlib figure.

    Args:
        images: (N, 1, H, W) or (N, H*W) tensor of square images with values in [0, 1].
    """
    side = math.isqrt(images[0].numel())
    images = images.detach().cpu().reshape(-1, 1, side, side)
    columns = math.ceil(math.sqrt(images.shape[0]))
    grid = torchvision.utils.make_grid(images, nrow=columns, padding=2, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(columns, columns))
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1)
    return fig


def interpolate_latents(z_start, z_end, num_steps):
    """Latent codes on straight lines from each row of ``z_start`` to the same row of ``z_end``.

    Args:
        z_start, z_end: (S, Z) end points.
        num_steps: points per line, end points included.

    Returns:
        (S * num_steps, Z) codes; line i fills rows i*num_steps ... (i+1)*num_steps - 1,
        so ``show_images`` draws each line as one row when S == num_steps.
    """
    weights = torch.linspace(0.0, 1.0, num_steps, device=z_start.device).view(1, num_steps, 1)
    lines = torch.lerp(z_start.unsqueeze(1), z_end.unsqueeze(1), weights)
    return lines.reshape(-1, z_start.shape[1])


def count_params(model):
    """Number of scalar parameters in ``model``."""
    return sum(parameter.numel() for parameter in model.parameters())


def initialize_weights(m):
    """Xavier-uniform weights and zero biases for Linear layers; use as ``model.apply(initialize_weights)``."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)


def one_hot(labels, class_size):
    """One-hot float vectors (N, class_size) for integer class labels (N,) in [0, class_size).

    ``labels`` may be a tensor or a list of ints; the result is on the labels' device.
    """
    if not isinstance(class_size, int) or class_size < 1:
        raise ValueError(f"class_size must be a positive integer, got {class_size!r}.")
    labels = torch.as_tensor(labels)
    if labels.dtype not in INTEGER_DTYPES:
        raise ValueError(f"labels must be integer class indices, got a tensor of dtype {labels.dtype}.")
    if labels.numel() and (labels.min() < 0 or labels.max() >= class_size):
        raise ValueError(
            f"labels must lie in [0, {class_size - 1}], got values from {labels.min().item()} "
            f"to {labels.max().item()}; pass a larger class_size or fix the labels."
        )
    return F.one_hot(labels.long(), class_size).float()


def vae_optimizer(model):
    """The Adam optimizer (lr 1e-3) that ``train_vae`` uses for ``model``, created on first use.

    It is cached per model object, so its moment estimates and step count carry
    over from one epoch to the next; a new model gets a fresh optimizer.
    """
    if model not in _OPTIMIZERS:
        _OPTIMIZERS[model] = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    return _OPTIMIZERS[model]


def train_vae(epoch, model, train_loader, cond=False):
    """Train ``model`` for one epoch on ``train_loader``; print and return the mean loss per sample.

    The model moves to ``pick_device()``. Each step minimises ``loss_function``,
    the negative ELBO (eq. (4) of variational_autoencoders.ipynb), with the
    model's persistent optimizer (``vae_optimizer``). With ``cond=True`` the
    model is a CVAE and also receives the one-hot labels.

    Args:
        epoch: epoch number, used in the progress bar and the printed line.
        model: a VAE, or a CVAE when ``cond`` is True.
        train_loader: iterable of (images, labels) batches, images (N, 1, 28, 28) in [0, 1].
        cond: whether to condition the model on the labels.

    Returns:
        The epoch's loss summed over all samples divided by their number.
    """
    device = pick_device()
    model.to(device).train()
    optimizer = vae_optimizer(model)
    total_loss, num_samples = 0.0, 0
    progress = tqdm(train_loader, desc=f"Epoch {epoch}", leave=False)
    for images, labels in progress:
        images = images.to(device)
        if cond:
            x_hat, mu, logvar = model(images, one_hot(labels, model.num_classes).to(device))
        else:
            x_hat, mu, logvar = model(images)
        loss = loss_function(x_hat, images, mu, logvar)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * images.shape[0]
        num_samples += images.shape[0]
        progress.set_postfix(loss=f"{loss.item():.2f}")
    if num_samples == 0:
        raise ValueError("train_loader yielded no batches; check that the dataset is not empty.")
    mean_loss = total_loss / num_samples
    print(f"Train Epoch: {epoch} \tLoss: {mean_loss:.6f}")
    return mean_loss
