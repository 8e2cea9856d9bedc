"""make_autograder.py: the zip Gradescope takes, and run_autograder run as Gradescope runs it.

Each upload is graded once for the module by the zip's own run_autograder, in a folder laid out
as Gradescope's /autograder (source/ the zip, submission/ the upload, results/), named by
AUTOGRADER_ROOT, with a short time limit so that a file that loops costs seconds.
"""
import json
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from grading.gradescope import requirement_lines
from grading.points import POINTS
from grading.protocol import PARTS, expected_checks
from make_autograder import main as make_autograder

REPO = Path(__file__).resolve().parents[1]
OURS = {"A": REPO / "A3_PartA" / "vae.py", "B": REPO / "A3_PartB" / "diffusion.py"}
LOOPS = "while True:\n    pass\n"
SECONDS = 40  # the box's wall time per part: a file that loops is stopped then
SKELETON_DIFFUSION = (REPO / "tests" / "skeleton_style_diffusion" / "diffusion.py").read_text()
GPU_ONLY_SHAPE_ERROR = SKELETON_DIFFUSION.replace(
    "        abar = extract(self.alphas_bar, t, x_0.shape)\n        return abar.sqrt()",
    "        abar = extract(self.alphas_bar, t, x_0.shape)\n        if torch.cuda.is_available():\n"
    "            abar = abar.view(1, -1)\n        return abar.sqrt()")
SYNCHRONIZES = SKELETON_DIFFUSION.replace(  # correct: only the simulated GPU cannot run it
    "        return self.p_sample_loop(self.noise_like(shape, device))",
    "        if torch.cuda.is_available():\n            torch.cuda.synchronize()\n"
    "        return self.p_sample_loop(self.noise_like(shape, device))")


@pytest.fixture(scope="module")
def autograder(tmp_path_factory):
    path = tmp_path_factory.mktemp("built") / "autograder.zip"
    make_autograder(["--output", str(path), "--seconds", str(SECONDS)])
    return path


def run_as_gradescope(autograder, upload, root):
    """Lay out ``root`` as Gradescope's /autograder with ``upload`` (name -> text) as the student's
    files, run the zip's run_autograder there, and return results.json."""
    with zipfile.ZipFile(autograder) as archive:
        archive.extractall(root / "source")
    shutil.copy(root / "source" / "run_autograder", root / "run_autograder")
    (root / "run_autograder").chmod(0o755)
    for name, text in upload.items():
        (root / "submission" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "submission" / name).write_text(text)
    subprocess.run([str(root / "run_autograder")], cwd=root, env={"AUTOGRADER_ROOT": str(root), "PATH": python_path()},
                   check=True, timeout=600)
    return json.loads((root / "results" / "results.json").read_text())


def python_path():
    """A PATH on which ``python3`` is this interpreter, as it is on Gradescope's image."""
    folder = Path(sys.executable).parent
    return f"{folder}:/usr/bin:/bin"

# Tricks a file could play on a grader that ran it where its verdict is decided: each must earn nothing.
FAKES_ITS_PYTEST_REPORTS = """import builtins, _pytest.reports, torch.testing
_made = _pytest.reports.TestReport.__init__
def _passed(self, *args, **kwargs):
    _made(self, *args, **kwargs)
    self.outcome, self.longrepr = "passed", None
_pytest.reports.TestReport.__init__ = _passed
torch.testing.assert_close = lambda *args, **kwargs: None
builtins.all = lambda *args: True
"""
PATCHES_THE_CONTRACT = """import inspect, types, pytest
seen = [value for frame in inspect.stack() for value in frame.frame.f_locals.values()]
for contract in [value for value in seen if isinstance(value, types.ModuleType) and value.__name__.endswith(("_contract", "_probes"))]:
        contract.assert_close = contract.assert_rows_close = lambda *args, **kwargs: None
        contract.probe_on_the_trainers_device = lambda *args, **kwargs: {"step": None}
        contract.probe_training = lambda *args, **kwargs: [2.0, 1.0]
pytest.fail = lambda *args, **kwargs: None
"""
WRITES_ITS_OWN_VERDICT = """import json, os, pathlib, sys, torch
home = pathlib.Path(os.environ["HOME"])
record = {"test": "test_loss_function_is_the_negative_elbo_of_eq_4", "outcome": "passed", "message": ""}
print(json.dumps(record))
(home / "results.jsonl").write_text(json.dumps(record) + "\n" + json.dumps({"done": True}) + "\n")
(home / "answers").mkdir(exist_ok=True)
inputs = pathlib.Path(json.loads(pathlib.Path(sys.argv[-1]).read_text())["inputs"])
for question in inputs.glob("*.pt"):
    probe = torch.load(question, weights_only=True)["probe"]
    torch.save({"probe": probe, "returned": {"step": None}}, home / "answers" / question.name)
os._exit(0)
"""
TRICKS = {"fakes_its_pytest_reports": FAKES_ITS_PYTEST_REPORTS, "patches_the_contract": PATCHES_THE_CONTRACT,
          "writes_its_own_verdict": WRITES_ITS_OWN_VERDICT}

UPLOADS = {
    "handed_in": {"A3_PartA/vae.py": OURS["A"].read_text(), "A3_PartB/diffusion.py": OURS["B"].read_text()},
    "files_only_vae_loops": {"vae.py": LOOPS, "diffusion.py": OURS["B"].read_text()},
    "gpu_only_branch_crashes_no_vae": {"diffusion.py": GPU_ONLY_SHAPE_ERROR},
    "synchronizes_the_gpu": {"vae.py": OURS["A"].read_text(), "diffusion.py": SYNCHRONIZES},
    **{name: {"vae.py": trick, "diffusion.py": trick} for name, trick in TRICKS.items()},
}


@pytest.fixture(scope="module")
def results(autograder, tmp_path_factory):
    """{upload name: its results.json}."""
    return {name: run_as_gradescope(autograder, upload, tmp_path_factory.mktemp(name))
            for name, upload in UPLOADS.items()}


def part_score(results, part):
    return round(sum(test["score"] for test in results["tests"] if test["name"].startswith(f"Part {part} ")), 2)


def test_the_zip_holds_setup_sh_and_an_executable_run_autograder_at_its_root(autograder):
    with zipfile.ZipFile(autograder) as archive:
        entries = {entry.filename: entry for entry in archive.infolist()}
        setup = archive.read("setup.sh").decode()
        settings = json.loads(archive.read("autograder.json"))
    assert {"setup.sh", "run_autograder"} <= set(entries)
    assert stat.S_IMODE(entries["run_autograder"].external_attr >> 16) & 0o111
    for name in ("grading/gradescope.py", "grading/sandbox.py", "grading/answer.py", "grading/phase.py",
                 *(spec.contract for spec in PARTS.values()), *(spec.probes for spec in PARTS.values())):
        assert name in entries
    assert {part: (value["points"], value["checks"]) for part, value in settings["parts"].items()} == {
        part: (POINTS[part], expected_checks(part)) for part in PARTS}
    assert '"torch>=2.4" "torchvision>=0.19"' in setup and "download.pytorch.org/whl/cpu" in setup
    assert subprocess.run(["bash", "-n"], input=setup, text=True).returncode == 0  # parses as bash
    requirements = requirement_lines()
    assert requirements["pytest"] == "pytest>=7.4"


def test_each_test_follows_gradescopes_format_and_names_its_part(results):
    for graded in results.values():
        assert set(graded) >= {"score", "tests", "execution_time"}
        for test in graded["tests"]:
            assert set(test) >= {"name", "score", "max_score", "status", "output", "visibility"}
            assert test["name"].startswith(("Part A (vae.py): ", "Part B (diffusion.py): "))
            assert test["status"] == ("passed" if test["score"] >= test["max_score"] else "failed")


def test_the_projects_hand_in_gets_full_marks(results):
    graded = results["handed_in"]
    assert graded["score"] == sum(POINTS.values())
    assert (part_score(graded, "A"), part_score(graded, "B")) == (POINTS["A"], POINTS["B"])
    assert len(graded["tests"]) == len(expected_checks("A")) + len(expected_checks("B"))


def test_a_check_the_simulated_gpu_cannot_run_scores_with_the_values_it_rests_on_and_says_so(results):
    graded = results["synchronizes_the_gpu"]
    assert graded["score"] == sum(POINTS.values())
    not_run = {test["name"].split(": ", 1)[1]: test for test in graded["tests"] if "not run" in test["output"]}
    check = not_run["test_runs_on_each_device_the_trainer_picks[sample-cuda]"]
    assert check["output"].startswith("device check not run: the meta device cannot run all of sample")
    assert check["score"] == check["max_score"] > 0


def test_a_vae_py_that_loops_scores_zero_with_the_reason_and_part_b_is_still_graded(results):
    graded = results["files_only_vae_loops"]
    assert part_score(graded, "A") == 0
    assert part_score(graded, "B") == POINTS["B"]
    part_a = [test for test in graded["tests"] if test["name"].startswith("Part A ")]
    assert len(part_a) == len(expected_checks("A"))
    assert all(test["output"].startswith(f"not run: timeout: did not finish within {SECONDS:g} s") for test in part_a)


def test_a_gpu_only_crash_fails_its_device_checks_naming_cuda_and_a_missing_file_scores_zero(results):
    graded = results["gpu_only_branch_crashes_no_vae"]
    failed = [test for test in graded["tests"] if test["name"].startswith("Part B ") and test["status"] == "failed"]
    assert failed and all("test_runs_on_each_device_the_trainer_picks" in test["name"] and "-cuda]" in test["name"]
                          for test in failed)
    assert "on CUDA" in failed[0]["output"] and "diffusion.py:" in failed[0]["output"]
    assert 0 < part_score(graded, "B") < POINTS["B"]
    part_a = [test for test in graded["tests"] if test["name"].startswith("Part A ")]
    assert part_score(graded, "A") == 0 and all("missing" in test["output"] for test in part_a)


@pytest.mark.parametrize("trick", TRICKS)
def test_a_file_that_tries_to_grade_itself_earns_nothing(results, trick):
    """The box only answers probes with data, on inputs drawn afresh; the checks are judged in
    a process that never imports the file. Patching pytest, torch.testing, builtins or the
    contract's helpers there, printing records, writing a results file or answers and exiting
    change nothing but the data the judges read, and faking what the box observes (the
    simulated GPU, train_vae's losses) is not scored without the checks it rests on."""
    graded = results[trick]
    assert (part_score(graded, "A"), part_score(graded, "B")) == (0, 0)


def test_a_faked_device_check_is_not_scored_and_says_what_it_rests_on(results):
    device_checks = [test for test in results["patches_the_contract"]["tests"]
                     if "test_runs_on_each_device_the_trainer_picks[q_sample-cuda]" in test["name"]]
    assert [(test["score"], test["output"]) for test in device_checks] == [
        (0, "passed, not scored: it rests on test_q_sample_mean_is_sqrt_abar_t_times_x0, which did not score")]


@pytest.mark.slow
def test_local_grades_a_zip_left_whole_and_prints_what_the_student_would_see(tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "A3_submission.zip", "w") as archive:
        archive.write(OURS["A"], "A3_PartA/vae.py")
    make_autograder(["--local", str(tmp_path / "A3_submission.zip"), "--parts", "A", "--points", "A=10"])
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == "Total: 10.0"
    assert "Part A (vae.py): test_loss_function_is_the_negative_elbo_of_eq_4" in printed


def test_an_output_that_cannot_be_written_is_said_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as stopped:
        make_autograder(["--output", str(tmp_path / "no_such_folder" / "autograder.zip")])
    assert str(stopped.value) == (f"Cannot write {tmp_path / 'no_such_folder' / 'autograder.zip'}: "
                                  "No such file or directory. Choose a folder you can write to.")
