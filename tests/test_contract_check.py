"""contract_check.py and contract_probes.py: one file each in both parts' folders, and the verdict
contract_check.py reads from a run.

The notebooks' check cells run it on real files (test_notebooks.py); make_submission.py and
grade_submissions.py judge its records (test_submission.py, test_grade_submissions.py).
"""
from pathlib import Path

import pytest

import contract_check
from contract_check import check_before_training, finished_verdict, verdict_line

REPO_ROOT = Path(__file__).resolve().parents[1]
PASSED = {"test": "test_a", "outcome": "passed", "message": ""}
FAILED = {"test": "test_b", "outcome": "failed", "message": "eq. (7) posterior mean is off"}
ERROR = {"test": "diffusion_contract.py", "outcome": "error", "message": "SyntaxError: invalid syntax"}
NOT_RUN = {"test": "test_c", "outcome": "skipped", "message": "device check not run: the meta device ..."}
WARNING = {"warning": "test_d: q_sample runs only on the device it picks itself"}
DONE = {"done": True}


@pytest.mark.parametrize("shared", ["contract_check.py", "contract_probes.py"])
def test_part_b_ships_a_byte_copy_of_the_source_in_part_a(shared):
    """Each part's folder runs alone on Colab, so each holds the file; A3_PartA's is the source
    (edit it, then copy it over A3_PartB's)."""
    source, copy = REPO_ROOT / "A3_PartA" / shared, REPO_ROOT / "A3_PartB" / shared
    assert copy.read_bytes() == source.read_bytes(), f"cp {source} {copy}"


@pytest.mark.parametrize("records, expected", [
    ([PASSED, PASSED, DONE], ("pass", 2, 2, "")),
    ([PASSED, NOT_RUN, DONE], ("pass", 1, 2, NOT_RUN["message"])),
    ([NOT_RUN, WARNING, DONE], ("error", 0, 1, "no check ran")),
    ([DONE], ("error", 0, 0, "no check ran")),
    ([PASSED, WARNING, PASSED, DONE], ("portability", 2, 2, WARNING["warning"])),
    ([PASSED, FAILED, WARNING, DONE], ("fail", 1, 2, "test_b: eq. (7) posterior mean is off")),
    ([ERROR, FAILED, DONE], ("error", 0, 2, "does not import or crashes outside any check: "
                                            "SyntaxError: invalid syntax")),
])
def test_the_verdict_names_the_worst_outcome_and_its_first_cause(records, expected):
    assert finished_verdict(records) == expected


def test_the_verdict_line_reads_as_make_submission_prints_it():
    assert verdict_line("vae.py", "fail", 25, 26, "test_kl: eq. (3) KL is off") == (
        "vae.py: fail (25/26 checks passed): test_kl: eq. (3) KL is off")
    assert verdict_line("vae.py", "pass", 26, 26, "") == "vae.py: pass (26/26 checks passed)"


def test_without_pytest_the_notebooks_check_says_how_to_get_it_and_lets_training_go_on(monkeypatch, capsys):
    monkeypatch.setattr(contract_check, "pytest", None)
    check_before_training(REPO_ROOT / "A3_PartA" / "vae_contract.py", "A3_VAE", REPO_ROOT / "A3_PartA" / "vae.py")
    assert capsys.readouterr().out == ("WARNING: vae.py was not checked: pytest is not installed. Run "
                                       "`%pip install pytest`, then this cell again.\n")
