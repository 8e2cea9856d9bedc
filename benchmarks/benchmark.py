"""Speed of Part B on whatever device this machine has; prints a table and JSON.

    python benchmarks/benchmark.py                 # full: 5,000 images, Parts 1 and 2 of 1,000 steps
    python benchmarks/benchmark.py --images 2000 --part-steps 20 --every 10 --fid-reference 1000 \
        --timed-steps 10                           # a CPU: the same figures on a smaller scale

It writes its own AFHQ-layout folder of synthetic 512x512 images (nothing is downloaded) and
measures, in one run:
  * the input pipeline: the cached on-device tensor of trainer.py against decoding the image
    files every step as the original starter did (torchvision transforms in a DataLoader);
  * training steps/s at the handout's settings (batch 32, accumulation 2, T=50, dim 16, 32x32)
    with each speed option on and off (fused accumulation, mixed precision, the CUDA graph,
    channels_last, torch.compile), with the mean loss of the timed steps beside each;
  * sampling images/s for 512 samples of 50 steps;
  * one FID evaluation with cached reference statistics against recomputing them, with an
    Inception-v3-sized network (random weights) standing in for clean-fid's Inception offline;
  * end-to-end wall time of Part 1 (no FID) and Part 2 (FID every 100 steps), and optionally
    Part 5 (``--part5``).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "A3_PartB"))
os.environ.setdefault("WANDB_MODE", "disabled")

import trainer as trainer_module  # noqa: E402
import utils  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from unet import Unet  # noqa: E402

HANDOUT = dict(image_size=32, batch_size=32, time_steps=50, unet_dim=16)
SAMPLES = 512
SECTIONS = ("pipeline", "training", "sampling", "fid", "parts", "compile")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="synthetic cats to write")
    parser.add_argument("--part-steps", type=int, default=1000, help="steps of the Part 1/2 runs")
    parser.add_argument("--every", type=int, default=None,
                        help="save/sample (and FID) interval of the Part 1/2 runs (default: steps/10)")
    parser.add_argument("--fid-reference", type=int, default=None,
                        help="reference images for the FID timing (default: all)")
    parser.add_argument("--timed-steps", type=int, default=50, help="steps timed per speed option")
    parser.add_argument("--part5", action="store_true", help="also time Part 5 (10,000 steps)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="what to measure (default: everything)")
    parser.add_argument("--workdir", default=None, help="where data and results go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the JSON figures to this file")
    return parser.parse_args()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device):
    """Wall time of ``function()`` in seconds, with the device's queue drained on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def write_cat(args):
    """One synthetic 512x512 cat: a smooth blob plus per-pixel grain, so that the PNG is about
    as large, and as slow to decode, as an AFHQ photo (a plain blob compresses to almost nothing)."""
    folder, index = args
    rng = np.random.default_rng(index)
    blob = np.asarray(utils.synthetic_image(rng, 512, utils.SYNTHETIC_COLOURS["cat"]), dtype=float)
    grainy = (blob + rng.normal(0, 12, blob.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(grainy).save(folder / f"cat_{index:05d}.png")


def write_dataset(root, count):
    folder = root / "train" / "cat"
    folder.mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count()) as pool:
        pool.map(write_cat, [(folder, index) for index in range(count)], chunksize=50)
    return root / "train", sum(path.stat().st_size for path in folder.iterdir()) / count


def starter_pipeline_images_per_s(data_path, batches, device):
    """The starter's way: decode, resize, crop and flip each PNG every time it is drawn."""
    transform = transforms.Compose([
        transforms.Resize(int(HANDOUT["image_size"] * trainer_module.CROP_MARGIN)),
        transforms.RandomCrop(HANDOUT["image_size"]),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
    ])
    dataset = torchvision.datasets.ImageFolder(str(data_path), transform=transform)
    loader = DataLoader(dataset, batch_size=HANDOUT["batch_size"], shuffle=True,
                        num_workers=min(4, os.cpu_count()), drop_last=True)
    batches = min(batches, len(loader))

    def run():  # from the workers' start, as at every epoch of the starter
        for _, (images, _) in zip(range(batches), loader):
            images.to(device)

    seconds, _ = timed(run, device)
    return batches * HANDOUT["batch_size"] / seconds


def cached_pipeline_images_per_s(image_set, batches, device):
    """trainer.py's way: random crops and flips of the decoded uint8 tensor on the device."""
    source = trainer_module.DeviceBatches(image_set.train, HANDOUT["image_size"],
                                          HANDOUT["batch_size"], True, device)
    source.next_batch()
    seconds, _ = timed(lambda: [source.next_batch() for _ in range(batches)], device)
    return batches * HANDOUT["batch_size"] / seconds


def speed_options(device):
    """The option sets to time, each adding one option to the one before; torch.compile's
    minutes of compilation come last, so that a run cut short still has every other figure."""
    additions = [("baseline: fp32, accumulation batch by batch",
                  dict(amp=False, fused_accumulation=False, cuda_graph=False)),
                 ("+ fused accumulation", dict(fused_accumulation=True))]
    if device.type == "cuda":
        additions += [("+ mixed precision", dict(amp=True)), ("+ CUDA graph", dict(cuda_graph=True))]
    default = additions[-1][0]  # what the Trainer does by default on this device
    additions.append(("+ channels_last", dict(channels_last=True)))
    options, current = {}, {}
    for name, addition in additions:
        current = {**current, **addition}
        options[name] = current
    compiled = dict(options[default], compile_model=True, cuda_graph=False)  # the Trainer uses one
    return options, default, {"default + torch.compile": compiled}


def build_trainer(image_set, results, device, amp, **speed):
    """A Trainer of the handout's model on the decoded images, with the given speed options."""
    torch.manual_seed(0)
    diffusion = Diffusion(Unet(HANDOUT["unet_dim"]), image_size=HANDOUT["image_size"],
                          timesteps=HANDOUT["time_steps"])
    trainer = trainer_module.Trainer(diffusion, None, image_set=image_set, dataset="train",
                                     results_folder=results, device=device, **speed)
    if not amp:
        trainer.amp_dtype = None
    return trainer


def training_speed(image_set, results, device, timed_steps, **options):
    """(steps/s, mean loss of the timed steps, whether a CUDA graph ran them): the loss, the same
    for every option set up to round-off and sampling noise, shows that an option speeds the
    training up without changing it."""
    trainer = build_trainer(image_set, results, device, **options)
    trainer.model.train()
    for _ in range(10):  # warm-up: cuDNN's choices, the CUDA graph's capture, torch.compile
        trainer._train_step()
    loss_sum = torch.zeros((), device=device)

    def train():
        for _ in range(timed_steps):
            loss_sum.add_(trainer._train_step())

    seconds, _ = timed(train, device)
    graphed = getattr(trainer.compute_gradients, "graph", None) is not None
    return timed_steps / seconds, loss_sum.item() / timed_steps, graphed


def time_training_options(options, image_set, results, device, args, figures):
    """Record training steps/s and the mean loss for each option set."""
    for name, option in options.items():
        try:
            steps_per_s, loss, graphed = training_speed(image_set, results / "speed", device,
                                                        args.timed_steps, **option)
            figures[f"train_steps_per_s[{name}]"] = round(steps_per_s, 2)
            figures[f"train_loss[{name}]"] = round(loss, 4)
            if option.get("cuda_graph") and device.type == "cuda":
                figures[f"train_cuda_graph_captured[{name}]"] = graphed
        except Exception as error:  # noqa: BLE001 - an option that fails here is a figure too
            figures[f"train_steps_per_s[{name}]"] = f"failed: {type(error).__name__}: {error}"[:200]


def sampling_images_per_s(trainer, device):
    with trainer._autocast():
        seconds, _ = timed(lambda: trainer.model.sample(SAMPLES), device)
    return SAMPLES / seconds


def inception_sized_extractor(device):
    """Inception v3 with random weights: clean-fid's network's size, no download."""
    network = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    network.fc = torch.nn.Identity()
    network = network.to(device).eval()

    @torch.no_grad()
    def extract(images):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return network(images.to(device) / 127.5 - 1).float()

    extract.__name__ = "inception_sized_standin"
    return extract


def fid_seconds(image_set, results, device, reference_count):
    """(seconds with the reference statistics recomputed, seconds with them cached)."""
    reference = image_set.reference[:reference_count]
    samples = image_set.reference[:SAMPLES]
    scorer = trainer_module.FidScorer(reference, Path(results) / "fid_reference.npz",
                                      Path(results) / "fid_samples", device,
                                      trainer_module.fid_worker_count(4),
                                      inception_sized_extractor(device))
    recompute, _ = timed(lambda: scorer.score(samples), device)
    cached, _ = timed(lambda: scorer.score(samples), device)
    return recompute, cached


def part_seconds(data_path, results, steps, every, fid, extractor):
    """Wall time of a run, with its decoded images and FID statistics cached beside the
    benchmark's other results (never in the user's cache)."""
    options = {"fid_feature_extractor": extractor} if fid else {}
    _, _, trainer = utils.setup_diffusion(steps, every, fid, results, data_path,
                                          dataloader_workers=os.cpu_count(),
                                          cache_folder=Path(results).parent / "cache", **options)
    seconds, _ = timed(trainer.train, trainer.device)
    return seconds


class Figures(dict):
    """The measured figures; each is printed, and saved to ``json_path``, as soon as it is known."""

    def __init__(self, json_path):
        super().__init__()
        self.json_path = json_path

    def __setitem__(self, name, value):
        super().__setitem__(name, value)
        print(f"[benchmark] {name}: {value}", flush=True)
        if self.json_path:
            Path(self.json_path).write_text(json.dumps(self, indent=1))


def run(args, workdir, figures):
    device = trainer_module.default_device()
    figures["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    figures["cpus"] = os.cpu_count()
    figures["torch"] = torch.__version__
    figures["images"] = args.images
    data_path, mean_file_size = write_dataset(workdir / "data", args.images)
    figures["mean_png_kb"] = round(mean_file_size / 1024)
    results = workdir / "results"

    decode_s, image_set = timed(lambda: trainer_module.load_image_set(
        data_path, "cat", HANDOUT["image_size"], results / "cache", os.cpu_count()), device)
    figures["decode_once_s"] = round(decode_s, 1)
    sections = set(args.sections)
    if "pipeline" in sections:
        figures["pipeline_decode_every_step_img_per_s"] = round(
            starter_pipeline_images_per_s(data_path, 40, device))
        figures["pipeline_cached_tensor_img_per_s"] = round(
            cached_pipeline_images_per_s(image_set, 200, device))

    quick_options, default, compiled_options = speed_options(device)
    figures["default_options"] = default
    if "training" in sections:
        time_training_options(quick_options, image_set, results, device, args, figures)
    if "sampling" in sections:
        trainer = build_trainer(image_set, results / "speed", device, **quick_options[default])
        figures["sampling_img_per_s"] = round(sampling_images_per_s(trainer, device), 1)

    if "fid" in sections:
        reference_count = args.fid_reference or len(image_set.reference)
        recompute, cached = fid_seconds(image_set, results / "fid", device, reference_count)
        figures["fid_reference_images"] = reference_count
        figures["fid_recompute_reference_s"] = round(recompute, 2)
        figures["fid_cached_reference_s"] = round(cached, 2)

    if "parts" in sections:
        time_parts(args, data_path, results, device, figures)
    if "compile" in sections:
        time_training_options(compiled_options, image_set, results, device, args, figures)
    if args.part5:
        figures["part5_s"] = round(part_seconds(data_path, results / "part5", 10000, 1000,
                                                False, None), 1)


def time_parts(args, data_path, results, device, figures):
    """End-to-end wall time of Part 1 (no FID) and Part 2 (FID at every milestone)."""
    every = args.every or max(1, args.part_steps // 10)
    figures["part_steps"] = args.part_steps
    figures["part1_s"] = round(part_seconds(data_path, results / "part1", args.part_steps, every,
                                            False, None), 1)
    figures["part2_s"] = round(part_seconds(data_path, results / "part2", args.part_steps, every,
                                            True, inception_sized_extractor(device)), 1)


def print_table(figures):
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")


def main():
    args = parse_args()
    figures = Figures(args.json)
    if args.workdir:
        run(args, Path(args.workdir), figures)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            run(args, Path(workdir), figures)
    print_table(figures)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
