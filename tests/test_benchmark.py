"""The benchmark script keeps working: its cheap sections run on a tiny folder and report figures.

Nothing here judges speed (tests never time things); the figures only have to be there and
make sense.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"


def test_benchmark_reports_pipeline_and_training_figures_as_json(tmp_path):
    report = tmp_path / "figures.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "64", "--timed-steps", "1",
         "--sections", "pipeline", "training", "--workdir", str(tmp_path), "--json", str(report)],
        check=True, capture_output=True, text=True, timeout=600)
    figures = json.loads(report.read_text())
    assert figures["device"] == "cpu" and figures["images"] == 64
    assert figures["pipeline_cached_tensor_img_per_s"] > 0
    assert figures["pipeline_decode_every_step_img_per_s"] > 0
    training = {name: value for name, value in figures.items() if name.startswith("train_steps_per_s")}
    assert len(training) == 3 and all(isinstance(value, float) and value > 0 for value in training.values())
    losses = [value for name, value in figures.items() if name.startswith("train_loss")]
    assert len(losses) == 3 and all(0 < loss < 2 for loss in losses)  # L1 of unit-normal noise
    assert "sampling_img_per_s" not in figures  # only the sections asked for


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_speed_options_add_up_to_the_trainer_defaults_then_channels_last():
    options, default, compiled = load_benchmark().speed_options(torch.device("cuda"))
    names = list(options)
    assert names[0].startswith("baseline") and default == "+ CUDA graph"
    assert options[names[0]] == dict(amp=False, fused_accumulation=False, cuda_graph=False)
    assert options[default] == dict(amp=True, fused_accumulation=True, cuda_graph=True)
    assert options["+ channels_last"] == dict(options[default], channels_last=True)
    assert compiled["default + torch.compile"]["compile_model"] is True
