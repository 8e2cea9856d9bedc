"""The checkpoint format: ``model.pt`` holds the starter's ``{"step", "model"}`` (the Diffusion's
state_dict: the U-Net's ``model.*`` weights) and, from this package's Trainer, also
``optimizer``, ``scaler``, ``settings`` and ``history``. Read with ``weights_only=True``."""
import itertools
import os
from pathlib import Path

import torch

from files import reported_write_errors


def model_settings(diffusion_model):
    """The settings a checkpoint must share with the model it is loaded into."""
    unet = diffusion_model.model  # a U-Net unpickled from the starter's unet.py has no dims
    return {"image_size": diffusion_model.image_size, "channels": diffusion_model.channels,
            "timesteps": diffusion_model.num_timesteps, "unet_dim": getattr(unet, "dim", None),
            "unet_dim_mults": list(getattr(unet, "dim_mults", []))}


def check_settings(saved, current, path):
    """Raise ValueError naming every setting where the checkpoint differs from the model.

    A starter checkpoint records no settings; its weights are checked when they are loaded.
    """
    mismatched = [f"{key}: checkpoint {saved.get(key)!r}, model {value!r}"
                  for key, value in current.items() if saved and saved.get(key) != value]
    if mismatched:
        raise ValueError(f"Checkpoint {path} does not match the model ({'; '.join(mismatched)}). "
                         "Build the model with the checkpoint's settings or train a new one.")


def read_checkpoint(path, device):
    """The dict saved by ``Trainer.save`` (ours or the starter's) at ``path``, on ``device``.

    Raises FileNotFoundError when there is no file, ValueError when it is not such a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}: train first, or give the path of one.")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many kinds for a bad file
        raise ValueError(f"{path} is not a readable checkpoint ({type(error).__name__}); it may be "
                         "truncated or another kind of file. Pass a model.pt written by training."
                         ) from None
    if not isinstance(checkpoint, dict) or not {"step", "model"} <= checkpoint.keys():
        raise ValueError(f"{path} is not a training checkpoint (it has no 'step' and 'model'). "
                         "Pass a model.pt written by training.")
    return checkpoint


def load_network_weights(diffusion_model, state_dict, path):
    """Load the U-Net's weights (the ``model.*`` entries) of a Diffusion state_dict.

    Schedule buffers that a diffusion.py may have saved are skipped: they follow from T.
    """
    prefix = "model."
    weights = {key[len(prefix):]: value for key, value in state_dict.items()
               if key.startswith(prefix)}
    try:
        diffusion_model.model.load_state_dict(weights)
    except RuntimeError as error:
        reasons = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise ValueError(f"The weights in {path} do not fit this U-Net: {reasons} Use the "
                         "unet_dim and unet_dim_mults it was trained with.") from None


def resumable_checkpoint(path, current):
    """``path`` when it holds a checkpoint of the model's settings ``current`` (to resume from),
    else None. A checkpoint of other settings, or a file that is not a readable checkpoint, is
    renamed aside (``model.set_aside_1.pt``, ...) and said in one line, so that training afresh
    never overwrites it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        check_settings(read_checkpoint(path, "cpu").get("settings"), current, path)
        return path
    except ValueError as error:
        names = (path.with_name(f"{path.stem}.set_aside_{number}.pt")
                 for number in itertools.count(1))
        aside = next(name for name in names if not name.exists())
        with reported_write_errors(aside):  # a folder that cannot be written: SaveError, said
            os.replace(path, aside)
        print(f"{error} It is kept as {aside}, and this run trains afresh.")
        return None
