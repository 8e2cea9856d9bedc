"""Mixed precision only rounds: each module of a trained U-Net under autocast against float32.

    pip install -r requirements.txt
    python benchmarks/precision_fidelity.py --cats ../shared/data/afhq_cats_train_36px.zip

Trains the handout's model (dim 16, dim_mults 1 2 4 8, T = 50, batch 32 x 2, lr 1e-3) for
``--steps`` steps (200) in ``--train-precision`` (bf16) on the cats, then takes one fixed batch
of them to x_t at t = 10 (q_sample, eq. 2, seeded) and runs the network on it in float32,
recording every module's input and output. Each module is then run again on that same input
under bf16 and under fp16 autocast, and its output compared with its float32 output (relative
L2 distance, the worst of each kind of module); so are the whole U-Net's predicted noise, the
mean of each of its channels, and one reverse step (``p_sample``, Algorithm 2, the clamp of
x_0 included) from the same x_t with the same noise. Mixed precision is faithful when every
figure is within ``BOUNDS``: only rounding, no other function. Prints JSON; ``--json`` saves it.
``gpu_check.py`` and ``tests/test_mixed_precision.py`` take the same measurement.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "A3_PartB"))
os.environ.setdefault("WANDB_MODE", "disabled")

import images as images_module  # noqa: E402
import unet  # noqa: E402
import utils  # noqa: E402
from readme_figures import machine  # noqa: E402
from real_cats import cats_train_folder, describe  # noqa: E402

# The kinds of module compared one by one: every place whose arithmetic could follow a dtype.
MODULE_KINDS = ("LinearAttention", "Attention", "LayerNorm", "WeightStandardizedConv2d",
                "GroupNorm", "ResnetBlock", "time_mlp")
BOUNDS = {"LinearAttention": 1e-2, "unet": 2e-2, "channel_mean_shift": 1e-2}
MIXED_PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}
TIME_STEP = 10


def relative_error(actual, expected):
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def kind_of(name, module):
    """The entry of ``MODULE_KINDS`` that a module of the U-Net is, or None."""
    kind = "time_mlp" if name == "time_mlp" else type(module).__name__
    return kind if kind in MODULE_KINDS else None


def float32_calls(network, x, time):
    """Run ``network(x, time)`` in float32; returns its output and ``(kind, module, inputs,
    output)`` of each call of a module of ``MODULE_KINDS`` on the way."""
    calls = []
    hooks = [module.register_forward_hook(
        lambda module, inputs, output, kind=kind: calls.append((kind, module, inputs, output)))
        for name, module in network.named_modules() if (kind := kind_of(name, module))]
    try:
        output = network(x, time)
    finally:
        for hook in hooks:
            hook.remove()
    return output, calls


def rounded(inputs, dtype):
    """The floating-point tensors of ``inputs`` (a tuple, nested for a (scale, shift) pair) in
    ``dtype``; the rest as they are."""
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(rounded(item, dtype) for item in inputs)
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        return inputs.to(dtype)
    return inputs


def autocast(device, dtype):
    """Autocast to ``dtype`` on ``device``; off (float32) for None."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def network_fidelity(network, x, time, dtype):
    """How far ``network`` under autocast to ``dtype`` is from float32 on ``(x, time)``: the
    worst relative error of each kind of module (each run on its float32 input rounded to
    ``dtype``, as autocast hands a module its input, against its float32 output), of the
    U-Net's output, and the largest shift of a channel's mean of that output
    (``channel_mean_shift``)."""
    network = network.eval()
    expected, calls = float32_calls(network, x, time)
    errors = {}
    with autocast(x.device, dtype):
        for kind, module, inputs, output in calls:
            error = relative_error(module(*rounded(inputs, dtype)), output)
            errors[kind] = max(errors.get(kind, 0.0), error)
        predicted = network(x, time).float()
    errors["unet"] = relative_error(predicted, expected)
    errors["channel_mean_shift"] = (predicted.mean(dim=(0, 2, 3))
                                    - expected.mean(dim=(0, 2, 3))).abs().max().item()
    return errors


@torch.no_grad()
def reverse_step_fidelity(diffusion, x_t, t_index, dtype):
    """The relative error of one ``p_sample`` step under autocast to ``dtype`` against float32,
    both drawing the same noise."""
    t = torch.full((len(x_t),), t_index, device=x_t.device, dtype=torch.long)
    steps = []
    for precision in (None, dtype):
        torch.manual_seed(0)  # p_sample's noise, drawn by noise_like on the default generators
        with autocast(x_t.device, precision):
            steps.append(diffusion.p_sample(x_t, t, t_index).float())
    return relative_error(steps[1], steps[0])


@torch.no_grad()
def with_small_variances(network, factor=0.1):
    """``network`` with the weights that its normalisations divide out (each weight-standardised
    convolution's, and each LinearAttention's projection before its LayerNorm) times ``factor``:
    float32 computes nearly the same, but the normalised variances shrink to where the epsilon
    of a normalisation decides the output, as in a trained model. Returns the network."""
    for module in network.modules():
        if isinstance(module, unet.WeightStandardizedConv2d):
            module.weight.mul_(factor)
        elif isinstance(module, unet.LinearAttention):
            projection = module.to_out[0]
            projection.weight.mul_(factor)
            projection.bias.mul_(factor)
    return network


def beyond_bounds(errors):
    """The figures of ``network_fidelity`` that exceed ``BOUNDS``: {name: (figure, bound)}."""
    return {name: (errors[name], bound) for name, bound in BOUNDS.items() if errors[name] > bound}


def noised_batch(trainer, t_index, count=32):
    """A fixed batch of the training images taken to x_t at ``t_index`` (q_sample, eq. 2)."""
    x_0 = images_module.to_model_range(trainer.batches.first_batch(count))
    generator = torch.Generator(device=x_0.device).manual_seed(0)
    noise = torch.randn(x_0.shape, generator=generator, device=x_0.device)
    t = torch.full((count,), t_index, device=x_0.device, dtype=torch.long)
    return trainer.model.q_sample(x_0, t, noise), t


def measure(trainer):
    """Every figure of this script for the trained model of ``trainer``, per mixed precision."""
    diffusion = trainer.model.eval()
    x_t, t = noised_batch(trainer, TIME_STEP)
    figures = {}
    for name, dtype in MIXED_PRECISIONS.items():
        errors = network_fidelity(diffusion.model, x_t, t, dtype)
        errors["p_sample"] = reverse_step_fidelity(diffusion, x_t, TIME_STEP, dtype)
        figures[name] = {key: float(f"{value:.2e}") for key, value in errors.items()}
        figures[f"{name} beyond the bounds"] = beyond_bounds(errors)
    return figures


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cats", required=True,
                        help="AFHQ-layout zip (train/cat/...) or .npz of 'images' (N, 32, 32, 3)")
    parser.add_argument("--steps", type=int, default=200, help="training steps before measuring")
    parser.add_argument("--train-precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--workdir", default=None, help="data and the run (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args()


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        _, _, trainer = utils.setup_diffusion(
            args.steps, args.steps, False, workdir / "run", cats_train_folder(args.cats, workdir),
            dataloader_workers=os.cpu_count(), precision=args.train_precision,
            cache_folder=workdir / "cache")
        trainer.train()
        figures = {"machine": machine(),
                   "device": str(trainer.device), "torch": torch.__version__,
                   "data": describe(args.cats),
                   "trained": f"{args.steps} steps in {args.train_precision}",
                   "measured": f"one batch of 32 at t = {TIME_STEP}", "bounds": BOUNDS,
                   **measure(trainer)}
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if any(figures[f"{name} beyond the bounds"] for name in MIXED_PRECISIONS) else 0


if __name__ == "__main__":
    sys.exit(main())
