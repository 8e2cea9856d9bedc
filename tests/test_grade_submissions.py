"""grade_submissions.py: fair verdicts on submissions in the layouts students use, and hostile
ones kept in their box.

One batch is graded once for the module (each file checked costs a torch import in a child
process): correct and buggy files of the contracts' fair-and-sharp tests, the two public-style
device files, files that loop, hog memory, print megabytes, exit, kill their parent, fork or
snoop, and zips that are malicious or broken. Each test reads its row. A hostile case whose
protection this machine does not give (grading.sandbox.protections) is left out of the batch,
so that it cannot harm the machine; every protection reported as in force is checked to hold.
"""

import csv
import json
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

from grading.batch import COLUMNS, grade
from grading.protocol import box_protections
from grading.sandbox import Limits, MiB
from grading.submissions import Refused, unpack

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
OURS_DIFFUSION = (REPO / "A3_PartB" / "diffusion.py").read_text()
STUDENT_VAE = (TESTS / "skeleton_style_vae" / "keyword_hidden_dim" / "vae.py").read_text()
KL_SIGN_FLIPPED = STUDENT_VAE.replace("kl = -0.5 * torch.sum(", "kl = 0.5 * torch.sum(")
DEVICE_CHOSEN_AT_IMPORT = (TESTS / "devices_in_student_files" / "device_chosen_at_import" / "diffusion.py").read_text()
CUDA_ONLY_IN_INIT = (TESTS / "devices_in_student_files" / "cuda_only_in_init" / "diffusion.py").read_text()
LIMITS = Limits(seconds=120, cpu_seconds=20, memory_bytes=5 * 2 ** 30, file_bytes=4 * MiB, processes=64)
PROTECTED = box_protections(LIMITS)
SECRET = "A3_GRADER_API_KEY"

LOOPS = "while True:\n    pass\n"
HOGS_MEMORY = "chunks = []\nwhile True:\n    chunks.append(bytearray(256 * 2 ** 20))\n"
PRINTS_MEGABYTES = "for _ in range(64):\n    print('x' * 2 ** 17)\n"
EXITS = "import os\nos._exit(3)\n"
KILLS_PARENT = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)\n"
FORKS = """import os, time
children = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(600)
            os._exit(0)
        children += 1
except OSError as error:
    raise RuntimeError(f"forked {children} processes, then {error}")
"""
SNOOPS = """import os, pathlib, socket
seen = []
try:
    pathlib.Path({home!r}, "stolen.txt").write_text("x")
    seen.append("home: written")
except OSError as error:
    seen.append(f"home: {{error.strerror}}")
seen.append("secrets: " + ",".join(sorted(name for name in os.environ if "KEY" in name or "TOKEN" in name)))
try:
    seen.append("credentials: " + pathlib.Path({home!r}, ".netrc").read_text())
except OSError as error:
    seen.append(f"credentials: {{error.strerror}}")
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2)
    seen.append("network: connected")
except OSError as error:
    seen.append(f"network: {{error}}")
raise RuntimeError("; ".join(seen))
"""


def write_zip(path, entries):
    """A zip at ``path`` holding ``entries`` (name -> text or bytes)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return path


def symlink_zip(path, name, target):
    """A zip whose one entry ``name`` is a symbolic link to ``target``."""
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(info, target)
    return path


def patched_zip(path, entries, old, new):
    """A zip of ``entries`` with the bytes ``old`` replaced by ``new`` (of the same length)."""
    write_zip(path, entries)
    path.write_bytes(path.read_bytes().replace(old, new))
    return path


def encrypted_zip(path):
    """A zip whose entry says it is encrypted (flag bit 0, in both of its headers)."""
    write_zip(path, {"vae.py": STUDENT_VAE})
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(signature) + offset] |= 0x1
    path.write_bytes(bytes(data))
    return path


def hostile_cases(home, port):
    """{submission: vae.py} for every hostile file whose protection holds here."""
    cases = {"dave_loops": LOOPS, "erin_hogs_memory": HOGS_MEMORY, "frank_prints_megabytes": PRINTS_MEGABYTES,
             "grace_exits": EXITS, "heidi_kills_her_parent": KILLS_PARENT,
             "judy_snoops": SNOOPS.format(home=str(home), port=port)}
    if PROTECTED["process count"]:
        cases["ivan_forks"] = FORKS
    return cases


def make_submissions(folder, home, port):
    """Every submission of the batch, in ``folder``."""
    folder.mkdir()
    write_zip(folder / "alice.zip", {
        "alice_A3/A3_PartA/vae.py": KL_SIGN_FLIPPED,
        "alice_A3/A3_PartB/diffusion.py": "from alice_constants import S  # her own file\n" + OURS_DIFFUSION,
        "alice_A3/A3_PartB/alice_constants.py": "S = 0.008\n", "__MACOSX/diffusion.py": b"\x00\x05\x16\x07",
        "alice_A3/.ipynb_checkpoints/vae.py": "raise SystemExit('an old copy')\n"})
    (folder / "bob").mkdir()
    (folder / "bob" / "diffusion.py").write_text(DEVICE_CHOSEN_AT_IMPORT)
    write_zip(folder / "carol.zip", {"carol\\A3_PartB\\diffusion.py": CUDA_ONLY_IN_INIT})  # a Windows tool's names
    for name, source in hostile_cases(home, port).items():
        write_zip(folder / f"{name}.zip", {"A3_PartA/vae.py": source})
    write_malicious_zips(folder)


def write_malicious_zips(folder):
    """The zips that must be refused, or give a row with the reason, without a check run."""
    write_zip(folder / "zip_slip.zip", {"../../escaped.py": "x = 1\n", "vae.py": STUDENT_VAE})
    write_zip(folder / "absolute_path.zip", {"/tmp/a3_absolute_escaped.py": "x = 1\n"})
    symlink_zip(folder / "symlink.zip", "A3_PartA/vae.py", "/etc/passwd")
    write_zip(folder / "zip_bomb.zip", {"A3_PartA/vae.py": b"\0" * (20 * MiB)})
    (folder / "corrupt.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    encrypted_zip(folder / "encrypted.zip")
    write_zip(folder / "empty.zip", {})
    patched_zip(folder / "latin1_names.zip", {"Ubung/notes.txt": "x"}, b"Ubung", "Übung".encode("latin-1"))


def boxes_left():
    return {path.name for path in Path(tempfile.gettempdir()).glob("a3_box_*")}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Grade the batch, with a fake HOME and a secret in the grader's environment and a server
    listening on the loopback; rows by (submission, part), the report folder, the fake home."""
    root = tmp_path_factory.mktemp("grading")
    home = root / "grader_home"
    home.mkdir()
    (home / ".netrc").write_text("machine api.wandb.ai password hunter2\n")
    server = socket.create_server(("127.0.0.1", 0))
    make_submissions(root / "submissions", home, server.getsockname()[1])
    boxes_before = boxes_left()
    with pytest.MonkeyPatch.context() as environment, server:
        environment.setenv("HOME", str(home))
        environment.setenv(SECRET, "hunter2")
        grade(root / "submissions", root / "report", LIMITS, jobs=2, progress=False)
    with open(root / "report" / "report.csv", newline="") as stream:
        rows = {(row["submission"], row["part"]): row for row in csv.DictReader(stream)}
    return {"rows": rows, "report": root / "report", "home": home, "root": root,
            "boxes_left": boxes_left() - boxes_before}


def row(graded, submission, part):
    return graded["rows"][(submission, part)]


# ---- the report


def test_report_csv_has_exactly_the_columns_one_row_per_submission_and_part(graded):
    with open(graded["report"] / "report.csv", newline="") as stream:
        header = next(csv.reader(stream))
    assert tuple(header) == COLUMNS
    names = {name for name, _ in graded["rows"]}
    assert set(graded["rows"]) == {(name, part) for name in names for part in "AB"}


def test_report_md_counts_each_verdict_and_says_which_protections_were_in_force(graded):
    text = (graded["report"] / "report.md").read_text()
    verdicts = [row["verdict"] for row in graded["rows"].values()]
    assert f"pass: {verdicts.count('pass')} | portability: {verdicts.count('portability')} | fail: {verdicts.count('fail')}" in text
    for name, what in PROTECTED.items():
        assert (f"- {name}: {what}" if what else f"- {name}: **not in force**") in text
    assert "| alice | B | alice_A3/A3_PartB/diffusion.py | pass |" in text


def test_results_json_is_a_gradescope_autograder_result(graded):
    results = json.loads((graded["report"] / "alice" / "results.json").read_text())
    assert {"name", "score", "max_score", "output"} <= set(results["tests"][0])
    kl = [test for test in results["tests"] if "test_loss_kl_term" in test["name"]]
    assert kl[0]["name"].startswith("Part A (vae.py): ") and kl[0]["score"] == 0 and "eq. (3)" in kl[0]["output"]
    assert results["score"] == round(sum(test["score"] for test in results["tests"]), 2)


# ---- fair verdicts, in the layouts students use


def test_a_correct_file_in_nested_folders_importing_a_file_beside_it_passes_every_check(graded):
    alice = row(graded, "alice", "B")
    assert (alice["verdict"], alice["file"]) == ("pass", "alice_A3/A3_PartB/diffusion.py")
    assert alice["passed"] == alice["total"] != "0"


def test_a_buggy_file_fails_with_the_first_failing_check_and_its_cause(graded):
    """__MACOSX/ and .ipynb_checkpoints/ hold shallower files of the same name, ignored."""
    alice = row(graded, "alice", "A")
    assert (alice["verdict"], alice["file"]) == ("fail", "alice_A3/A3_PartA/vae.py")
    assert alice["first_failure"].startswith("test_loss_kl_term_is_eq_3_summed_over_latent_dimensions")


def test_a_device_chosen_at_import_is_a_portability_warning_with_the_line_and_the_fix(graded):
    bob = row(graded, "bob", "B")
    assert (bob["verdict"], bob["file"], bob["passed"]) == ("portability", "diffusion.py", bob["total"])
    assert "at diffusion.py:" in bob["first_failure"] and "device=DEVICE" in bob["first_failure"]
    assert "Take the device from the input (x.device)" in bob["first_failure"]


def test_a_file_that_crashes_at_construction_on_cuda_fails_with_its_init_line(graded):
    carol = row(graded, "carol", "B")
    assert (carol["verdict"], carol["file"]) == ("fail", "carol/A3_PartB/diffusion.py")
    assert "building the Diffusion on CUDA: torch.cat at diffusion.py:" in carol["first_failure"]
    assert "torch.cat([torch.tensor([1.0]), self.alphas_cumprod[:-1]])" in carol["first_failure"]


def test_a_part_without_its_file_is_missing(graded):
    assert row(graded, "bob", "A")["verdict"] == "missing"
    assert row(graded, "bob", "A")["first_failure"] == "no vae.py in the submission"


# ---- hostile files: each in its own row, nothing outside its box changed


def test_a_file_that_loops_forever_is_a_timeout(graded):
    dave = row(graded, "dave_loops", "A")
    assert dave["verdict"] == "timeout" and "did not finish within" in dave["first_failure"]


def test_a_file_that_allocates_without_end_runs_out_of_memory(graded):
    assert row(graded, "erin_hogs_memory", "A")["verdict"] == "memory"


def test_a_file_that_prints_megabytes_is_stopped_at_the_file_size_limit(graded):
    frank = row(graded, "frank_prints_megabytes", "A")
    assert (frank["verdict"], frank["first_failure"]) == (
        "error", "wrote more than 4 MiB to one file (printed output counts): stopped")


def test_a_file_that_exits_at_import_is_an_error_with_its_exit_status(graded):
    grace = row(graded, "grace_exits", "A")
    assert grace["verdict"] == "error" and "exit status 3" in grace["first_failure"]


def test_a_file_that_kills_its_parent_and_its_process_group_only_ends_its_own_check(graded):
    """Its parent is the box's supervisor (in a PID namespace, its init, which it cannot kill; as
    root, a process of another user, which it may not signal), never the grader, whose batch
    goes on."""
    heidi = row(graded, "heidi_kills_her_parent", "A")
    assert heidi["verdict"] == "error"
    assert any(sign in heidi["first_failure"] for sign in ("killed by SIGKILL", "Operation not permitted"))


@pytest.mark.skipif(not PROTECTED["process count"], reason="no pids cgroup here: left out of the batch")
def test_a_file_that_forks_without_end_is_stopped_at_the_process_limit(graded):
    ivan = row(graded, "ivan_forks", "A")
    assert ivan["verdict"] == "error" and "Resource temporarily unavailable" in ivan["first_failure"]
    forked = int(ivan["first_failure"].split("forked ")[1].split(" ")[0])
    assert forked < LIMITS.processes


def test_a_file_sees_none_of_the_graders_secrets(graded):
    assert "secrets: ;" in row(graded, "judy_snoops", "A")["first_failure"]


@pytest.mark.skipif(not PROTECTED["file system"], reason="the file system is not read-only here")
def test_a_file_cannot_write_to_the_graders_home(graded):
    """Read-only outside its folder; as root, the box's user may not enter the grader's folders."""
    cause = row(graded, "judy_snoops", "A")["first_failure"]
    assert "home: Read-only file system" in cause or "home: Permission denied" in cause
    assert [path.name for path in graded["home"].iterdir()] == [".netrc"]


@pytest.mark.skipif(not PROTECTED["file system"], reason="the file system is not read-only here")
def test_a_file_cannot_read_the_graders_home(graded):
    cause = row(graded, "judy_snoops", "A")["first_failure"]
    assert ("credentials: No such file or directory" in cause or "credentials: Permission denied" in cause)
    assert "hunter2" not in cause


@pytest.mark.skipif(not PROTECTED["network"], reason="no network namespace here")
def test_a_file_cannot_reach_the_network(graded):
    cause = row(graded, "judy_snoops", "A")["first_failure"]
    assert "network: " in cause and "network: connected" not in cause


def test_no_box_is_left_behind(graded):
    assert graded["boxes_left"] == set()


# ---- zips from strangers


@pytest.mark.parametrize("submission, reason", [
    ("zip_slip", "entry '../../escaped.py' would be written outside the submission's folder"),
    ("absolute_path", "entry '/tmp/a3_absolute_escaped.py' would be written outside the submission's folder"),
    ("zip_bomb", "it is compressed more than 200 times (a zip bomb?)"),
    ("corrupt", "not a readable zip (File is not a zip file)"),
    ("encrypted", "the zip is encrypted (password-protected)"),
    ("empty", "the zip is empty"),
])
def test_a_zip_that_cannot_be_trusted_or_read_is_refused_in_both_rows_with_the_reason(graded, submission, reason):
    for part in "AB":
        assert (row(graded, submission, part)["verdict"], row(graded, submission, part)["first_failure"]) == (
            "error", f"zip refused: {reason}")


def test_nothing_is_written_outside_the_extraction_folder(graded):
    assert not (graded["root"] / "escaped.py").exists() and not Path("/tmp/a3_absolute_escaped.py").exists()


def test_a_symbolic_link_is_not_followed(graded):
    assert row(graded, "symlink", "A")["verdict"] == "missing"


def test_names_in_another_encoding_are_said_in_the_row(graded):
    cause = row(graded, "latin1_names", "A")["first_failure"]
    assert cause.startswith("no vae.py in the submission; its names are not UTF-8 (e.g. '")


def test_a_zip_with_too_many_entries_is_refused(tmp_path):
    too_many = write_zip(tmp_path / "many.zip", {f"file_{index}.txt": "" for index in range(2001)})
    with pytest.raises(Refused, match="2001 entries, more than 2000"):
        unpack(too_many, tmp_path / "unpacked")


def test_an_entry_holding_more_than_its_header_says_is_refused(tmp_path):
    """A zip bomb may lie about its sizes: no more than the header says is read."""
    six_hundred, sixteen = (600).to_bytes(4, "little"), (16).to_bytes(4, "little")
    lying = patched_zip(tmp_path / "lying.zip", {"vae.py": "x = 1\n" * 100}, six_hundred, sixteen)
    (tmp_path / "unpacked").mkdir()
    with pytest.raises(Refused, match="Bad CRC-32"):
        unpack(lying, tmp_path / "unpacked")


# ---- the command line


@pytest.mark.slow
def test_the_same_folder_gives_the_same_report_twice_from_the_command_line(tmp_path):
    """Zips refused or without the files: no check runs, so the whole report can be compared."""
    (tmp_path / "submissions").mkdir()
    write_malicious_zips(tmp_path / "submissions")
    reports = []
    for run in ("first", "second"):
        finished = subprocess.run([sys.executable, str(REPO / "grade_submissions.py"), str(tmp_path / "submissions"),
                                   "--out", str(tmp_path / run)], capture_output=True, text=True, cwd=tmp_path)
        assert finished.returncode == 0, finished.stderr
        reports.append([(tmp_path / run / name).read_text() for name in ("report.csv", "report.md")])
    assert reports[0] == reports[1]
    assert "error 12, missing 4" in finished.stdout
