"""Both notebooks run top to bottom in a real Jupyter kernel, on the CPU, offline.

Each notebook is executed by nbclient in a tmp copy of its part's folder, with test-made data
and small settings injected in a cell right after its `parameters` cell (papermill style).
nbclient raises CellExecutionError if any cell fails. The kernel is this interpreter, through
a kernel spec written to tmp, so the tests need nothing beyond requirements.txt.

Part B's FID needs clean-fid's Inception weights, which cannot be downloaded offline: its run
injects, with the parameters, a stand-in for clean-fid's feature extractor (a 2x2 colour
average pool). Everything else of Part 2 is real: sampling, clean-fid's resizing and Fréchet
distance, the plot. The Inception network itself is not exercised by these tests.
"""
import csv
import math
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import ipykernel.kernelspec
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from afhq_data import make_afhq_folder
from mnist_data import write_mnist_raw

pytestmark = pytest.mark.slow  # each test runs a notebook in a Jupyter kernel

REPO_ROOT = Path(__file__).resolve().parents[1]
LEFT_BEHIND = shutil.ignore_patterns("data", "results", "wandb", "MNIST_data", "__pycache__",
                                     ".ipynb_checkpoints", "*.pt", "*.jpg", "*.png")
CELL_TIMEOUT_S = 600

PART_A_SETTINGS = """
NUM_EPOCHS = 1
BATCH_SIZE = 64
"""

PART_B_SETTINGS = """
IMAGE_SIZE = 16
BATCH_SIZE = 4
TIME_STEPS = 5
UNET_DIM = 8
DATALOADER_WORKERS = 0
PART1_STEPS, PART1_EVERY = 2, 1
PART2_STEPS, PART2_EVERY = 2, 1
PART5_STEPS, PART5_EVERY = 2, 2
USE_WANDB = False

# offline stand-in for clean-fid's Inception network (see the module docstring)
import torch.nn.functional as F
import fid_score

def colour_pool_features(images):
    return F.adaptive_avg_pool2d(images, 2).flatten(1)

fid_score.build_feature_extractor = lambda *args, **kwargs: colour_pool_features
"""


@pytest.fixture(scope="module")
def jupyter_env(tmp_path_factory):
    """Point Jupyter at a 'python3' kernel spec that runs this interpreter; keep the kernel
    on the CPU (on one thread: conftest.py sets OMP_NUM_THREADS) and wandb off and out of
    the repository."""
    folder = tmp_path_factory.mktemp("jupyter")
    ipykernel.kernelspec.write_kernel_spec(path=folder / "kernels" / "python3")
    (folder / "wandb").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(folder))
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        patch.setenv("WANDB_MODE", "disabled")
        patch.setenv("WANDB_DIR", str(folder / "wandb"))
        yield


def copy_part(part_folder, destination):
    """Copy a part's code and notebook (not its data, results or caches) to `destination`."""
    return Path(shutil.copytree(REPO_ROOT / part_folder, destination / part_folder,
                                ignore=LEFT_BEHIND))


def inject_settings(notebook, source):
    """Insert a code cell running `source` right after the cell tagged `parameters`, in place of
    one an earlier run injected (as papermill does)."""
    notebook.cells = [cell for cell in notebook.cells
                      if "injected-parameters" not in cell.metadata.get("tags", [])]
    index = next(i for i, cell in enumerate(notebook.cells)
                 if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(index + 1, injected)


def execute_notebook(path, settings):
    """Run the notebook at `path` in its folder with `settings` injected; save it executed."""
    notebook = nbformat.read(path, as_version=4)
    inject_settings(notebook, settings)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    nbformat.write(notebook, path)
    return notebook


def printed_in_a_kernel(source, folder):
    """What `source` prints when run in a new kernel started in `folder`."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(folder)}}).execute()
    return "".join(output.text for output in notebook.cells[0].outputs
                   if output.get("name") == "stdout")


def error_outputs(notebook):
    """Every error output of the notebook's code cells."""
    return [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs if output.output_type == "error"]


@pytest.fixture(scope="module")
def part_a_run(jupyter_env, tmp_path_factory):
    """Part A's notebook run once on a synthetic MNIST, one epoch per model.

    Returns the folder it ran in and the executed notebook.
    """
    folder = copy_part("A3_PartA", tmp_path_factory.mktemp("part_a"))
    write_mnist_raw(folder / "MNIST_data", num_images=320)
    return folder, execute_notebook(folder / "variational_autoencoders.ipynb", PART_A_SETTINGS)


@pytest.fixture(scope="module")
def part_b_run(jupyter_env, tmp_path_factory):
    """Part B's notebook run once, every part at two training steps, FID on a stand-in extractor.

    The data is a fake AFHQ zip laid out like the real one (train/cat/*.png) and left in
    ./data/afhq_v2.zip, where the notebook's download step puts it, so the notebook skips the
    download but unzips it itself. Returns the folder it ran in and the executed notebook.
    (``test_part_b_notebook_data_cell_*`` run the download itself, with a stand-in for gdown.)
    """
    folder = copy_part("A3_PartB", tmp_path_factory.mktemp("part_b"))
    fake_afhq = make_afhq_folder(tmp_path_factory.mktemp("afhq"), classes=("cat",),
                                 per_class=40, size=64).parent
    (folder / "data").mkdir()
    shutil.make_archive(str(folder / "data" / "afhq_v2"), "zip", root_dir=fake_afhq)
    return folder, execute_notebook(folder / "run_diffusion.ipynb", PART_B_SETTINGS)


@pytest.fixture(scope="module")
def kernel_cache_folder(jupyter_env, tmp_path_factory):
    """The trainer's default cache folder, as seen in a kernel that a module-scoped fixture starts
    (as the notebook runs do): these fixtures run before any test's own settings."""
    folder = copy_part("A3_PartB", tmp_path_factory.mktemp("kernel_cache"))
    return Path(printed_in_a_kernel("import files\nprint(files.default_cache_folder())",
                                    folder).strip())


def test_kernels_of_module_fixtures_cache_in_a_temporary_folder_not_the_users(kernel_cache_folder):
    assert kernel_cache_folder.is_relative_to(tempfile.gettempdir())
    assert not kernel_cache_folder.is_relative_to(Path.home() / ".cache")


def test_part_a_notebook_runs_every_cell_without_error(part_a_run):
    _, notebook = part_a_run
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)
    assert not error_outputs(notebook)


@pytest.mark.parametrize("figure", ["vae_generation.jpg", "vae_interpolation.jpg",
                                    "conditional_vae_generation.jpg"])
def test_part_a_notebook_saves_its_figures(part_a_run, figure):
    folder, _ = part_a_run
    assert (folder / figure).stat().st_size > 0


def test_part_b_notebook_runs_every_cell_without_error(part_b_run):
    _, notebook = part_b_run
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code_cells)
    assert not error_outputs(notebook)


def test_part_b_notebook_unzips_afhq_when_its_data_folder_is_missing(part_b_run):
    folder, _ = part_b_run
    cats = list((folder / "data" / "train" / "cat").glob("*.png"))
    assert len(cats) == 40 + 2  # the fake tree adds one corrupt and one grayscale file


def test_part_b_notebook_keeps_the_afhq_zip_for_another_class(part_b_run):
    folder, _ = part_b_run
    assert zipfile.is_zipfile(folder / "data" / "afhq_v2.zip")
    assert sorted(path.name for path in (folder / "data").iterdir()) == ["afhq_v2.zip", "train"]


GDOWN_STAND_IN = """
import shutil, sys, types

def copy_the_whole_zip(id, output, quiet, resume):
    shutil.copyfile({whole_zip!r}, output)

sys.modules["gdown"] = types.SimpleNamespace(download=copy_the_whole_zip)
"""


def run_through(folder, notebook_name, marker, settings):
    """Run the notebook in ``folder`` up to and including its first cell whose source holds
    ``marker``, with ``settings`` injected; returns what that cell printed."""
    notebook = nbformat.read(folder / notebook_name, as_version=4)
    last = next(index for index, cell in enumerate(notebook.cells) if marker in cell.source)
    notebook.cells = notebook.cells[:last + 1]
    inject_settings(notebook, settings)
    NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(folder)}}).execute()
    return "".join(output.get("text", "") for output in notebook.cells[-1].outputs)


def run_through_the_data_cell(folder, settings):
    """Run Part B's notebook in ``folder`` up to and including its data cell (the one calling
    ``download_afhq``), with ``settings`` injected; returns what that cell printed."""
    return run_through(folder, "run_diffusion.ipynb", "download_afhq(", settings)


def cut_short_download(data, whole_zip):
    """The zip cut short by a disconnect, and the temporary folder of an unzip cut short."""
    (data / "afhq_v2.zip").write_bytes(whole_zip.read_bytes()[:-100])
    (data / ".cat.unzipping").mkdir()
    (data / ".cat.unzipping" / "cat_0000.png").write_bytes(b"cut")


def cut_short_unzip_by_hand(data, whole_zip):
    """A whole zip, and a cat folder unzipped by hand (the README's old commands) and cut short."""
    shutil.copyfile(whole_zip, data / "afhq_v2.zip")
    with zipfile.ZipFile(whole_zip) as archive:
        archive.extract("train/cat/cat_0000.png", data)


@pytest.mark.parametrize("cut_short, said", [
    (cut_short_download, "probably a download cut short: downloading it again."),
    (cut_short_unzip_by_hand, "(an unzip cut short): unzipping it again."),
])
def test_part_b_notebook_data_cell_run_again_after_a_disconnect_ends_in_the_full_folder(
        jupyter_env, tmp_path, cut_short, said):
    folder = copy_part("A3_PartB", tmp_path)
    fake_train = make_afhq_folder(tmp_path / "afhq", classes=("cat", "dog"), per_class=3, size=8)
    whole_zip = Path(shutil.make_archive(str(tmp_path / "whole"), "zip",
                                         root_dir=fake_train.parent))
    (folder / "data").mkdir()
    cut_short(folder / "data", whole_zip)
    printed = run_through_the_data_cell(folder, GDOWN_STAND_IN.format(whole_zip=str(whole_zip)))
    assert said in printed
    unzipped = {path.name: path.read_bytes() for path in (folder / "data/train/cat").iterdir()}
    assert unzipped == {path.name: path.read_bytes() for path in (fake_train / "cat").iterdir()}
    assert sorted(path.name for path in (folder / "data" / "train").iterdir()) == ["cat"]


@pytest.mark.parametrize("figure", [
    "results/part1/loss.png", "results/part1/sample_0.png", "results/part1/sample_1.png",
    "results/part1/forward_diffusion.png", "results/part1/backward_diffusion.png",
    "results/part2/fid.png",
    "results/part5/sample_0.png",
    "results/part5/forward_diffusion.png", "results/part5/backward_diffusion.png",
])
def test_part_b_notebook_saves_the_figures_of_every_part(part_b_run, figure):
    folder, _ = part_b_run
    assert (folder / figure).stat().st_size > 0


def test_part_b_notebook_scores_fid_at_every_milestone_of_part_2(part_b_run):
    folder, _ = part_b_run
    with open(folder / "results" / "part2" / "metrics.csv", newline="") as file:
        scored = {int(row["step"]): float(row["fid"]) for row in csv.DictReader(file) if row["fid"]}
    assert sorted(scored) == [1, 2]
    assert all(math.isfinite(fid) and fid >= 0 for fid in scored.values())


def test_part_b_notebook_shows_the_figures_inline(part_b_run):
    _, notebook = part_b_run
    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if "image/png" in output.get("data", {})]
    # Part 1: loss and samples; Part 2: FID; Parts 3-4: two; Part 5: samples and loss; Part 6: two
    assert len(images) == 9


def test_part_b_notebook_run_again_resumes_and_leaves_finished_parts_untouched(part_b_run):
    """Run all after Run all (a reconnected Colab session): every part is finished, so none is
    trained again; each checkpoint keeps its bytes and its modification time."""
    folder, _ = part_b_run
    checkpoints = sorted((folder / "results").glob("part*/model.pt"))
    before = [(path.read_bytes(), path.stat().st_mtime_ns) for path in checkpoints]
    notebook = execute_notebook(folder / "run_diffusion.ipynb", PART_B_SETTINGS)
    assert error_outputs(notebook) == []
    assert len(checkpoints) == 3
    assert [(path.read_bytes(), path.stat().st_mtime_ns) for path in checkpoints] == before


# ---- the check cell: the contract on the student's file before any training

KL_SIGN_FLIPPED = ("kl_divergence = -0.5 * torch.sum(", "kl_divergence = 0.5 * torch.sum(")
EQ7_X_T_TERM_SIGN_FLIPPED = ('"posterior_mean_coef2": alphas.sqrt()', '"posterior_mean_coef2": -alphas.sqrt()')
CHECK_CELL = "check_before_training("


def with_edit(path, edit):
    """Apply one (old, new) replacement, found exactly once, to the file at ``path``."""
    source = path.read_text()
    assert source.count(edit[0]) == 1, edit[0]
    path.write_text(source.replace(*edit))


def stopped_run(path, settings):
    """Run the notebook at ``path`` with ``settings`` injected, expecting a cell to fail:
    (the executed notebook, the index of the failing cell, its error as 'name: message')."""
    notebook = nbformat.read(path, as_version=4)
    inject_settings(notebook, settings)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(path.parent)}})
    with pytest.raises(CellExecutionError):
        client.execute()
    failing, error = next((index, output) for index, cell in enumerate(notebook.cells)
                          if cell.cell_type == "code" for output in cell.outputs
                          if output.output_type == "error")
    return notebook, failing, f"{error.ename}: {error.evalue}"


def check_cell_output(notebook):
    cell = next(cell for cell in notebook.cells if CHECK_CELL in cell.source)
    return "".join(output.get("text", "") for output in cell.outputs)


def assert_stopped_at_the_check_cell(notebook, failing):
    assert CHECK_CELL in notebook.cells[failing].source
    assert not any(cell.get("execution_count") for cell in notebook.cells[failing + 1:])


def test_part_a_notebook_checks_vae_py_and_passes_ours_in_one_line(part_a_run):
    _, notebook = part_a_run
    assert check_cell_output(notebook) == "vae.py: pass (26/26 checks passed)\n"


def test_part_b_notebook_checks_diffusion_py_and_passes_ours_in_one_line(part_b_run):
    _, notebook = part_b_run
    assert check_cell_output(notebook) == "diffusion.py: pass (48/48 checks passed)\n"


@pytest.mark.parametrize("part, notebook_name, file_name, edit, named, settings, training", [
    ("A3_PartA", "variational_autoencoders.ipynb", "vae.py", KL_SIGN_FLIPPED,
     "test_loss_kl_term_is_eq_3_summed_over_latent_dimensions_and_averaged_over_the_batch: eq. (3) KL",
     PART_A_SETTINGS, "train_vae(epoch, vae_model"),
    ("A3_PartB", "run_diffusion.ipynb", "diffusion.py", EQ7_X_T_TERM_SIGN_FLIPPED,
     "test_p_sample_mean_is_the_posterior_mean_of_eq_7_at_every_t: eq. (7) posterior mean",
     PART_B_SETTINGS, "part1 = train_diffusion("),
], ids=["part_a_kl_sign_flipped", "part_b_eq7_x_t_term_sign_flipped"])
def test_a_notebook_stops_at_its_check_before_training_a_wrong_file(
        jupyter_env, tmp_path, part, notebook_name, file_name, edit, named, settings, training):
    folder = copy_part(part, tmp_path)
    with_edit(folder / file_name, edit)
    notebook, failing, error = stopped_run(folder / notebook_name, settings)
    assert_stopped_at_the_check_cell(notebook, failing)
    assert error.startswith(f"ContractFailed: {file_name}: fail (")
    assert named in error and "TRAIN_ANYWAY = True" in error
    assert failing < next(index for index, cell in enumerate(notebook.cells) if training in cell.source)
    assert not (folder / "results").exists() and not list(folder.rglob("model.pt"))


def test_part_a_notebook_trains_anyway_when_asked_and_the_check_only_warns(jupyter_env, tmp_path):
    folder = copy_part("A3_PartA", tmp_path)
    with_edit(folder / "vae.py", KL_SIGN_FLIPPED)
    printed = run_through(folder, "variational_autoencoders.ipynb", CHECK_CELL, "TRAIN_ANYWAY = True")
    assert printed.startswith("WARNING: vae.py: fail (")
    assert "eq. (3) KL" in printed


def test_part_b_notebook_warns_about_a_file_that_picks_its_device_itself_and_goes_on(jupyter_env, tmp_path):
    folder = copy_part("A3_PartB", tmp_path)
    shutil.copy(REPO_ROOT / "tests/devices_in_student_files/device_chosen_at_import/diffusion.py", folder)
    printed = run_through(folder, "run_diffusion.ipynb", CHECK_CELL, "")
    assert printed.startswith("WARNING: diffusion.py: portability (48/48 checks passed): ")
    assert "Take the device from the input" in printed


def test_part_b_notebook_run_again_resumes_a_part_cut_short(part_b_run, tmp_path):
    """Run all again where Part 5 has more steps to go than its checkpoint holds (a session cut
    short): Part 5 goes on from its step, and the finished Parts 1 and 2 are not trained again."""
    folder = Path(shutil.copytree(part_b_run[0], tmp_path / "A3_PartB"))
    finished = {part: (folder / f"results/{part}/model.pt").read_bytes() for part in ("part1", "part2")}
    notebook = execute_notebook(folder / "run_diffusion.ipynb", PART_B_SETTINGS + "PART5_STEPS, PART5_EVERY = 4, 2\n")
    part5 = next(cell for cell in notebook.cells if "part5 = train_diffusion(" in cell.source)
    assert "Resuming from step 2 of 4." in "".join(output.get("text", "") for output in part5.outputs)
    assert {part: (folder / f"results/{part}/model.pt").read_bytes() for part in finished} == finished
    assert (folder / "results/part5/sample_1.png").is_file()  # the grid of step 4


def test_part_b_notebook_reads_every_setting_of_its_parameters_cell():
    notebook = nbformat.read(REPO_ROOT / "A3_PartB" / "run_diffusion.ipynb", as_version=4)
    parameters = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    names = re.findall(r"^([A-Z][A-Z0-9_]*) *=", parameters.source, flags=re.MULTILINE)
    rest = "\n".join(cell.source for cell in notebook.cells if cell is not parameters and cell.cell_type == "code")
    assert {"PRECISION", "CHECKPOINT_MINUTES", "RESUME", "TRAIN_ANYWAY"} <= set(names)
    assert [name for name in names if not re.search(rf"\b{name}\b", rest)] == []
