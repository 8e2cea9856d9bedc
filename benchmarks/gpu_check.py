"""What to run first on a GPU (Colab, Kaggle): is the CUDA graph right, and which options pay?

    python benchmarks/gpu_check.py            # made to take under two minutes; prints JSON

1. Correctness: two Trainers of the handout's model from the same weights, one replaying each
   step's gradient computation as a CUDA graph (the default on a GPU), one running it eagerly.
   Before each step the GPU's generator is seeded alike, so both draw the same batch, crops,
   flips, time steps and noise; their losses and gradients must agree over ``CHECK_STEPS``
   Adam steps to ``TOLERANCE`` (relative; float32 reruns the same kernels, so it is near 0,
   mixed precision a little looser).
2. Mixed precision only rounds: the handout's U-Net, its normalised variances made small
   (``precision_fidelity.with_small_variances``), under each mixed precision against float32
   on one batch at t = 10; every figure within ``precision_fidelity.BOUNDS``.
3. Speed: steps/s of every precision the GPU runs (fp32, fp16 with its GradScaler, bf16 where
   the GPU computes it natively), each with the graph and without, side by side, and which
   option of each pair is worth keeping.
Exits with status 1 when a check fails, 2 when there is no CUDA GPU. Nothing here runs in the tests.
"""
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
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}
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


def graph_matches_eager(image_set, results, device, precision):
    """The largest relative difference of loss and gradients between the graphed and the eager
    step over ``CHECK_STEPS`` steps, and whether the graph was captured."""
    trainers = [build_trainer(image_set, results, device, precision=precision, cuda_graph=graph)
                for graph in (True, False)]
    for trainer in trainers:  # the graph's warm-up and capture, outside the compared steps
        trainer.gradient_pass()
    worst = 0.0
    for seed in range(CHECK_STEPS):
        (graph_loss, graph_grads), (eager_loss, eager_grads) = (one_step(t, seed) for t in trainers)
        worst = max([worst, relative_difference(graph_loss, eager_loss)]
                    + [relative_difference(g, e) for g, e in zip(graph_grads, eager_grads)])
    captured = getattr(trainers[0].gradient_pass, "graph", None) is not None
    return worst, captured


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


def main():
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
        worst, captured = graph_matches_eager(image_set, results, device, precision)
        ok = captured and worst <= TOLERANCE[precision]
        failed |= not ok
        figures[f"graph vs eager, largest relative difference [{precision}]"] = f"{worst:.2e}"
        figures[f"graph vs eager [{precision}]"] = (
            "same" if ok else "capture failed" if not captured else f"DIFFERENT (> {TOLERANCE[precision]})")
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
