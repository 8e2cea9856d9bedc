"""contract_probes.py and grading/protocol.py: grading judges a file in processes that never
import it, and gives each check the outcome a student's run gives.

A student's run calls each probe at once; grading draws the inputs from a fresh seed, lets the
box answer the probes and judges the answers apart (grading.verdicts.check_file). The hostile
files that try to grade themselves are planted in tests/test_autograder.py.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from contract_probes import plain
from grading import protocol
from grading.protocol import PARTS, PhaseStopped, box_protections
from grading.sandbox import Limits
from grading.verdicts import check_file

pytestmark = pytest.mark.slow  # each test grades files in boxes

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
LIMITS = Limits(seconds=120)
BARE = {name: (what if name in ("own folder", "environment", "limits") else None)  # so that it can write a note
        for name, what in box_protections(LIMITS).items()}
SKELETON_VAE = (TESTS / "skeleton_style_vae" / "keyword_hidden_dim" / "vae.py").read_text()
SKELETON_DIFFUSION = (TESTS / "skeleton_style_diffusion" / "diffusion.py").read_text()
FILES = {
    "vae_ours": ("A", (REPO / "A3_PartA" / "vae.py").read_text()),
    "vae_kl_sign_flipped": ("A", SKELETON_VAE.replace("kl = -0.5 * torch.sum(", "kl = 0.5 * torch.sum(")),
    "diffusion_eq7_printed_typo": ("B", SKELETON_DIFFUSION.replace("self.coef_xt = self.alphas.sqrt()",
                                                                  "self.coef_xt = self.alphas_bar.sqrt()")),
    "diffusion_cuda_only_in_init": ("B", (TESTS / "devices_in_student_files" / "cuda_only_in_init" / "diffusion.py").read_text()),
    "diffusion_does_not_import": ("B", "import torch\nfrom torch import nn\nclass Diffusion(nn.Module)\n"),
}
STUDENTS_RUN = """
import json, sys
sys.path.insert(0, sys.argv[1])
from contract_check import run_contract
print(json.dumps(run_contract(sys.argv[2], {sys.argv[3]: sys.argv[4]})))
"""


def students_run(part, path):
    """The records of the contract run on ``path`` as a student runs it (its own process)."""
    contract, variable = PARTS[part].contract, PARTS[part].variable
    contract = REPO / contract
    run = subprocess.run([sys.executable, "-c", STUDENTS_RUN, str(contract.parent), str(contract), variable, str(path)],
                         capture_output=True, text=True, cwd=contract.parent, timeout=600)
    return json.loads(run.stdout.strip().splitlines()[-1])


def outcomes(records):
    return {record["test"]: record["outcome"] for record in records if "test" in record}


@pytest.mark.parametrize("name", FILES)
def test_grading_gives_each_check_the_outcome_a_students_run_gives(name, tmp_path):
    part, source = FILES[name]
    path = tmp_path / PARTS[part][0]
    path.write_text(source)
    graded = check_file(part, path, path.name, LIMITS)
    assert outcomes(graded.tests) == outcomes(students_run(part, path))
    assert graded.verdict == {"vae_ours": "pass", "diffusion_does_not_import": "error"}.get(name, "fail")


def test_the_processes_that_draw_inputs_and_judge_never_import_the_file(tmp_path):
    """The file notes, at each import, the script of the process importing it: only the box's
    (answer.py) may."""
    notes = tmp_path / "imported_in.txt"
    path = tmp_path / "vae.py"
    path.write_text(f"import os, sys\nwith open({str(notes)!r}, 'a') as notes:\n"
                    "    notes.write(os.path.basename(sys.argv[0]) + '\\n')\n" + SKELETON_VAE)
    result = check_file("A", path, "vae.py", LIMITS, BARE)
    assert result.verdict == "pass"
    assert set(notes.read_text().splitlines()) == {"answer.py"}


def test_a_probe_hands_back_data_only():
    tracked = torch.ones(2, requires_grad=True) * 3
    answer = plain({"loss": tracked, "steps": (1, 2), "names": ["a"], "nothing": None})
    assert not answer["loss"].requires_grad and answer["steps"] == (1, 2) and answer["names"] == ["a"]
    with pytest.raises(TypeError, match="a probe returned a function, which is not data"):
        plain({"model": lambda: None})


def test_answers_that_stop_the_judge_are_the_files_error_not_the_graders_crash(tmp_path, monkeypatch):
    real_phase = protocol.phase_records

    def judge_stops(phase, contract, exchange, seed, limits):
        if phase == "judge":
            raise PhaseStopped("the judge phase of vae_contract.py stopped (killed by SIGSEGV): ")
        return real_phase(phase, contract, exchange, seed, limits)

    monkeypatch.setattr(protocol, "phase_records", judge_stops)
    path = tmp_path / "vae.py"
    path.write_text(SKELETON_VAE)
    result = check_file("A", path, "vae.py", LIMITS)
    assert (result.verdict, result.first_failure) == (
        "error", "its answers could not be judged: the judge phase of vae_contract.py stopped (killed by SIGSEGV): ")
