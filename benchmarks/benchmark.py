"""Speed of Part B on whatever device this machine has, beside lucidrains' library; prints a
table and JSON.

    pip install -r benchmarks/requirements.txt      # lucidrains' denoising-diffusion-pytorch
    python benchmarks/benchmark.py                  # full: 5,000 images, Parts 1 and 2 of 1,000 steps
    python benchmarks/benchmark.py --images 2000 --part-steps 100 --every 10 --timed-steps 10 \
        --sections pipeline training lucidrains sampling precision part1   # a 2-core CPU

It writes its own AFHQ-layout folder of synthetic 512x512 images (nothing is downloaded), or
takes real cats (``--cats``), and measures, in one run (``--sections`` picks some), after the
machine: the CPU's capability
(AVX2, AVX512, ...), whether it runs bf16 natively, the rate of a 2048^3 matmul in fp32 (and
bf16 where native), the limit each training figure is given as a share of, and the GFLOP of a
training step (torch's FLOP counter):
  * pipeline: the cached on-device tensor of images.py against decoding the image files every
    step as the original starter did (torchvision transforms in a DataLoader);
  * training: a plain fp32 step (loss, backward, Adam) and the steady-state steps/s of the
    Trainer at the handout's settings (batch 32, accumulation 2, T=50, dim 16, 32x32) with its
    defaults and with each choice it leaves open (precision; the CUDA graph on a GPU), with
    the mean loss of the timed steps beside each;
  * lucidrains: seconds per step of this package's Trainer and of lucidrains' Trainer (fp32,
    and its bf16 where native), taking turns for 3 rounds of a 5-step and a 25-step run, each
    from the difference of its fastest of each, and 128 samples with each sampler: every
    figure from a fresh process;
  * sampling: images/s for 512 samples of 50 steps, with each precision;
  * precision: 300 seeded steps in mixed precision and in float32, the mean loss of the last 100;
  * fid: one of Part 2's FID evaluations (512 samples, then their score against the cached
    statistics of the training images, computed first and timed), sampling and scoring as
    shares of the machine's rates, clean-fid's own FID of the same images from PNG files beside
    ours, and lucidrains' FIDEvaluation (``fid_section.py``);
  * part1, part2, part5: end-to-end wall time of Part 1 (no FID), Part 2 (FID at every grid)
    and Part 5 (10,000 steps, only when asked for).
To measure what a CPU without AVX-512 does, cap PyTorch, oneDNN and MKL at AVX2 on this one:
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``.
"""
import argparse
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "A3_PartB"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("WANDB_MODE", "disabled")

import device as device_module  # noqa: E402
import fid_section  # noqa: E402
import images as images_module  # noqa: E402
import trainer as trainer_module  # noqa: E402
import utils  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from flops import gflop  # noqa: E402
from main import SYNTHETIC_COLOURS, synthetic_image  # noqa: E402
from real_cats import cats_train_folder, describe  # noqa: E402
from settings import SETTINGS  # noqa: E402
from unet import Unet  # noqa: E402

SAMPLES = 512
SECTIONS = ("pipeline", "training", "lucidrains", "sampling", "precision", "fid", "part1", "part2",
            "part5")
DEFAULT_SECTIONS = SECTIONS[:-1]  # Part 5 (10,000 steps) only when asked for
WARMUP_STEPS = 5


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="synthetic cats to write")
    parser.add_argument("--part-steps", type=int, default=1000, help="steps of the Part 1/2 runs")
    parser.add_argument("--every", type=int, default=None,
                        help="save/sample (and FID) interval of the Part 1/2 runs (default: steps/10)")
    parser.add_argument("--cats", default=None,
                        help="real cats instead of synthetic ones: an AFHQ-layout zip (as "
                             "../shared/data's) or an .npz (see real_cats.py)")
    parser.add_argument("--timed-steps", type=int, default=50, help="steps timed per speed option")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=DEFAULT_SECTIONS,
                        help="what to measure (default: all but part5)")
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
    blob = np.asarray(synthetic_image(rng, 512, SYNTHETIC_COLOURS["cat"]), dtype=float)
    grainy = (blob + rng.normal(0, 12, blob.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(grainy).save(folder / f"cat_{index:05d}.png")


def write_dataset(root, count):
    folder = root / "train" / "cat"
    folder.mkdir(parents=True, exist_ok=True)
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(write_cat, [(folder, index) for index in range(count)], chunksize=50)
    return root / "train", sum(path.stat().st_size for path in folder.iterdir()) / count


def starter_pipeline_images_per_s(data_path, batches, device):
    """The starter's way: decode, resize, crop and flip each PNG every time it is drawn."""
    transform = transforms.Compose([
        transforms.Resize(int(SETTINGS.image_size * images_module.CROP_MARGIN)),
        transforms.RandomCrop(SETTINGS.image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
    ])
    dataset = torchvision.datasets.ImageFolder(str(data_path), transform=transform)
    loader = DataLoader(dataset, batch_size=SETTINGS.batch_size, shuffle=True,
                        num_workers=min(4, os.cpu_count()), drop_last=True)
    batches = min(batches, len(loader))

    def run():  # from the workers' start, as at every epoch of the starter
        for _, (images, _) in zip(range(batches), loader):
            images.to(device)

    seconds, _ = timed(run, device)
    return batches * SETTINGS.batch_size / seconds


def cached_pipeline_images_per_s(image_set, batches, device):
    """images.py's way: random crops and flips of the decoded uint8 tensor on the device."""
    source = images_module.DeviceBatches(image_set.train, SETTINGS.image_size,
                                         SETTINGS.batch_size, True, device)
    source.next_batch()
    seconds, _ = timed(lambda: [source.next_batch() for _ in range(batches)], device)
    return batches * SETTINGS.batch_size / seconds


def precision_options(device):
    """The option sets to time against each other: the Trainer's default (first) and each choice
    it leaves to the user on this device (mixed precision; the CUDA graph on a GPU)."""
    if device.type != "cuda":
        default = device_module.autocast_dtype(device) or "fp32"
        name = "bf16" if default == torch.bfloat16 else "fp32"
        return {f"default ({name})": {}, "fp32": dict(precision="fp32")}
    return {"default (auto precision + CUDA graph)": {},
            "bf16, no CUDA graph": dict(precision="bf16", cuda_graph=False),
            "fp16 + CUDA graph": dict(precision="fp16"),
            "fp32 + CUDA graph": dict(precision="fp32")}


def build_trainer(image_set, results, device, **options):
    """A Trainer of the handout's model on the decoded images, with the given options."""
    torch.manual_seed(0)
    diffusion = Diffusion(Unet(SETTINGS.unet_dim), image_size=SETTINGS.image_size,
                          timesteps=SETTINGS.time_steps)
    return trainer_module.Trainer(diffusion, None, image_set=image_set, dataset="train",
                                  results_folder=results, device=device, **options)


def trained(image_set, results, device, steps, **options):
    """(seconds, trainer) of ``Trainer.train`` for ``steps`` steps from the seeded model, with
    one milestone (a grid of 25 samples), at the end."""
    trainer = build_trainer(image_set, results, device, train_num_steps=steps,
                            save_and_sample_every=steps, **options)
    seconds, _ = timed(trainer.train, device)
    return seconds, trainer


def matmul_gflops(dtype, size=2048, repeats=5):
    """The CPU's (or GPU's) rate on one large matmul: the limit its training step is held to."""
    device = device_module.default_device()
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    a @ b
    best = min(timed(lambda: a @ b, device)[0] for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def handout_model_and_batch(device):
    torch.manual_seed(0)
    diffusion = Diffusion(Unet(SETTINGS.unet_dim), image_size=SETTINGS.image_size,
                          timesteps=SETTINGS.time_steps).to(device)
    x_0 = torch.rand(2 * SETTINGS.batch_size, 3, SETTINGS.image_size, SETTINGS.image_size,
                     device=device) * 2 - 1
    return diffusion, x_0


def step_gflop():
    """GFLOP of one training step of the handout's model: forward and backward of a batch of
    64 (two accumulated batches of 32), by torch's FLOP counter."""
    diffusion, x_0 = handout_model_and_batch(torch.device("cpu"))
    return gflop(lambda: diffusion(x_0, torch.randn_like(x_0)).backward())


def plain_fp32_step_seconds(device, steps=5):
    """Median seconds of a plain float32 step (loss, backward, Adam), no Trainer around it."""
    diffusion, x_0 = handout_model_and_batch(device)
    if device.type == "cpu":
        device_module.keep_freed_memory_for_reuse()  # as the Trainer does on a CPU
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        diffusion(x_0, torch.randn_like(x_0)).backward()
        optimizer.step()

    step()
    times = sorted(timed(step, device)[0] for _ in range(steps))
    return times[len(times) // 2]


def machine_figures(device, figures):
    """The machine, and the rates its training figures are measured against."""
    figures["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    figures["cpu_native_bf16"] = device_module.cpu_has_native_bf16()
    figures["matmul_gflops[fp32]"] = round(matmul_gflops(torch.float32), 1)
    if device_module.autocast_dtype(device) == torch.bfloat16:
        figures["matmul_gflops[bf16]"] = round(matmul_gflops(torch.bfloat16), 1)
    figures["train_step_gflop"] = round(step_gflop(), 1)


def share_of_limit(figures, steps_per_s, precision):
    """The step's arithmetic rate as a share of the matmul rate of its precision."""
    limit = figures.get(f"matmul_gflops[{precision}]", figures["matmul_gflops[fp32]"])
    return f"{figures['train_step_gflop'] * steps_per_s / limit:.0%}"


def time_precision_options(image_set, results, device, args, figures):
    """Steps/s of each option set, from the difference of a ``WARMUP_STEPS`` run and one of
    ``timed_steps`` more (setup, the warm-up with cuDNN's choices and the CUDA graph's capture,
    and the final grid cancel out), with the mean loss of the timed steps. On a GPU a first
    untimed run pays the process's one-time costs (cuDNN's and cuBLAS's first use of each
    kernel), which would otherwise fall on the short run alone."""
    for name, options in precision_options(device).items():
        if device.type == "cuda":
            trained(image_set, results / "speed", device, WARMUP_STEPS, **options)
        short, _ = trained(image_set, results / "speed", device, WARMUP_STEPS, **options)
        long, trainer = trained(image_set, results / "speed", device,
                                WARMUP_STEPS + args.timed_steps, **options)
        steps_per_s = args.timed_steps / (long - short)
        figures[f"train_steps_per_s[{name}]"] = round(steps_per_s, 2)
        precision = options.get("precision") or ("bf16" if "bf16" in name else "fp32")
        figures[f"train_share_of_{precision}_matmul_rate[{name}]"] = share_of_limit(
            figures, steps_per_s, precision)
        losses = [row["loss"] for row in trainer.history[WARMUP_STEPS:]]
        figures[f"train_loss[{name}]"] = round(sum(losses) / len(losses), 4)
        if device.type == "cuda":
            graphed = getattr(trainer.gradient_pass, "graph", None) is not None
            figures[f"train_cuda_graph_captured[{name}]"] = graphed


def precision_trains_the_same(image_set, results, device, figures, steps=300, last=100):
    """The default mixed precision against float32 over the same seeded ``steps``: the mean
    loss of the last ``last`` steps of each, and their relative difference."""
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(device_module.autocast_dtype(device))
    if mixed is None:
        figures["precision_check"] = "this device trains in fp32 by default"
        return
    means = {}
    for precision in ("fp32", mixed):
        _, trainer = trained(image_set, results / "precision", device, steps, precision=precision)
        losses = [row["loss"] for row in trainer.history[-last:]]
        means[precision] = sum(losses) / len(losses)
        figures[f"mean_loss_of_steps_{steps - last + 1}_to_{steps}[{precision}]"] = round(
            means[precision], 4)
    figures[f"mean_loss_relative_difference[{mixed} vs fp32]"] = round(
        abs(means[mixed] - means["fp32"]) / means["fp32"], 4)


def trainer_seconds(steps, data_path, results, cache):
    """Wall time of ``steps`` steps of this package's Trainer, set up as the notebook does."""
    _, _, trainer = utils.setup_diffusion(steps, steps, False, results, data_path,
                                          dataloader_workers=os.cpu_count(), cache_folder=cache)
    seconds, _ = timed(trainer.train, trainer.device)
    return seconds


def lucidrains_diffusion():
    """lucidrains' GaussianDiffusion and Unet with the handout's settings (its cosine schedule,
    noise prediction); None when denoising-diffusion-pytorch is not installed."""
    try:
        import denoising_diffusion_pytorch as lucidrains
    except ImportError:
        return None
    torch.manual_seed(0)
    unet = lucidrains.Unet(SETTINGS.unet_dim, dim_mults=(1, 2, 4, 8))
    return lucidrains.GaussianDiffusion(unet, image_size=SETTINGS.image_size,
                                        timesteps=SETTINGS.time_steps, objective="pred_noise",
                                        beta_schedule="cosine")


def lucidrains_seconds(steps, data_path, results, precision):
    """Wall time of ``steps`` steps of lucidrains' Trainer (its defaults: EMA, images decoded by
    DataLoader workers at every step) with the handout's batch, accumulation and rate, in
    float32 or in its own bf16 mixed precision (``amp``)."""
    from denoising_diffusion_pytorch import Trainer as LucidrainsTrainer
    trainer = LucidrainsTrainer(lucidrains_diffusion(), str(data_path / "cat"),
                                train_batch_size=SETTINGS.batch_size, gradient_accumulate_every=2,
                                train_lr=1e-3, train_num_steps=steps, save_and_sample_every=10 ** 9,
                                results_folder=str(results), calculate_fid=False,
                                amp=precision == "bf16", mixed_precision_type="bf16")
    seconds, _ = timed(trainer.train, trainer.device)
    return seconds


def lucidrains_sampling_seconds(count, precision):
    """Wall time of lucidrains' ``sample`` of ``count`` images (bf16: under autocast)."""
    device = device_module.default_device()
    diffusion = lucidrains_diffusion().to(device).eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        seconds, _ = timed(lambda: diffusion.sample(batch_size=count), device)
    return seconds


def our_sampling_seconds(count, precision):
    """Wall time of ``count`` samples by this package's Trainer (its ``sample_images``)."""
    device = device_module.default_device()
    images = torch.zeros(2, 3, 36, 36, dtype=torch.uint8)
    image_set = images_module.ImageSet(train=images, reference=images[:, :, :32, :32], key="none")
    with tempfile.TemporaryDirectory() as results:
        trainer = build_trainer(image_set, results, device, precision=precision)
        seconds, _ = timed(lambda: trainer.sample_images(count), device)
    return seconds


def in_fresh_process(function, *args):
    """``function(*args)`` in a new Python process: nothing one library sets for its process
    (threads, the allocator's settings) carries over to the next measured."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()  # not a daemon: lucidrains' workers may start


def timed_in_fresh_process(function, *args):
    """run(steps): ``function(steps, *args)``, the wall seconds of ``steps`` training steps, each
    call in a fresh process."""
    return lambda steps: in_fresh_process(function, steps, *args)


def seconds_per_step(runs, short, long, repeats):
    """Seconds per step of each of ``runs`` (name: run(steps) -> wall seconds):
    (fastest run(long) - fastest run(short)) / (long - short), so that setup and the final grid
    cancel out. The runs take turns, ``repeats`` rounds of all of them, so that a slow spell of a
    shared machine falls on each alike, and the fastest of each is the least disturbed."""
    fastest = {(name, steps): math.inf for name in runs for steps in (short, long)}
    for _ in range(repeats):
        for name, run in runs.items():
            for steps in (short, long):
                fastest[name, steps] = min(fastest[name, steps], run(steps))
    return {name: (fastest[name, long] - fastest[name, short]) / (long - short) for name in runs}


def lucidrains_precisions(device):
    """lucidrains' options worth timing here: float32, and its bf16 where the CPU or GPU runs
    bf16 natively (elsewhere it is emulated: 15.5 s/step against 2.5 on an AVX2-only CPU)."""
    native = device_module.autocast_dtype(device) == torch.bfloat16
    return ["fp32", "bf16"] if native else ["fp32"]


def compare_with_lucidrains(data_path, results, device, figures, short=5, long=25, repeats=3,
                            samples=128):
    """Seconds per training step of this package's Trainer and of each of lucidrains' options,
    taking turns (``seconds_per_step``), and images/s of each sampler, every figure from its own
    fresh process, in one run."""
    if lucidrains_diffusion() is None:
        figures["lucidrains"] = "not installed: pip install -r benchmarks/requirements.txt"
        return
    runs = {"ours": timed_in_fresh_process(trainer_seconds, data_path, results / "ours",
                                           results / "cache")}
    for precision in lucidrains_precisions(device):
        runs[precision] = timed_in_fresh_process(lucidrains_seconds, data_path,
                                                 results / "lucidrains", precision)
    per_step = seconds_per_step(runs, short, long, repeats)
    ours = per_step.pop("ours")
    figures["train_s_per_step[this package's Trainer, default precision]"] = round(ours, 3)
    for precision, seconds in per_step.items():
        figures[f"train_s_per_step[lucidrains Trainer, {precision}]"] = round(seconds, 3)
    best = min(per_step, key=per_step.get)
    figures["train_speedup_over_lucidrains_best"] = f"{per_step[best] / ours:.2f}x (its {best})"
    for precision in lucidrains_precisions(device):
        mine = samples / in_fresh_process(our_sampling_seconds, samples, precision)
        others = samples / in_fresh_process(lucidrains_sampling_seconds, samples, precision)
        figures[f"sampling_img_per_s[{samples} images, {precision}: ours / lucidrains]"] = (
            f"{mine:.2f} / {others:.2f} = {mine / others:.2f}x")


def sampling_images_per_s(trainer, device):
    """Images per second of ``SAMPLES`` samples of Algorithm 2, as the Trainer draws its grids."""
    seconds, _ = timed(lambda: trainer.sample_images(SAMPLES), device)
    return SAMPLES / seconds


def fid_limits(figures):
    """The rates FID's sampling (bf16 where native, else fp32) and scoring (fp32) are held to."""
    sampling = "bf16" if "matmul_gflops[bf16]" in figures else "fp32"
    return ((sampling, figures[f"matmul_gflops[{sampling}]"]),
            ("fp32", figures["matmul_gflops[fp32]"]))


def compare_fid_evaluations(image_set, results, device, figures):
    """One FID evaluation of this package's Trainer and one of lucidrains' FIDEvaluation, from
    the same seeded, untrained network size, on the same machine (``fid_section``)."""
    extractor, network = fid_section.fid_network(device)
    figures["fid_network"] = network
    trainer = build_trainer(image_set, results / "ours", device, fid=True, data_class="cat",
                            fid_feature_extractor=extractor,
                            cache_folder=results.parent / "cache")  # part2's, which reuses them
    ours = fid_section.time_our_evaluation(trainer, timed, figures, fid_limits(figures))
    diffusion = lucidrains_diffusion()
    if diffusion is None:
        figures["lucidrains"] = "not installed: pip install -r benchmarks/requirements.txt"
        return
    theirs = fid_section.time_lucidrains_evaluation(diffusion, image_set.reference,
                                                    results / "lucidrains", device, timed,
                                                    figures)
    figures["fid_evaluation_speedup_over_lucidrains"] = f"{theirs / ours:.2f}x"


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
    device = device_module.default_device()
    figures["device"] = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    figures["cpus"] = os.cpu_count()
    figures["torch"] = torch.__version__
    machine_figures(device, figures)
    if args.cats:
        figures["data"] = describe(args.cats)
        data_path = cats_train_folder(args.cats, workdir / "data")
    else:
        figures["images"] = args.images
        data_path, mean_file_size = write_dataset(workdir / "data", args.images)
        figures["mean_png_kb"] = round(mean_file_size / 1024)
    results = workdir / "results"

    decode_s, image_set = timed(lambda: images_module.load_image_set(
        data_path, "cat", SETTINGS.image_size, results / "cache", os.cpu_count()), device)
    figures["decode_once_s"] = round(decode_s, 1)
    sections = set(args.sections)
    if "pipeline" in sections:
        figures["pipeline_decode_every_step_img_per_s"] = round(
            starter_pipeline_images_per_s(data_path, 40, device))
        figures["pipeline_cached_tensor_img_per_s"] = round(
            cached_pipeline_images_per_s(image_set, 200, device))
    if "training" in sections:
        seconds = plain_fp32_step_seconds(device)
        figures["plain_fp32_step_s"] = round(seconds, 3)
        figures["plain_fp32_step_share_of_fp32_matmul_rate"] = share_of_limit(
            figures, 1 / seconds, "fp32")
        time_precision_options(image_set, results, device, args, figures)
    if "lucidrains" in sections:
        compare_with_lucidrains(data_path, results, device, figures)
    if "sampling" in sections:
        for name, options in precision_options(device).items():
            trainer = build_trainer(image_set, results / "speed", device, **options)
            figures[f"sampling_img_per_s[{name}]"] = round(sampling_images_per_s(trainer, device), 1)
    if "precision" in sections:
        precision_trains_the_same(image_set, results, device, figures)
    if "fid" in sections:
        compare_fid_evaluations(image_set, results / "fid", device, figures)
    time_parts(args, data_path, results, device, sections, figures)


def time_parts(args, data_path, results, device, sections, figures):
    """End-to-end wall time of Part 1 (no FID), Part 2 (FID at every milestone) and Part 5."""
    every = args.every or max(1, args.part_steps // 10)
    if {"part1", "part2"} & sections:
        figures["part_steps"] = args.part_steps
        figures["part_every"] = every
    if "part1" in sections:
        figures["part1_s"] = round(part_seconds(data_path, results / "part1", args.part_steps,
                                                every, False, None), 1)
    if "part2" in sections:
        figures["part2_s"] = round(part_seconds(data_path, results / "part2", args.part_steps,
                                                every, True, fid_section.fid_network(device)[0]), 1)
    if "part5" in sections:
        figures["part5_s"] = round(part_seconds(data_path, results / "part5", 10000, 1000,
                                                False, None), 1)


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
