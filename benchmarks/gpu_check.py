"""What to run first on a GPU (Colab, Kaggle): is the CUDA graph right, and which options pay?

    python benchmarks/gpu_check.py --out gpu_check.json    # under two minutes; the figures as JSON

1. Correctness: three Trainers of the handout's model from the same weights, one replaying each
   step's gradient computation as a CUDA graph (the default on a GPU), two running it eagerly.
   Before each step the GPU's generator is seeded alike, so all draw the same batch, crops,
   flips, time steps and noise; over ``CHECK_STEPS`` Adam steps the graph's loss and gradients
   (as one vector) must agree with the eager ones to ``TOLERANCE`` (relative). The two eager
   Trainers show the floor: what cuDNN's own run-to-run rounding gives. The worst single
   tensor is reported beside them.
2. Mixed precision only rounds: the handout's U-Net, its normalised variances made small
   (``precision_fidelity.with_small_variances``), under each mixed precision against float32
   on one batch at t = 10; every figure within ``precision_fidelity.BOUNDS``.
3. Speed: steps/s of every precision the GPU runs (fp32, fp16 with its GradScaler, bf16 where
   the GPU computes it natively), each with the graph and without, side by side, and which
   option of each pair is worth keeping.
The figures are printed and, with ``--out``, written to that file as JSON (the datasets' log
lines go to stdout too, so a redirected stdout is no JSON file). Exits with status 1 when a check
fails, 2 when there is no CUDA GPU. Nothing here runs in the tests.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import build_trainer, device_module, images_module  # noqa: E402
from precision_fidelity import network_fidelity, with_small_variances, beyond_bounds  # noqa: E402
from unet import Unet  # noqa: E402

CHECK_STEPS = 5
TIMED_STEPS = 50
# relative: in float32 cuDNN itself differs run to run (two eager Trainers on an H200: loss
# 6.0e-6, gradients 6.8e-3; benchmarks/gpu_check_h200.json); bf16 and fp16 reran exactly there
TOLERANCE = 2e-2
PRECISION_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_cats(count=512, side=35):
    """Random uint8 images standing in for the decoded cats (speed and equality need no photos)."""
    images = torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return images_module.ImageSet(train=images, reference=images[:, :, :32, :32], key="random")


def one_step(trainer, seed):
    """One training step with the GPU's generator seeded: (loss, gradients before Adam's update)."""
    torch.cuda.manual_seed(seed)
    loss = trainer.gradient_pass().clone()
    gradients = [parameter.grad.detach().clone() for parameter in trainer.model.parameters()]
    trainer.scaler.step(trainer.opt)
    trainer.scaler.update()
    return loss, gradients


def relative_difference(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def step_differences(first, second):
    """Relative differences of two steps' (loss, gradients): the loss, all the gradients as one
    vector, and the worst single tensor with its name (tiny tensors, such as a bias that a
    normalisation cancels, magnify rounding there)."""
    (loss_a, grads_a, names), (loss_b, grads_b, _) = first, second
    per_tensor = {name: relative_difference(a, b) for name, a, b in zip(names, grads_a, grads_b)}
    worst = max(per_tensor, key=per_tensor.get)
    flat_a, flat_b = (torch.cat([g.flatten().float() for g in grads]) for grads in (grads_a, grads_b))
    return {"loss": relative_difference(loss_a, loss_b),
            "gradients": relative_difference(flat_a, flat_b),
            "worst tensor": (worst, per_tensor[worst])}


def compared_steps(image_set, results, device, precision, graphs):
    """``CHECK_STEPS`` seeded steps of one Trainer per entry of ``graphs`` (with or without the
    CUDA graph), all from the same weights: the largest differences of each against the last."""
    trainers = [build_trainer(image_set, results, device, precision=precision, cuda_graph=graph)
                for graph in graphs]
    for trainer in trainers:  # the graph's warm-up and capture, outside the compared steps
        trainer.gradient_pass()
    names = [name for name, _ in trainers[0].model.named_parameters()]
    largest = [{"loss": 0.0, "gradients": 0.0, "worst tensor": ("", 0.0)} for _ in graphs[:-1]]
    for seed in range(CHECK_STEPS):
        steps = [(*one_step(trainer, seed), names) for trainer in trainers]
        for so_far, step in zip(largest, steps[:-1]):
            new = step_differences(step, steps[-1])
            so_far["loss"] = max(so_far["loss"], new["loss"])
            so_far["gradients"] = max(so_far["gradients"], new["gradients"])
            so_far["worst tensor"] = max(so_far["worst tensor"], new["worst tensor"],
                                         key=lambda pair: pair[1])
    captured = getattr(trainers[0].gradient_pass, "graph", None) is not None
    return largest, captured


def steps_per_second(image_set, results, device, precision, graph):
    trainer = build_trainer(image_set, results, device, precision=precision, cuda_graph=graph)
    for seed in range(5):  # warm-up: cuDNN's choices and the capture
        one_step(trainer, seed)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for seed in range(TIMED_STEPS):
        one_step(trainer, seed)
    torch.cuda.synchronize()
    return TIMED_STEPS / (time.perf_counter() - start)


def mixed_precision_fidelity(device, dtype):
    """``network_fidelity`` of the handout's U-Net with small normalised variances on the GPU."""
    torch.manual_seed(0)
    network = with_small_variances(Unet(16)).to(device)
    x = torch.randn(32, 3, 32, 32, device=device)
    time = torch.full((32,), 10, device=device)
    return network_fidelity(network, x, time, dtype)


def precisions_of(device):
    """The precisions this GPU runs: bf16 only from compute capability 8.0 (Ampere) on."""
    major, _ = torch.cuda.get_device_capability(device)
    return ["fp32", "fp16"] + (["bf16"] if major >= 8 else [])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA GPU here: this check is for one (on Colab: Runtime -> Change runtime "
              "type -> T4 GPU).", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    image_set = random_cats()
    results = Path("gpu_check_results")
    default = {torch.bfloat16: "bf16", torch.float16: "fp16"}[device_module.autocast_dtype(device)]
    figures = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
               "default precision": default}
    failed = False
    for precision in precisions_of(device):
        (graph, eager), captured = compared_steps(image_set, results, device, precision,
                                                  graphs=(True, False, False))
        worst = max(graph["loss"], graph["gradients"])
        ok = captured and worst <= TOLERANCE
        failed |= not ok
        for label, figures_of in (("graph vs eager", graph), ("eager vs eager", eager)):
            figures[f"{label}, relative difference [{precision}]"] = {
                "loss": f"{figures_of['loss']:.1e}", "gradients": f"{figures_of['gradients']:.1e}",
                "worst tensor": f"{figures_of['worst tensor'][0]} "
                                f"{figures_of['worst tensor'][1]:.1e}"}
        figures[f"graph vs eager [{precision}]"] = (
            "same" if ok else "capture failed" if not captured else f"DIFFERENT (> {TOLERANCE})")
        with_graph, without = (steps_per_second(image_set, results, device, precision, graph)
                               for graph in (True, False))
        figures[f"steps/s [{precision}, graph / eager]"] = f"{with_graph:.1f} / {without:.1f}"
        figures[f"keep the graph [{precision}]"] = ok and with_graph > without
        if PRECISION_DTYPES[precision] is not None:
            errors = mixed_precision_fidelity(device, PRECISION_DTYPES[precision])
            beyond = beyond_bounds(errors)
            failed |= bool(beyond)
            figures[f"autocast vs float32, relative errors [{precision}]"] = {
                name: f"{value:.1e}" for name, value in errors.items()}
            figures[f"autocast only rounds [{precision}]"] = "yes" if not beyond else f"NO: {beyond}"
    print(json.dumps(figures, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
