"""Part B's settings, written once: the handout's (its tables 1-3, the starter's defaults) and
this package's own. main.py's flags, utils.py's arguments and the Trainer's defaults all read
them from ``SETTINGS``; the notebook's parameters cell is the student's copy of the same values.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """The defaults; the handout's per-part values (Parts 1-2: 1,000 steps with a grid every
    100) are passed by the notebook and on the command line."""

    # the handout's, as the starter's main.py and utils.py give them
    train_steps: int = 10000  # Part 5
    save_and_sample_every: int = 1000  # a checkpoint, a sample grid and (with fid) an FID
    fid: bool = False
    save_folder: str = "./results"
    data_path: str = "./data/train/"
    unet_dim_mults: tuple = (1, 2, 4, 8)
    image_size: int = 32
    batch_size: int = 32
    data_class: str = "cat"
    time_steps: int = 50  # T
    unet_dim: int = 16
    learning_rate: float = 1e-3
    dataloader_workers: int = 16
    gradient_accumulate_every: int = 2  # the starter's setup_diffusion
    seed: int = 2024  # the starter's

    # this package's
    precision: str = "auto"  # see device.autocast_dtype
    checkpoint_minutes: float = 5  # model.pt also this often, so a kill loses minutes at most
    cuda_graph: bool = True  # on a GPU, each step's gradients replayed as a CUDA graph
    num_fid_samples: int = 512  # the course's FID protocol
    num_samples: int = 25  # the sample grid
    log_every: int = 10  # steps between reads of the loss from the device


SETTINGS = Settings()
