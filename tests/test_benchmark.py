"""The benchmark script keeps working: its cheap sections run on a tiny folder and report figures.

Nothing here judges speed (tests never time things); the figures only have to be there and
make sense.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"


@pytest.mark.slow
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
    assert set(training) == {"train_steps_per_s[default (bf16)]", "train_steps_per_s[fp32]"} or \
        set(training) == {"train_steps_per_s[default (fp32)]", "train_steps_per_s[fp32]"}
    # each from the difference of two short runs: too few steps here to be a speed, but each
    # share of the limit is the step's GFLOP times its rate over the matmul rate
    for name, steps_per_s in training.items():
        option = name[len("train_steps_per_s"):]
        precision = "bf16" if "bf16" in option else "fp32"
        limit = figures.get(f"matmul_gflops[{precision}]", figures["matmul_gflops[fp32]"])
        share = figures[f"train_share_of_{precision}_matmul_rate{option}"]
        expected = figures["train_step_gflop"] * steps_per_s / limit
        assert abs(float(share.rstrip("%")) - 100 * expected) <= 0.5 + abs(expected)  # rounding
    assert figures["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert ("matmul_gflops[bf16]" in figures) == ("train_steps_per_s[default (bf16)]" in figures)
    losses = [value for name, value in figures.items() if name.startswith("train_loss")]
    assert len(losses) == 2 and all(0 < loss < 2 for loss in losses)  # L1 of unit-normal noise
    assert not any(name.startswith("sampling") for name in figures)  # only the sections asked for


def test_a_training_step_of_the_handouts_model_is_counted_at_its_flops():
    # the U-Net's convolutions alone: 2 * pixels * k^2 * c_in * c_out per image, times 3 for
    # forward and backward; the attention and the rest add a little
    benchmark = load_benchmark()
    gflop = benchmark.step_gflop()
    assert 45 < gflop < 70


@pytest.mark.parametrize("side", [8, 16])
def test_the_linear_attentions_flops_are_counted_whichever_kernel_softmaxes(monkeypatch, side):
    load_benchmark()  # puts benchmarks/ and A3_PartB/ on the path
    import flops
    import unet
    torch.manual_seed(0)
    attention = unet.LinearAttention(16)
    x = torch.randn(2, 16, side, side).contiguous(memory_format=torch.channels_last)
    counts = {}
    for fused in (True, False):
        monkeypatch.setattr(unet, "fused_softmax_pays", lambda x: fused)
        counts[fused] = flops.gflop(lambda: attention(x.requires_grad_()).sum().backward())
    # four (pixels x 16 x 128) products of each of the 2 images: q and k from x, softmax(k)
    # against x, q against the contexts; the backward twice the forward
    forward_gflop = 4 * 2 * 2 * (side * side) * 16 * 128 / 1e9
    assert counts[False] >= 3 * forward_gflop
    assert counts[True] == counts[False]


def test_each_peer_figure_comes_from_a_fresh_process():
    benchmark = load_benchmark()
    assert benchmark.in_fresh_process(os.getpid) != os.getpid()


@pytest.mark.parametrize("default, timed", [(torch.bfloat16, ["fp32", "bf16"]), (None, ["fp32"])])
def test_lucidrains_bf16_is_timed_only_where_bf16_is_native(monkeypatch, default, timed):
    benchmark = load_benchmark()
    monkeypatch.setattr(benchmark.device_module, "autocast_dtype", lambda device: default)
    assert benchmark.lucidrains_precisions(torch.device("cpu")) == timed


def test_per_step_seconds_take_turns_and_keep_each_runs_least_disturbed_time():
    calls = []
    slow_spells = {1, 6}  # the calls of ours (25 steps, round 1) and theirs (5 steps, round 2)

    def run(name, per_step, setup):
        def timed(steps):
            calls.append((name, steps))
            return setup + per_step * steps + (100 if len(calls) - 1 in slow_spells else 0)
        return timed

    runs = {"ours": run("ours", 0.5, 7), "theirs": run("theirs", 1.5, 3)}
    per_step = load_benchmark().seconds_per_step(runs, short=5, long=25, repeats=2)
    assert per_step == pytest.approx({"ours": 0.5, "theirs": 1.5})
    assert calls == [("ours", 5), ("ours", 25), ("theirs", 5), ("theirs", 25)] * 2


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_options_are_the_trainer_defaults_then_each_choice_it_leaves_open():
    options = load_benchmark().precision_options(torch.device("cuda"))
    names = list(options)
    assert names[0].startswith("default") and options[names[0]] == {}
    assert dict(precision="bf16", cuda_graph=False) in options.values()
    assert {option.get("precision") for option in options.values()} >= {"fp16", "fp32"}


def test_the_comparison_with_lucidrains_says_how_to_install_it_when_it_is_missing(tmp_path,
                                                                                 monkeypatch):
    benchmark = load_benchmark()
    monkeypatch.setattr(benchmark, "lucidrains_diffusion", lambda: None)
    figures = {}
    benchmark.compare_with_lucidrains(tmp_path, tmp_path, torch.device("cpu"), figures)
    assert figures == {"lucidrains": "not installed: pip install -r benchmarks/requirements.txt"}


def test_the_gpu_check_says_it_needs_a_gpu_and_exits_2_without_one():
    script = SCRIPT.parent / "gpu_check.py"
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=300, env=environment)
    assert result.returncode == 2 and "No CUDA GPU here" in result.stderr


@pytest.mark.parametrize("figures", sorted(path.name for path in SCRIPT.parent.glob("*.json")))
def test_every_committed_figures_file_is_json(figures):
    """The figures are written by the scripts themselves (--out), not by redirecting stdout,
    where the datasets' log lines land too."""
    assert isinstance(json.loads((SCRIPT.parent / figures).read_text()), dict)


def test_the_fid_section_scores_the_trainers_samples_as_clean_fids_png_path_does(tmp_path):
    load_benchmark()  # puts benchmarks/ on the path, as the script does
    import fid_section
    from tiny_trainer import make_trainer
    from afhq_data import make_afhq_folder

    def pixel_probe(images):  # 9 features that see clean-fid's resize (fewer than the cats)
        return images[:, :, 150, 60:240:60].flatten(1)

    afhq = make_afhq_folder(tmp_path / "afhq", per_class=12)
    trainer = make_trainer(afhq, tmp_path / "results", fid=True, fid_feature_extractor=pixel_probe,
                           cache_folder=tmp_path / "cache")
    figures = {}
    seconds = fid_section.time_our_evaluation(trainer, load_benchmark().timed, figures,
                                              (("bf16", 100.0), ("fp32", 50.0)))
    ours, theirs = figures["fid[ours / clean-fid's PNG path, the same images]"].split(":")[0].split(" / ")
    assert float(ours) == pytest.approx(float(theirs), rel=1e-3)
    sampling, scoring = figures["fid_evaluation_s[ours, 512 samples: sampling + scoring]"].split(" = ")[0].split(" + ")
    assert float(sampling) + float(scoring) == pytest.approx(seconds, abs=0.11)
    assert figures["fid_sampling_share_of_machine_rate"].endswith("%")
