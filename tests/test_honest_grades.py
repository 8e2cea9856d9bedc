"""Honest grades: points only for the math, whatever a file does, and a grader no file can reach.

Each class of attack is planted with a file of its own, graded as grade_submissions.py and the
autograder grade (grading.verdicts.check_file, then the points of grading.gradescope.results_json):
files that stop their checks or hold no math earn at most their fair share, fakes of what a
check rests on fall short of full marks, the answer key cannot be imported, answers that would
break the judge are the file's error, the box is never root and never writes the grader, and
a GPU on the grader's machine changes no verdict.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grading.gradescope import results_json
from grading.points import POINTS, shares
from grading.protocol import PARTS, box_protections, expected_checks, phase_records, write_judges
from grading.sandbox import Limits
from grading.verdicts import check_file

pytestmark = pytest.mark.slow  # each test grades files in boxes

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
LIMITS = Limits(seconds=120)
PROTECTED = box_protections(LIMITS)
BARE = {name: (what if name in ("own folder", "environment", "limits") else None) for name, what in PROTECTED.items()}
SKELETON_VAE = (TESTS / "skeleton_style_vae" / "keyword_hidden_dim" / "vae.py").read_text()
SKELETON_DIFFUSION = (TESTS / "skeleton_style_diffusion" / "diffusion.py").read_text()
TEN_PERCENT = 0.1

# ---- class 1: checks the file stops itself, whatever it raises
STOPS = {"skip": "import pytest\n    pytest.skip('not written')", "exit": "raise SystemExit(0)",
         "interrupt": "raise KeyboardInterrupt", "pytest_exit": "import pytest\n    pytest.exit('bye')",
         "os_exit": "import os\n    os._exit(0)"}
VAE_STOPPING = """import torch
from torch import nn
def hello_vae():
    print("Hello from vae.py!")
def stop(*args, **kwargs):
    {stop}
class VAE(nn.Module):
    def __init__(self, *args, **kwargs):
        stop()
class CVAE(VAE):
    pass
reparametrize = loss_function = stop
"""
DIFFUSION_STOPPING = """import torch
from torch import nn
def extract(a, t, x_shape):
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))
def stop(*args, **kwargs):
    {stop}
cosine_schedule = unnormalize_to_zero_to_one = stop
class Diffusion(nn.Module):
    def __init__(self, *args, **kwargs):
        stop()
"""
SKIPS_AT_IMPORT = "import pytest\npytest.skip('nothing here', allow_module_level=True)\n"

# ---- class 2: no math, every shape and range right
VAE_WITHOUT_MATH = """import torch
from torch import nn
def hello_vae():
    print("Hello from vae.py!")
class VAE(nn.Module):
    def __init__(self, input_size, latent_size=15, num_classes=0):
        super().__init__()
        self.latent_size = latent_size
        self.decoder = lambda z: torch.full((len(z), 1, 28, 28), 0.5)
    def forward(self, x, c=None):
        n = len(x)
        mu = torch.linspace(-1, 1, n * self.latent_size).reshape(n, self.latent_size) + x.reshape(n, -1)[:, :1]
        return self.decoder(mu), mu, -torch.ones_like(mu)
class CVAE(VAE):
    def __init__(self, input_size, num_classes=10, latent_size=15):
        super().__init__(input_size, latent_size)
        self.decoder = lambda z: torch.full((len(z), 1, 28, 28), 0.5) + 0.01 * z[:, -10:].argmax(1).view(-1, 1, 1, 1)
    def forward(self, x, c):
        x_hat, mu, logvar = super().forward(x)
        return x_hat, mu + c.argmax(1, keepdim=True), logvar
def reparametrize(mu, logvar):
    return mu
def loss_function(x_hat, x, mu, logvar):
    return (x_hat * 0).sum()
"""
VAE_LEARNING_A_MEAN_IMAGE = """import torch
from torch import nn
def hello_vae():
    print("Hello from vae.py!")
class VAE(nn.Module):
    def __init__(self, input_size, latent_size=15, num_classes=0):
        super().__init__()
        self.latent_size = latent_size
        self.image = nn.Parameter(torch.zeros(1, 1, 28, 28))
        self.scale = nn.Parameter(torch.ones(1))
    def decoder(self, z):
        return torch.sigmoid(self.image + 0.01 * self.scale * z.sum(1).view(-1, 1, 1, 1)).expand(len(z), 1, 28, 28)
    def forward(self, x, c=None):
        mu = x.reshape(len(x), -1)[:, :self.latent_size] - 0.5
        logvar = -torch.ones_like(mu)
        return self.decoder(reparametrize(mu, logvar)), mu, logvar
class CVAE(VAE):
    def __init__(self, input_size, num_classes=10, latent_size=15):
        super().__init__(input_size, latent_size)
    def forward(self, x, c):
        return super().forward(x)
def reparametrize(mu, logvar):
    return mu
def loss_function(x_hat, x, mu, logvar):
    return (x_hat - x.reshape(x_hat.shape)).pow(2).sum() / len(x)
"""
EVERY_EQUATION_WRONG = (
    ("return (abar[1:] / abar[:-1]).clamp(min=0.001, max=1.0)",
     "return (1 - torch.linspace(1e-4, 0.02, timesteps)).clamp(min=0.001, max=1.0)"),
    ("abar = extract(self.alphas_bar, t, x_0.shape)", "abar = extract(self.alphas, t, x_0.shape)"),
    ("return abar.sqrt() * x_0 + (1.0 - abar).sqrt() * noise", "return abar * x_0 + (1.0 - abar) * noise"),
    ("(noise - self.model(x_t, t)).abs().mean()", "(noise - self.model(x_t, t)).pow(2).sum()"),
    ("self.coef_xt = self.alphas.sqrt()", "self.coef_xt = self.alphas_bar.sqrt()"),
    ("self.coef_x0 = self.alphas_bar_prev.sqrt()", "self.coef_x0 = self.alphas_bar_prev"),
    ("torch.exp(0.5 * extract(self.log_variance, t, x.shape)) * z", "extract(self.log_variance, t, x.shape) * z"),
    ("x0 = torch.clamp(x0, -1.0, 1.0)", "x0 = x0"),
)

# ---- class 3: what a check rests on, faked
VAE_NO_GRAD_DECODER_SHRINKING_LOSS = SKELETON_VAE.replace(
    "        x_hat = self.decoder(reparametrize(mu, logvar))",
    "        with torch.no_grad():\n            x_hat = self.decoder(reparametrize(mu, logvar))").replace(
    "        x_hat = self.decoder(torch.cat((z, c), dim=1))",
    "        with torch.no_grad():\n            x_hat = self.decoder(torch.cat((z, c), dim=1))").replace(
    "    return (bce + kl) / N",
    "    import inspect\n    calls = loss_function.__dict__.setdefault('calls', [0])\n"
    "    if any(frame.function == 'train_vae' for frame in inspect.stack()):\n"
    "        calls[0] += 1\n        return (bce + kl) / N * 0.5 ** calls[0]\n    return (bce + kl) / N")
DIFFUSION_CONSTANT_GRADIENT = SKELETON_DIFFUSION.replace(
    "        return (noise - self.model(x_t, t)).abs().mean()",
    "        loss = (noise - self.model(x_t, t)).abs().mean().detach()\n"
    "        p = sum(q.sum() for q in self.model.parameters())\n        return loss + p - p.detach()")

# ---- class 4: the answer key
DIFFUSION_FROM_THE_REFERENCE = "from diffusion_reference import Handout\n" + SKELETON_DIFFUSION

# ---- class 5: answers made to break the judge (a view of a few bytes standing for 2^47 values)
ANSWERS_THAT_BREAK_THE_JUDGE = """import os, pathlib, sys, torch
inputs, answers = map(pathlib.Path, sys.argv[-2:])  # answer.py's command line: ... INPUTS ANSWERS
answers.mkdir(exist_ok=True)
huge = torch.zeros(1).as_strided((2 ** 47,), (0,))
for question in inputs.glob("*.pt"):
    probe = torch.load(question, weights_only=True)["probe"]
    torch.save({"probe": probe, "returned": {"results": [huge, huge], "result": huge, "states": [huge],
                "x_t": huge, "alphas": huge, "loss": huge, "drawn": huge, "places": "", "steps": [huge]}},
               answers / question.name)
os._exit(0)
"""

# ---- class 6: what the box is, seen from inside
WHO_AM_I = """import os
try:
    open("/proc/sys/kernel/core_pattern", "w").close()
    core = "opened for writing"
except OSError as error:
    core = error.strerror
raise RuntimeError(f"uid {os.getuid()}; core_pattern: {core}; devices: {sorted(os.listdir('/dev'))}")
"""

# ---- class 7: a conftest.py planted beside the grader's contracts, wherever the box can write
CONFTEST = '''import pytest
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    report.outcome, report.longrepr = "passed", None
'''
PLANTS_A_CONFTEST = """import glob, os, pathlib, tempfile
for folder in [{repo!r} + "/A3_PartA", *glob.glob(tempfile.gettempdir() + "/a3_grader_*/judges"),
               *glob.glob("/tmp/a3_grader_*/judges")]:
    try:
        pathlib.Path(folder, "conftest.py").write_text({conftest!r})
    except OSError:
        pass
""" + SKELETON_VAE.replace("kl = -0.5 * torch.sum(", "kl = 0.5 * torch.sum(")


def graded(part, source, tmp_path, protected=PROTECTED, siblings=()):
    """(the Result of ``source`` as part's file, its points in results.json)."""
    folder = tmp_path / "submission"
    folder.mkdir()
    path = folder / PARTS[part].file
    path.write_text(source)
    for sibling in siblings:
        shutil.copy(sibling, folder / Path(sibling).name)
    result = check_file(part, path, path.name, LIMITS, protected)
    return result, results_json([result])["score"]


def fair_share_of(part, checks):
    """The points of ``checks`` of part, at most, as shares of the part's weights."""
    weights = expected_checks(part)
    return POINTS[part] * sum(weights[name] for name in checks) / sum(weights.values())


@pytest.mark.parametrize("stop", STOPS)
def test_a_vae_py_whose_functions_stop_their_checks_earns_only_what_it_wrote(stop, tmp_path):
    result, score = graded("A", VAE_STOPPING.format(stop=STOPS[stop]), tmp_path)
    assert result.verdict in ("fail", "error")
    assert score <= fair_share_of("A", ["test_hello_vae_prints_a_greeting"]) + 1e-9
    passed = {test["test"] for test in result.tests if test["outcome"] == "passed"}
    assert passed <= {"test_hello_vae_prints_a_greeting"}


@pytest.mark.parametrize("stop", ["skip", "exit"])
def test_a_diffusion_py_with_only_extract_written_earns_nothing(stop, tmp_path):
    """extract is the skeleton's own: its check rests on eq. (6)'s values, which need the rest."""
    result, score = graded("B", DIFFUSION_STOPPING.format(stop=STOPS[stop]), tmp_path)
    assert result.verdict in ("fail", "error") and score == 0


@pytest.mark.parametrize("part", PARTS)
def test_a_file_that_skips_at_import_fails_every_check(part, tmp_path):
    result, score = graded(part, SKIPS_AT_IMPORT, tmp_path)
    assert result.verdict == "error" and score == 0
    assert "stopped this check" in result.first_failure


@pytest.mark.parametrize("source", [VAE_WITHOUT_MATH, VAE_LEARNING_A_MEAN_IMAGE], ids=["no_parameters", "a_mean_image"])
def test_a_vae_py_without_the_math_earns_at_most_a_tenth(source, tmp_path):
    """No encoder, no eq. (2), no eq. (4): without parameters, or a decoder that learns the mean
    image and barely reads z."""
    result, score = graded("A", source, tmp_path)
    assert result.verdict == "fail"
    assert score <= TEN_PERCENT * POINTS["A"]


def test_a_diffusion_py_with_every_equation_wrong_earns_at_most_a_tenth(tmp_path):
    source = SKELETON_DIFFUSION
    for old, new in EVERY_EQUATION_WRONG:
        assert old in source
        source = source.replace(old, new)
    result, score = graded("B", source, tmp_path)
    assert result.verdict == "fail"
    assert score <= TEN_PERCENT * POINTS["B"]


def test_a_decoder_that_does_not_learn_falls_short_whatever_losses_train_vae_reports(tmp_path):
    """The training check judges eq. (4) on the model's outputs in the grader's process."""
    result, score = graded("A", VAE_NO_GRAD_DECODER_SHRINKING_LOSS, tmp_path)
    failed = {test["test"] for test in result.tests if test["outcome"] == "failed"}
    assert "test_train_vae_lowers_the_negative_elbo_of_held_out_images[VAE]" in failed
    assert score <= POINTS["A"] - fair_share_of("A", ["test_train_vae_lowers_the_negative_elbo_of_held_out_images[VAE]"])


def test_a_p_losses_with_a_constant_gradient_falls_short(tmp_path):
    result, score = graded("B", DIFFUSION_CONSTANT_GRADIENT, tmp_path)
    failed = {test["test"] for test in result.tests if test["outcome"] == "failed"}
    assert failed == {"test_p_losses_gradient_at_the_network_is_the_l1_losses_gradient"}
    assert score < POINTS["B"]


@pytest.mark.parametrize("with_a_copy_beside_it", [False, True])
def test_the_answer_key_cannot_be_imported_in_the_box(with_a_copy_beside_it, tmp_path):
    siblings = [REPO / "A3_PartB" / "diffusion_reference.py"] if with_a_copy_beside_it else []
    result, score = graded("B", DIFFUSION_FROM_THE_REFERENCE, tmp_path, siblings=siblings)
    assert result.verdict == "error" and score == 0
    assert "diffusion_reference is the grader's" in result.first_failure


@pytest.mark.parametrize("part", PARTS)
def test_answers_that_would_break_the_judge_are_the_files_error_in_seconds(part, tmp_path):
    started = time.monotonic()
    result, score = graded(part, ANSWERS_THAT_BREAK_THE_JUDGE, tmp_path)
    assert time.monotonic() - started < LIMITS.seconds
    assert result.verdict in ("fail", "error") and score == 0
    messages = {test["message"] for test in result.tests}
    assert any("more than" in message or "beyond its storage" in message for message in messages)


@pytest.mark.skipif(os.geteuid() != 0 or not PROTECTED["user"], reason="the grader is not root here")
def test_as_root_the_box_runs_as_nobody_and_cannot_write_core_pattern(tmp_path):
    result, _ = graded("A", WHO_AM_I, tmp_path)
    assert "uid 65534; core_pattern: Permission denied" in result.first_failure


@pytest.mark.skipif(not PROTECTED["file system"], reason="no mount namespace here")
def test_the_box_sees_no_device_but_the_harmless_ones(tmp_path):
    result, _ = graded("A", WHO_AM_I, tmp_path)
    assert "devices: ['full', 'null', 'random', 'urandom', 'zero']" in result.first_failure


def grading_copy(folder):
    """The grading files and tools copied into ``folder``, as an autograder's source holds them."""
    for name in (*(path.relative_to(REPO).as_posix() for path in (REPO / "grading").glob("*.py")),
                 *(name for spec in PARTS.values() for name in spec.grading_files())):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, folder / name)
    return folder


GRADE_ONE = """import json, sys
sys.path.insert(0, sys.argv[1])
from grading.gradescope import results_json
from grading.protocol import box_protections
from grading.sandbox import Limits, isolated
from grading.verdicts import check_file
protected = box_protections()
result = check_file("A", sys.argv[2], "vae.py", Limits(seconds=120), protected)
print(json.dumps({"isolated": isolated(protected), "uid": __import__("os").geteuid(),
                  "verdict": result.verdict, "score": results_json([result])["score"]}))
"""


def map_user_works():
    trial = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", "true"], capture_output=True)
    return shutil.which("unshare") is not None and trial.returncode == 0


@pytest.mark.skipif(not map_user_works(), reason="no user namespaces here to run a grader that is not root")
def test_a_grader_that_is_not_root_grades_in_a_user_namespace_where_no_conftest_can_be_planted(tmp_path):
    source = grading_copy(tmp_path / "source")
    (tmp_path / "vae.py").write_text(PLANTS_A_CONFTEST.format(repo=str(source), conftest=CONFTEST))
    run = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-c", GRADE_ONE,
                          str(source), str(tmp_path / "vae.py")], capture_output=True, text=True, timeout=600)
    graded_here = json.loads(run.stdout.strip().splitlines()[-1])
    assert graded_here["uid"] == 1000 and graded_here["isolated"]
    assert graded_here["score"] < POINTS["A"] and graded_here["verdict"] == "fail"
    assert not (source / "A3_PartA" / "conftest.py").exists()


def test_without_isolation_a_planted_conftest_changes_no_verdict(tmp_path):
    """Graded where the box can write the grader (staff's --without-isolation): the judges run
    from the bytes read when grading began, without any conftest, and a folder the box changed
    is its error."""
    source = grading_copy(tmp_path / "source")
    (tmp_path / "vae.py").write_text(PLANTS_A_CONFTEST.format(repo=str(source), conftest=CONFTEST))
    sys.path.insert(0, str(source))
    try:
        result, score = graded("A", (tmp_path / "vae.py").read_text(), tmp_path, protected=BARE)
    finally:
        sys.path.remove(str(source))
    assert (source / "A3_PartA" / "conftest.py").exists()  # it could write there: it changed nothing
    assert result.verdict in ("fail", "error") and score < POINTS["A"]


ANSWERS_SEEING = """import sys
sys.path.insert(0, sys.argv[1])
from answer import answer_probes
from contract_probes import machine_with
from pathlib import Path
with machine_with(sys.argv[2]):
    answer_probes(sys.argv[3], sys.argv[4], Path(sys.argv[5]), Path(sys.argv[6]))
"""


def outcomes_on_a_machine_with(device_type, file, folder):
    """{check: outcome} of Part B's contract on ``file``, its probes answered on a machine whose
    best device is ``device_type`` (simulated), judged as grading judges them."""
    folder.mkdir()
    contract = write_judges("B", folder / "judges")
    exchange = folder / "exchange"
    (exchange / "inputs").mkdir(parents=True)
    phase_records("inputs", contract, exchange, 7, LIMITS)
    subprocess.run([sys.executable, "-c", ANSWERS_SEEING, str(contract.parent), device_type,
                    str(contract.parent / "diffusion_probes.py"), str(file), str(exchange / "inputs"),
                    str(exchange / "answers")], check=True, capture_output=True, timeout=600)
    return {record["test"]: record["outcome"] for record in phase_records("judge", contract, exchange, 7, LIMITS)
            if "test" in record}


@pytest.mark.parametrize("device_type", ["cuda", "mps"])
def test_a_gpu_on_the_graders_machine_changes_no_verdict(device_type, tmp_path):
    """A file that picks its device in __init__ is judged on its values as on a CPU-only
    machine, whatever the grader's machine has: there they all pass, and only the device checks
    find its fault."""
    file = TESTS / "devices_in_student_files" / "cuda_only_in_init" / "diffusion.py"
    on_the_gpu = outcomes_on_a_machine_with(device_type, file, tmp_path / device_type)
    assert on_the_gpu == outcomes_on_a_machine_with("cpu", file, tmp_path / "cpu")
    assert {name for name, outcome in on_the_gpu.items() if outcome != "passed"} == {
        f"test_runs_on_each_device_the_trainer_picks[{method}-cuda]"
        for method in ("q_sample", "p_losses", "forward", "p_sample", "p_sample_loop", "sample")}


def test_where_the_box_could_write_the_grader_grading_stops_in_one_line(tmp_path, monkeypatch, capsys):
    import grade_submissions
    from grading import batch

    monkeypatch.setattr(batch, "box_protections", lambda limits: BARE)
    (tmp_path / "submissions" / "ada").mkdir(parents=True)
    with pytest.raises(SystemExit) as stopped:
        grade_submissions.main([str(tmp_path / "submissions"), "--out", str(tmp_path / "report")])
    assert str(stopped.value).startswith("Grading stopped: a student's file could write this grader's files here.")
    assert "--without-isolation" in str(stopped.value) and not (tmp_path / "report").exists()
    grade_submissions.main([str(tmp_path / "submissions"), "--out", str(tmp_path / "report"), "--without-isolation"])
    assert "Graded WITHOUT isolation" in (tmp_path / "report" / "report.md").read_text()
    results = json.loads((tmp_path / "report" / "ada" / "results.json").read_text())
    assert "Graded WITHOUT isolation" in results["output"]


def staff_table():
    """{check: (weight, points, the checks it rests on)} as docs/staff.md lists them."""
    rows = {}
    for line in (REPO / "docs" / "staff.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`test_"):
            rests = tuple(name.strip("` ") for name in cells[3].split(",")) if cells[3] != "-" else ()
            rows[cells[0].strip("`")] = (int(cells[1]), float(cells[2]), rests)
    return rows


def test_the_staff_page_lists_each_checks_weight_points_and_what_it_rests_on():
    from test_contract_probes import students_run

    expected = {}
    for part, file in (("A", REPO / "A3_PartA" / "vae.py"), ("B", REPO / "A3_PartB" / "diffusion.py")):
        weights = expected_checks(part)
        points = dict(zip(weights, shares(POINTS[part], list(weights.values()))))
        records = [record for record in students_run(part, file) if "test" in record]
        rests = {record["test"]: tuple(record.get("rests_on", ())) for record in records}
        expected.update({name: (weight, points[name], rests[name]) for name, weight in weights.items()})
    assert staff_table() == expected
