"""The submission command: what goes into the zip, what never does, and what it warns about.

The command is run as a user runs it: a copy of the script, placed at the root of a fake
repository in tmp_path that holds the real file names plus decoys that must stay out.
"""
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from make_submission import PART_FILES
from grading.protocol import PARTS

SCRIPT = Path(__file__).resolve().parents[1] / "make_submission.py"

PART_A_FILES = {f"A3_PartA/{name}" for name in PART_FILES["A"]}
PART_B_FILES = {f"A3_PartB/{name}" for name in PART_FILES["B"]}
DECOYS = (
    "A3_PartA/MNIST_data/MNIST/raw/train-images-idx3-ubyte",
    "A3_PartA/wandb/run-1/files/config.py",
    "A3_PartB/data/train/cat/flickr_cat_000001.png",
    "A3_PartB/data/afhq_v2.zip",
    "A3_PartB/results/model.pt",
    "A3_PartB/results/sample-1.png",
    "A3_PartB/model.pt",
    "A3_PartB/wandb/latest-run/files/code/main.py",
    "A3_PartB/results/checkpoint_copy.py",
    "A3_PartB/__pycache__/utils.cpython-311.pyc",
    "A3_PartB/.ipynb_checkpoints/run_diffusion-checkpoint.ipynb",
    "A3_PartB/.netrc",
    "A3_PartB/.env",
    "A3_PartB/wandb.key",
)
STRAY_CODE = ("A3_PartA/scratch_debug.py", "A3_PartB/secrets.py", "A3_PartB/scratch_debug.py")


def executed_notebook(error=False):
    """A one-cell notebook that has been run; with `error`, its cell ended in an exception."""
    cell = nbformat.v4.new_code_cell("print('hello')", execution_count=1)
    if error:
        cell.outputs = [nbformat.v4.new_output("error", ename="ValueError",
                                               evalue="bad data_path", traceback=[])]
    else:
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    return nbformat.v4.new_notebook(cells=[cell])


def unexecuted_notebook():
    """A notebook straight from the repository: code cells without outputs or counts."""
    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('hello')")])


@pytest.fixture
def repo(tmp_path):
    """A fake repository with the script: every file to submit (notebooks executed), all DECOYS
    and STRAY_CODE."""
    return fake_repository(tmp_path / "repo")


def fake_repository(root):
    """The fake repository of ``repo``, made at ``root``."""
    root.mkdir()
    shutil.copy(SCRIPT, root)
    shutil.copytree(SCRIPT.parent / "grading", root / "grading", ignore=shutil.ignore_patterns("__pycache__"))
    for name in sorted(PART_A_FILES | PART_B_FILES | set(DECOYS) | set(STRAY_CODE)):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".ipynb":
            nbformat.write(executed_notebook(), path)
        else:
            path.write_text(f"# {name}\n")
    return root


def run_submission(root, *options, check=False):
    """Run the copy of make_submission.py in `root` (with --no-check unless `check`); return the
    finished process."""
    return subprocess.run([sys.executable, str(root / SCRIPT.name), *options, *([] if check else ["--no-check"])],
                          capture_output=True, text=True, check=False)


def zipped_names(path):
    """The member names of the zip at `path`."""
    with zipfile.ZipFile(path) as archive:
        return set(archive.namelist())


def test_zip_holds_exactly_both_parts_code_and_notebooks(repo, tmp_path):
    output = tmp_path / "A3_submission.zip"
    result = run_submission(repo, "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert zipped_names(output) == PART_A_FILES | PART_B_FILES


def test_zip_never_holds_data_results_checkpoints_wandb_caches_or_credentials(repo, tmp_path):
    output = tmp_path / "A3_submission.zip"
    run_submission(repo, "--output", str(output))
    assert not zipped_names(output) & set(DECOYS)


def test_python_files_outside_the_assignment_are_not_packed(repo, tmp_path):
    output = tmp_path / "A3_submission.zip"
    run_submission(repo, "--output", str(output))
    assert not zipped_names(output) & set(STRAY_CODE)


def test_files_left_out_are_listed_as_not_part_of_the_assignment(repo, tmp_path):
    result = run_submission(repo, "--output", str(tmp_path / "out.zip"))
    _, _, listing = result.stderr.partition("Left out of the zip")
    assert "not part of the assignment" in listing
    for name in STRAY_CODE + ("A3_PartB/.env", "A3_PartB/model.pt"):
        assert name in listing


def test_existing_folder_as_output_is_refused_with_status_2_and_a_message(repo, tmp_path):
    folder = tmp_path / "submissions"
    folder.mkdir()
    result = run_submission(repo, "--output", str(folder))
    assert result.returncode == 2
    assert "is a folder" in result.stderr
    assert "A3_submission.zip" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(folder.iterdir())


def test_parts_option_packs_only_the_chosen_part(repo, tmp_path):
    output = tmp_path / "part_a.zip"
    run_submission(repo, "--parts", "A", "--output", str(output))
    assert zipped_names(output) == PART_A_FILES


def test_default_output_is_a3_submission_zip_in_the_repository(repo):
    result = run_submission(repo)
    assert result.returncode == 0, result.stderr
    assert zipped_names(repo / "A3_submission.zip") == PART_A_FILES | PART_B_FILES


def test_every_packed_file_is_printed_with_its_size(repo, tmp_path):
    (repo / "A3_PartB" / "unet.py").write_text("#" * 3 * 1024)
    result = run_submission(repo, "--output", str(tmp_path / "out.zip"))
    printed = dict(line.split(maxsplit=1) for line in result.stdout.splitlines()
                   if line.startswith("  "))
    assert printed.keys() == PART_A_FILES | PART_B_FILES
    assert printed["A3_PartB/unet.py"].strip() == "3.0 KiB"


def test_unexecuted_notebook_is_warned_about_on_stderr(repo, tmp_path):
    nbformat.write(unexecuted_notebook(), repo / "A3_PartB/run_diffusion.ipynb")
    result = run_submission(repo, "--output", str(tmp_path / "out.zip"))
    assert "WARNING: A3_PartB/run_diffusion.ipynb" in result.stderr
    assert "has not been run" in result.stderr


def test_notebook_with_an_error_output_is_warned_about_on_stderr(repo, tmp_path):
    nbformat.write(executed_notebook(error=True), repo / "A3_PartA/variational_autoencoders.ipynb")
    result = run_submission(repo, "--output", str(tmp_path / "out.zip"))
    assert "WARNING: A3_PartA/variational_autoencoders.ipynb" in result.stderr
    assert "ValueError: bad data_path" in result.stderr


def test_executed_notebooks_without_errors_give_no_warning(repo, tmp_path):
    result = run_submission(repo, "--output", str(tmp_path / "out.zip"))
    assert "WARNING" not in result.stderr


@pytest.mark.parametrize("name", ["A3_PartA/vae.py", "A3_PartB/unet.py"])
def test_missing_required_file_fails_with_a_message_naming_it(repo, tmp_path, name):
    (repo / name).unlink()
    result = run_submission(repo, "--output", str(tmp_path / "out.zip"))
    assert result.returncode != 0
    assert Path(name).name in result.stderr
    assert "Traceback" not in result.stderr


def git_ignores(repository, path):
    """Whether the repository's .gitignore keeps ``path`` out of git."""
    return subprocess.run(["git", "check-ignore", "--no-index", "-q", path],
                          cwd=repository).returncode == 0


@pytest.fixture
def repository_with_our_gitignore(tmp_path):
    shutil.copy(SCRIPT.parent / ".gitignore", tmp_path / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    return tmp_path


@pytest.mark.parametrize("path", [".env", "A3_PartB/.env", "A3_PartB/wandb.env", ".netrc",
                                  "A3_PartB/results/model.pt", "A3_PartB/data/afhq_v2.zip",
                                  "A3_PartB/wandb/run-1/files/config.yaml"])
def test_git_ignores_credentials_data_results_and_checkpoints(repository_with_our_gitignore, path):
    assert git_ignores(repository_with_our_gitignore, path)


def test_git_keeps_the_starter_network_fixture_of_the_tests(repository_with_our_gitignore):
    assert not git_ignores(repository_with_our_gitignore, "tests/fixtures/starter_unet_dim8_mults12.pt")


# ---- the check of vae.py and diffusion.py against their contracts

REAL = SCRIPT.parent
KL_SIGN_FLIPPED = ("kl = -0.5 * torch.sum(", "kl = 0.5 * torch.sum(")


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory):
    """make_submission.py with its check, in a fake repository holding the contracts, this
    package's diffusion.py and a3_helper.py, and a student-style vae.py whose KL has the wrong
    sign; the zip goes to out.zip beside it."""
    root = fake_repository(tmp_path_factory.mktemp("checked") / "repo")
    contracts = [name for spec in PARTS.values() for name in spec.grading_files()]
    for name in (*contracts, "A3_PartB/diffusion.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REAL / name, root / name)
    correct_vae = (REAL / "tests/skeleton_style_vae/keyword_hidden_dim/vae.py").read_text()
    (root / "A3_PartA/vae.py").write_text(correct_vae.replace(*KL_SIGN_FLIPPED))
    return run_submission(root, "--output", str(root.parent / "out.zip"), check=True), root.parent / "out.zip"


def test_check_prints_the_verdict_of_a_file_that_passes_its_contract(checked_run):
    result, _ = checked_run
    assert re.search(r"Checked A3_PartB/diffusion.py: pass \(\d+/\d+ checks passed\)", result.stdout), result.stdout


def test_check_warns_with_the_verdict_and_the_first_cause_of_a_file_that_fails(checked_run):
    result, _ = checked_run
    assert re.search(r"WARNING: A3_PartA/vae.py: fail \(\d+/\d+ checks passed\): "
                     r"test_loss_kl_term_is_eq_3_summed_over_latent_dimensions_and_averaged_over_the_batch: eq. \(3\) KL",
                     result.stderr), result.stderr


def test_check_that_fails_still_writes_the_zip(checked_run):
    result, output = checked_run
    assert result.returncode == 0, result.stderr
    assert zipped_names(output) == PART_A_FILES | PART_B_FILES


def test_no_check_skips_the_contracts(repo, tmp_path):
    result = run_submission(repo, "--output", str(tmp_path / "out.zip"))
    assert "Checked" not in result.stdout and "pass" not in result.stdout
    assert "WARNING" not in result.stderr
