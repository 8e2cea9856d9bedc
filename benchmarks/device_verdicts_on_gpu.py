"""Does the diffusion contract's simulated GPU give the verdict a real one gives? Run it where
CUDA is (a Colab or Kaggle T4, a lent GPU):

    python benchmarks/device_verdicts_on_gpu.py --out verdicts.json

For each file of the contract's fair-and-sharp proof that bears on devices (the two correct
files, the public-style device files, the device mistakes, the correct files that only a real
GPU runs whole) and each method the trainer calls, it puts the verdict of
``test_runs_on_each_device_the_trainer_picks`` under the simulated CUDA (the meta device) beside
what the method does on the real GPU. ``pass`` and ``not run`` must meet a method that runs;
``mixing`` and ``crash``, one that raises. Exits 1 on any disagreement, 2 without a CUDA GPU.
Nothing here runs in the tests.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "A3_PartB")]
import diffusion_probes as probes  # noqa: E402
import test_diffusion_contract_is_fair_and_sharp as proof  # noqa: E402
from contract_verdicts import write_mutant  # noqa: E402

ON_DEVICES = "test_runs_on_each_device_the_trainer_picks"


def files(folder):
    """{name: path} of the files that bear on devices, the mutants written into ``folder``."""
    found = {"ours": REPO / "A3_PartB" / "diffusion.py", "skeleton_style": proof.SKELETON_STYLE,
             "device_chosen_at_import": proof.DEVICE_CHOSEN_AT_IMPORT, "cuda_only_in_init": proof.CUDA_ONLY_IN_INIT}
    for mutant in proof.MUTANTS:
        if ON_DEVICES in mutant.caught_by or not mutant.caught_by:  # device mistakes, and files no CPU can fault
            found[mutant.name] = write_mutant(proof.SKELETON_STYLE, folder / mutant.name, mutant)
    return found


def simulated(path, method):
    """The device check's verdict on ``method`` under the simulated CUDA."""
    with probes.machine_with("cpu"):
        module = probes.load_diffusion_file(path)
    answer = probes.probe_on_the_trainers_device(module, method, "cuda")
    if "beyond" in answer:  # the meta device cannot run it
        return f"not run ({answer['beyond'].split(':')[0]})"
    return "pass" if answer["step"] is None else next(key for key in ("mixing", "crash") if key in answer)


def on_the_gpu(path, method):
    """'runs', or how ``method`` raises, on the real GPU, the Diffusion moved as the trainer moves it."""
    try:
        diffusion = probes.make_diffusion(probes.load_diffusion_file(path))
        probes.move_as_the_trainer_does(diffusion, torch.device("cuda"))
        probes.call_on(diffusion, method, torch.device("cuda"))
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001 - what the GPU says is the measurement
        return f"raises {type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
    return "runs"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("No CUDA GPU here: run this where CUDA is (a Colab or Kaggle GPU).", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as work:
        rows = table(files(Path(work)))
    agreed = sum(row["agree"] for row in rows)
    print(f"the simulated CUDA agrees with {torch.cuda.get_device_name(0)} on {agreed} of {len(rows)}")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    sys.exit(0 if agreed == len(rows) else 1)


def table(found):
    """One row per file and method: both verdicts, and whether they agree."""
    rows = []
    for name, path in found.items():
        for method in probes.METHODS:
            row = {"file": name, "method": method, "simulated_cuda": simulated(path, method),
                   "real_cuda": on_the_gpu(path, method)}
            row["agree"] = (row["simulated_cuda"] == "pass" or row["simulated_cuda"].startswith("not run")) == (
                row["real_cuda"] == "runs")
            rows.append(row)
            print(f"{name:50s} {method:14s} simulated {row['simulated_cuda']:20s} real {row['real_cuda']}")
    return rows


if __name__ == "__main__":
    main()
