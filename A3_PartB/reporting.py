"""What training reports: the wandb run (which never blocks and never breaks training), the
metrics file and the PNG figures, shown inline in a notebook."""
import csv
import io
import netrc
import os
import warnings
from pathlib import Path

from matplotlib.figure import Figure
from torchvision.utils import make_grid

from files import atomic_write

WANDB_PROJECT = "DDPM_AFHQ"
IMAGES_PER_PANEL = 16
METRIC_FIELDS = ("step", "loss", "fid")


def wandb_key_available():
    """Whether wandb has an API key: WANDB_API_KEY or a ~/.netrc entry for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """A wandb run (project DDPM_AFHQ, named after the results folder, as the starter's) that
    never blocks and never breaks training.

    WANDB_MODE is respected. Without it and without an API key the run is offline (sync it later
    with ``wandb sync``): wandb never stops at its login question, in a terminal or not.
    A missing or failing wandb only warns.
    """

    def __init__(self, config, folder):
        self.wandb = None
        self.run = None
        try:
            import wandb
        except ImportError:
            print("wandb is not installed: metrics go to metrics.csv and the PNG figures only.")
            return
        mode = None
        if "WANDB_MODE" not in os.environ and not wandb_key_available():
            mode = "offline"
            print("wandb: no API key, so logging offline (run `wandb login` once to log online; "
                  "WANDB_MODE=disabled turns wandb off).")
        try:
            self.run = wandb.init(project=WANDB_PROJECT, name=Path(folder).resolve().name,
                                  config=config, mode=mode,
                                  dir=os.environ.get("WANDB_DIR", str(folder)))
            self.wandb = wandb
        except Exception as error:  # noqa: BLE001 - logging is optional, training must go on
            warnings.warn(f"wandb did not start ({error}); continuing without it.", stacklevel=2)

    def log(self, step, metrics, images=None):
        """One wandb.log call for this step: the metrics and the images (name -> PNG path)."""
        if self.run is None:
            return
        pictures = {name: self.wandb.Image(str(path)) for name, path in (images or {}).items()}
        self.run.log({**metrics, **pictures}, step=step)

    def finish(self):
        """End the wandb run (wandb syncs it), if one started."""
        if self.run is not None:
            self.run.finish()


def write_metrics(history, path):
    """Rewrite the metrics CSV (``METRIC_FIELDS``) from the history's rows."""
    text = io.StringIO()
    writer = csv.DictWriter(text, METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(history)
    atomic_write(path, lambda file: file.write(text.getvalue().encode()))


def plot_metrics(history, folder, num_fid_samples):
    """Redraw loss.png, and fid.png once a row has an FID, from the history's rows."""
    plot_curve([row["step"] for row in history], [row["loss"] for row in history],
               "training loss (L1)", folder / "loss.png")
    scored = [row for row in history if row["fid"] is not None]
    if scored:
        plot_curve([row["step"] for row in scored], [row["fid"] for row in scored],
                   f"FID ({num_fid_samples} samples)", folder / "fid.png")


def plot_curve(steps, values, label, path):
    """Save a line plot of ``values`` against training steps as a PNG."""
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.plot(steps, values, marker="o" if len(steps) <= 30 else None)
    axes.set_xlabel("training step")
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))


def plot_process(frames, titles, path):
    """Save one panel per frame (a grid of the batch's images in [0, 1]) side by side."""
    figure = Figure(figsize=(3 * len(frames), 3.4))
    for axes, frame, title in zip(figure.subplots(1, len(frames)), frames, titles):
        grid = make_grid(frame[:IMAGES_PER_PANEL].float().cpu(), nrow=4, padding=1)
        axes.imshow(grid.permute(1, 2, 0).numpy())
        axes.set_title(title)
        axes.axis("off")
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))


def show_in_notebook(path):
    """Display a PNG inline when running under IPython (a notebook); do nothing elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import Image as NotebookImage, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(NotebookImage(filename=str(path)))
