"""Run a contract (A3_PartA/vae_contract.py, A3_PartB/diffusion_contract.py) on a student's
file, in a box of its own, and give one verdict. Shared by make_submission.py and
grade_submissions.py.

Verdicts (VERDICTS): ``pass``; ``portability`` (every check passes, on every device the trainer
picks by default, but the file chooses its device itself instead of from its input: a warning);
``fail`` (a check fails); ``error`` (it does not import, or crashes outside any check);
``timeout``; ``memory``; ``missing`` (no such file).

A student's file is code from a stranger. Each runs in a child process, in a fresh temporary
folder that is its HOME, TMPDIR and working folder, with an environment that holds none of the
caller's variables, under limits on wall time, CPU time, memory, file size and output, and never
as root: as root, the box runs as the unprivileged user ``nobody`` (``setpriv``), which owns only
its folder; without root, in a user namespace whose file system is read-only outside its folder.
Where the machine allows it (``unshare``), it also runs without network, unable to see or signal
other processes, with the file system read-only outside its folder, the homes and the devices
hidden, and (as root, with a cgroup) a cap on its processes: ``protections()`` says which hold
here. Where the box could write the grader (``isolated()`` is false), grading stops
(IsolationMissing) unless staff ask for it without isolation.

The file cannot grade itself: the box holds only the part's probes (never the contract, its
references or its judges), answers each check's probe with data, on inputs the contract drew in
the grader's process from a seed drawn afresh, and the contract judges those answers in a
process that never imports the file (contract_probes.py). Those grading phases run in an
isolated interpreter (``python -I``, no conftest, no plugin), under the box's time and memory
limits, on a copy of the contracts written from the bytes read when grading began, in a folder
of the grader's own that the box cannot reach.

    python submission_checks.py --enter-box CONFIG   (the box's first step, started by run_box)
"""

import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib.util import find_spec, module_from_spec, spec_from_file_location
from pathlib import Path
from typing import NamedTuple

try:
    import resource  # POSIX only: the limits of the box and of the grading phases
except ImportError:
    resource = None

REPO_ROOT = Path(__file__).resolve().parent
VERDICTS = ("pass", "portability", "fail", "error", "timeout", "memory", "missing")


class Part(NamedTuple):
    """What grading one part takes: the file checked, its contract, the variable naming the file,
    the probes the box answers, what else the judge reads and what else the probes read."""

    file: str
    contract: str
    variable: str
    probes: str
    judge_reads: tuple
    probes_read: tuple

    def grading_files(self):
        """The repository paths of every file grading this part runs."""
        return (self.contract, self.probes, *self.judge_reads, *self.probes_read)


PARTS = {
    "A": Part("vae.py", "A3_PartA/vae_contract.py", "A3_VAE", "A3_PartA/vae_probes.py",
              ("A3_PartA/contract_check.py",), ("A3_PartA/contract_probes.py", "A3_PartA/a3_helper.py")),
    "B": Part("diffusion.py", "A3_PartB/diffusion_contract.py", "A3_DIFFUSION", "A3_PartB/diffusion_probes.py",
              ("A3_PartB/diffusion_reference.py", "A3_PartB/contract_check.py"),
              ("A3_PartB/contract_probes.py", "A3_PartB/simulated_devices.py")),
}
SHARED = REPO_ROOT / "A3_PartA"  # contract_check.py and contract_probes.py, the same in A3_PartB
MEMORY_SIGNS = ("MemoryError", "not enough memory", "Cannot allocate memory", "bad_alloc", "out of memory")
FILE_SIZE_SIGNS = ("File too large",)
PIDS_CGROUP = Path("/sys/fs/cgroup/pids")
SIBLING_BYTES = 5 * 2 ** 20  # a .py file beside the checked one, copied with it unless larger
ANSWER_BYTES = 64 * 2 ** 20  # an answer file larger than this is not taken from the box
BOX_USER = 65534  # nobody: the box's user (and group) when the grader is root
KEPT_DEVICES = ("null", "zero", "full", "random", "urandom")  # the only devices a box sees
MiB = 2 ** 20


@functools.cache
def shared(name):
    """contract_check.py (whose reading of a finished run's records this judge shares with the
    notebooks' check) or contract_probes.py, loaded in the grader's process only (a box holds
    one part's copy)."""
    spec = spec_from_file_location(name, SHARED / f"{name}.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PhaseStopped(RuntimeError):
    """A grading phase (contract_probes.py) that did not finish, and how it ended."""


class IsolationMissing(RuntimeError):
    """The box could write the grader on this machine: what is missing and how to get it."""


@dataclass(frozen=True)
class Limits:
    """What one run of a contract may use."""

    seconds: float = 180.0  # wall time
    cpu_seconds: int = 300
    memory_bytes: int = 8 * 2 ** 30  # address space: importing torch alone reserves about 3.3 GB
    file_bytes: int = 16 * MiB  # any file it writes, its printed output included
    processes: int = 256  # threads count too


@dataclass
class Result:
    """The verdict on one file, with what the contract's checks said."""

    part: str
    file: str  # as the caller names it: a path inside the submission
    verdict: str
    passed: int = 0
    total: int = 0
    first_failure: str = ""  # the cause of the verdict, one line; the warning of a portability verdict
    seconds: float = 0.0
    tests: list = field(default_factory=list)  # {"test", "outcome", "message"} per check


@functools.cache
def judge_sources(part):
    """{path in the repository: its bytes} of every file part's grading phases run, read once,
    when grading begins: whatever happens to the repository later, the judges run these."""
    return {relative: (REPO_ROOT / relative).read_bytes() for relative in PARTS[part].grading_files()}


def digests(part):
    """{path in the repository: the sha256 of its bytes} of part's grading files."""
    return {relative: hashlib.sha256(data).hexdigest() for relative, data in judge_sources(part).items()}


def judges_folder(part):
    """{file name: bytes} of the grader's own folder of part's grading files: the files, and an
    empty pytest.ini, so that pytest reads no settings from a folder above it."""
    files = {Path(relative).name: data for relative, data in judge_sources(part).items()}
    return {"pytest.ini": b"[pytest]\n", **files}


def write_judges(part, folder):
    """Write part's grading files, as read when grading began, into the grader's own ``folder``
    (which nothing else writes): the folder's contract."""
    folder.mkdir()
    for name, data in judges_folder(part).items():
        (folder / name).write_bytes(data)
    return folder / Path(PARTS[part].contract).name


def judges_intact(part, folder):
    """Whether ``folder`` holds exactly part's grading files, byte for byte (no conftest.py,
    no cache, nothing planted), as write_judges wrote them."""
    expected = judges_folder(part)
    found = {path.name for path in folder.iterdir()}
    return found == set(expected) and all((folder / name).read_bytes() == data for name, data in expected.items())


@functools.cache
def expected_checks(part):
    """{name: weight} of part's checks, as its box reports them (parametrized ones with their
    parameters), collected from this repository's contract before any file runs: what a file
    is graded on, and how much each check weighs, even when it stops before running them all.
    Collected once per process for the same grading files (each collection starts a Python)."""
    return dict(collected_checks(part, tuple(sorted(digests(part).items()))))


@functools.lru_cache(maxsize=None)
def collected_checks(part, grading_files):
    """``expected_checks`` of part for the grading files of these (path, sha256) pairs."""
    with tempfile.TemporaryDirectory(prefix="a3_collect_") as scratch:
        contract = write_judges(part, Path(scratch) / "judges")
        records = phase_records("collect", contract, Path(scratch), 0, Limits())
    checks = {record["check"]: record["weight"] for record in records if "check" in record}
    if not checks:
        raise RuntimeError(f"could not collect the checks of {PARTS[part].contract}: {records[-3:]}")
    return checks


# ---------------------------------------------------------------- what this machine allows


def protections(limits=Limits()):
    """{protection: what holds on this machine, or None where it does not}, in a fixed order."""
    namespaces = namespaces_work()
    read_only = namespaces and bool(shutil.which("mount")) and bool(shutil.which("setpriv"))
    as_root = os.geteuid() == 0 and bool(shutil.which("setpriv")) and (read_only or python_reachable_by_anyone())
    return {
        "own folder": "a fresh temporary folder as HOME, TMPDIR and working folder, deleted afterwards",
        "environment": "none of the grader's variables (credentials, tokens, keys): PATH and locale only",
        "limits": (f"{limits.seconds:g} s wall time, {limits.cpu_seconds} s CPU time, "
                   f"{limits.memory_bytes / 2 ** 30:g} GiB memory, {limits.file_bytes // MiB} MiB per file "
                   "written (printed output included), the whole process group killed at the end")
                  if can_set_limits() else None,
        "user": (f"the unprivileged user nobody (uid {BOX_USER}), owning only its folder, without any capability"
                 if as_root else "a user namespace of its own, without any capability on this machine"
                 if read_only else None),
        "network": "none (a network namespace of its own)" if namespaces else None,
        "other processes": "cannot see or signal them (a PID namespace of its own)" if namespaces else None,
        "file system": ("read-only outside its folder; your home, /root, /home and the devices but /dev/null, "
                        "zero, full, random and urandom hidden (a mount namespace of its own)") if read_only else None,
        "process count": (f"at most {limits.processes} processes and threads (a pids cgroup)"
                          if as_root and namespaces and pids_cgroup_works() else None),
    }


def isolated(protected):
    """Whether the box can write nothing of the grader's: it runs as an unprivileged user (the
    grader being root), or in a user namespace with the file system read-only outside its folder."""
    return bool(protected["user"]) and (os.geteuid() == 0 or bool(protected["file system"]))


def require_isolation(protected):
    """Raise IsolationMissing, naming what is missing and how to get it, unless ``isolated``."""
    if not isolated(protected):
        raise IsolationMissing(
            "Grading stopped: a student's file could write this grader's files here. Run it as root (a "
            "container or a throw-away VM; needs setpriv from util-linux), or as a user where user namespaces "
            "work (`unshare --user --map-root-user --mount true`), or pass --without-isolation to grade "
            "anyway, every result marked as graded without isolation.")


def python_reachable_by_anyone():
    """Whether every folder above this Python and its packages lets any user through, as the
    box's user needs where no mount namespace shows it them."""
    folders = {Path(folder).resolve() for folder in python_folders()}
    return all(os.stat(folder).st_mode & 0o001 for path in folders for folder in (path, *path.parents))


def can_set_limits():
    return resource is not None


def namespaces_work():
    """Whether ``unshare`` gives a child its own network, mount and PID namespaces here."""
    if sys.platform != "linux" or not shutil.which("unshare"):
        return False
    trial = subprocess.run([*unshare_command(), "true"], capture_output=True)
    return trial.returncode == 0


def unshare_command():
    """The command that starts a child in namespaces of its own (a user namespace if not root)."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]


def pids_cgroup_works():
    return os.access(PIDS_CGROUP, os.W_OK)


# ---------------------------------------------------------------- running a contract in a box


def check_file(part, path, shown_as, limits=Limits(), protected=None):
    """The Result of part's contract on the file at ``path`` (``shown_as`` in messages).

    The file never runs in this process or in one that judges it (contract_probes.py): the
    contract draws each check's inputs in a folder of the grader's own, from a seed drawn
    afresh; the box answers each check's probe; the contract judges the answers there, read as
    data only."""
    if not Path(path).is_file():
        return Result(part, shown_as, "missing", first_failure=f"no {PARTS[part].file} found")
    protected = protections(limits) if protected is None else protected
    box, grader = Path(tempfile.mkdtemp(prefix="a3_box_")), Path(tempfile.mkdtemp(prefix="a3_grader_"))
    cgroup = make_pids_cgroup(limits) if protected["process count"] else None
    try:
        contract = write_judges(part, grader / "judges")
        exchange, seed = grader / "exchange", secrets.randbelow(2 ** 31)
        questions = draw_inputs(contract, exchange, seed, limits)
        config = prepare_box(box, part, Path(path), limits, protected, cgroup, exchange / "inputs")
        started = time.monotonic()
        returncode, timed_out = run_box(box, config, limits, protected, cgroup)
        seconds = round(time.monotonic() - started, 1)
        finished = take_answers(box, exchange / "answers", questions)
        try:
            if not judges_intact(part, contract.parent):
                raise PhaseStopped("the grader's files changed while the box ran")
            records = judged_records(contract, exchange, seed, finished, limits)
        except PhaseStopped as stopped:  # on what the box wrote: its verdict, not the grader's crash
            return Result(part, shown_as, "error", first_failure=f"its answers could not be judged: {stopped}",
                          seconds=seconds)
        log_tail = tail(box / "output.log").replace(str(box), "<box>")
        return judge(part, shown_as, records, returncode, timed_out, log_tail, limits, seconds)
    finally:
        remove_cgroup(cgroup)
        remove_tree(box)
        remove_tree(grader)


def phase_records(phase, contract, exchange, seed, limits):
    """The records of ``contract`` (in the grader's own folder) run in this grading ``phase``
    ("collect", "inputs" or "judge"), in an isolated interpreter of the grader's own that never
    imports the file under test, under the box's time and memory limits."""
    records = exchange / f"{phase}.jsonl"
    command = [sys.executable, "-I", "-B", str(contract.parent / "contract_check.py"), phase, str(contract),
               str(exchange), str(seed), str(records)]
    try:
        run = subprocess.run(command, cwd=contract.parent, capture_output=True, text=True, timeout=limits.seconds,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                             preexec_fn=functools.partial(limit_grading_phase, limits) if can_set_limits() else None)
    except subprocess.TimeoutExpired:
        raise PhaseStopped(f"the {phase} phase of {contract.name} did not finish within {limits.seconds:g} s") from None
    found = read_records(records, exchange)
    if run.returncode not in (0, 1) or not any("done" in record for record in found):
        raise PhaseStopped(f"the {phase} phase of {contract.name} stopped ({how_it_ended(exit_status(run.returncode))}): "
                           f"{last_line(run.stdout + run.stderr)}")
    return found


def limit_grading_phase(limits):
    """A grading phase's limits, in its child before it starts: the box's memory and CPU time."""
    for name, value in (("RLIMIT_AS", limits.memory_bytes), ("RLIMIT_CPU", limits.cpu_seconds), ("RLIMIT_CORE", 0)):
        lower_limit(getattr(resource, name), value)


def lower_limit(which, value):
    """Set a resource limit to ``value``, never above the limit already in force."""
    _, hard = resource.getrlimit(which)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))


def draw_inputs(contract, exchange, seed, limits):
    """Save each check's inputs, drawn from ``seed``, under ``exchange``/inputs: their file names."""
    (exchange / "inputs").mkdir(parents=True)
    drawn = shared("contract_probes").INPUTS_DRAWN
    unexpected = [record for record in phase_records("inputs", contract, exchange, seed, limits)
                  if "test" in record and record["message"] != drawn]
    if unexpected:
        raise RuntimeError(f"checks of {contract.name} ended before drawing their inputs: {unexpected[:3]}")
    return sorted(path.name for path in (exchange / "inputs").glob("*.pt"))


def take_answers(box, answers, questions):
    """Copy the box's answers to ``questions`` (and the one saying the file did not import) into
    ``answers``: regular files of at most ANSWER_BYTES only, at their own place in the box,
    nothing else of it. Whether the box answered them all (or the import's failure, which ends
    its run)."""
    answers.mkdir()
    given = box.resolve() / "home" / "answers"
    import_answer = f"{shared('contract_probes').IMPORT_ANSWER}.pt"
    for name in (*questions, import_answer):
        path = box / "home" / "answers" / name
        if (path.resolve() == given / name and path.is_file() and not path.is_symlink()
                and path.stat().st_size <= ANSWER_BYTES):
            shutil.copyfile(path, answers / name)
    return (answers / import_answer).is_file() or all((answers / name).is_file() for name in questions)


def judged_records(contract, exchange, seed, finished, limits):
    """The records of the judge phase: one per check the box answered, then ``{"done": True}``
    if it answered them all, else ``{"running": the first check it did not answer}`` where it
    answered some (one that answered none stopped on importing the file)."""
    not_answered = shared("contract_probes").NOT_ANSWERED
    records = phase_records("judge", contract, exchange, seed, limits)
    kept = [record for record in records if "done" not in record and record.get("message") != not_answered]
    skipped = [record["test"] for record in records if record.get("message") == not_answered]
    running = [{"running": skipped[0]}] if skipped and any("test" in record for record in kept) else []
    return kept + ([{"done": True}] if finished else running)


def prepare_box(box, part, path, limits, protected, cgroup, inputs):
    """Copy the part's probes, what they read, the checks' ``inputs`` and the student's file,
    with the .py files beside it but for the grader's own (contract_probes.JUDGES_ONLY), into
    ``box``/check, readable by the box's user; make ``box``/home, the one folder the box's
    user owns; return the box's settings."""
    spec = PARTS[part]
    check = box / "check"
    for relative in (spec.probes, *spec.probes_read):
        (check / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / relative, check / relative)
    shutil.copy(Path(__file__), check / "submission_checks.py")
    (check / "submission").mkdir()
    judges_only = {f"{name}.py" for name in shared("contract_probes").JUDGES_ONLY}
    for sibling in path.parent.glob("*.py"):  # what it may import, as it does beside them in its part
        if (sibling.is_file() and not sibling.is_symlink() and sibling.stat().st_size <= SIBLING_BYTES
                and sibling.name not in judges_only):
            shutil.copy(sibling, check / "submission" / sibling.name)
    shutil.copy(path, check / "submission" / spec.file)
    shutil.copytree(inputs, check / "inputs")
    (box / "home" / "tmp").mkdir(parents=True)
    config = {"probes": str(check / spec.probes), "file": str(check / "submission" / spec.file),
              "inputs": str(check / "inputs"), "answers": str(box / "home" / "answers"), "home": str(box / "home"),
              "limits": vars(limits), "read_only": bool(protected["file system"]),
              "unprivileged": bool(protected["user"]) and os.geteuid() == 0,
              "cgroup": str(cgroup) if cgroup else None, "hidden": folders_to_hide(box),
              "python": sorted(python_folders())}
    (check / "config.json").write_text(json.dumps(config))
    hand_over(box)
    return check / "config.json"


def hand_over(box):
    """As root: ``box`` and its check folder readable, its home owned by the box's user alone."""
    if os.geteuid() != 0:
        return
    for folder, _, files in os.walk(box):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(Path(folder) / name, 0o644)
    for folder, _, files in os.walk(box / "home"):
        os.chown(folder, BOX_USER, BOX_USER)
        os.chmod(folder, 0o700)
        for name in files:
            os.chown(Path(folder) / name, BOX_USER, BOX_USER)


def run_box(box, config, limits, protected, cgroup):
    """Run the box's child to its end or its wall time; (its return code, whether it timed out)."""
    command = [sys.executable, str(box / "check" / "submission_checks.py"), "--enter-box", str(config)]
    if protected["network"]:
        command = unshare_command() + command
    with open(box / "output.log", "wb") as log:
        child = subprocess.Popen(command, cwd=box / "home", env=box_environment(box / "home"),
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        child.wait(timeout=limits.seconds)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
    kill_box(child, cgroup)  # all of it at its time limit, else what it left running
    return exit_status(child.returncode), timed_out


def exit_status(returncode):
    """A return code as a shell gives it: 128 + the number of the signal that ended a process."""
    return 128 - returncode if returncode < 0 else returncode


def kill_box(child, cgroup):
    """Kill the child's process group and every process left in its cgroup, and reap the child."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(child.pid, signal.SIGKILL)
        else:  # Windows has no process groups
            child.kill()
    except (ProcessLookupError, PermissionError):
        pass
    for pid in processes_of(cgroup):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    child.wait()


def folders_to_hide(box):
    """The home folders the box must not read (the caller's, /root, /home), but one holding the box."""
    homes = {str(Path.home()), "/root", "/home"}
    return sorted(home for home in homes if Path(home).is_dir() and not box.resolve().is_relative_to(Path(home).resolve()))


def python_folders():
    """The folders of this Python and of the packages the contracts import."""
    interpreter = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent)}
    return interpreter | package_folders()


def package_folders():
    """The folders holding torch, pytest and matplotlib."""
    return {str(Path(find_spec(name).origin).parents[1]) for name in ("torch", "pytest", "matplotlib")
            if find_spec(name) is not None}


def box_environment(home):
    """The child's whole environment: nothing of the caller's but PATH, and the packages'
    folders (torch, pytest, matplotlib) in case they sit where a fresh HOME does not look."""
    packages = package_folders()
    return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": str(home), "TMPDIR": str(home / "tmp"), "XDG_CACHE_HOME": str(home / ".cache"),
            "MPLCONFIGDIR": str(home / ".matplotlib"), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": os.pathsep.join(sorted(packages))}


def make_pids_cgroup(limits):
    """A new pids cgroup allowing ``limits.processes``; the child joins it."""
    cgroup = PIDS_CGROUP / f"a3_box_{uuid.uuid4().hex[:12]}"
    cgroup.mkdir()
    (cgroup / "pids.max").write_text(str(limits.processes))
    return cgroup


def processes_of(cgroup):
    if cgroup is None or not cgroup.is_dir():
        return []
    return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]


def remove_cgroup(cgroup):
    """Remove the cgroup once its last process is gone (the kernel takes a moment)."""
    for _ in range(100):
        if cgroup is None or not cgroup.exists():
            return
        try:
            cgroup.rmdir()
        except OSError:
            time.sleep(0.02)


def remove_tree(folder):
    """Delete ``folder`` even where the child took away permissions inside it."""
    def allow_and_retry(function, path, _error):
        for item in (os.path.dirname(path), path):
            os.chmod(item, 0o700)
        function(path)
    shutil.rmtree(folder, onerror=allow_and_retry)


def read_records(path, box):
    """The records a Recorder wrote, one JSON object a line (a cut last line dropped), the
    folder ``box`` written ``<box>`` in them."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").replace(str(box), "<box>").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def tail(path, size=4000):
    """The last ``size`` bytes of a file, as text."""
    with open(path, "rb") as stream:
        stream.seek(max(0, stream.seek(0, os.SEEK_END) - size))
        return stream.read().decode(errors="replace")


# ---------------------------------------------------------------- verdicts


def judge(part, shown_as, records, returncode, timed_out, log_tail, limits, seconds):
    """The Result of one box's run, from what its Recorder wrote and how the child ended."""
    tests = [record for record in records if "test" in record]
    failures = [record for record in tests if record["outcome"] in ("failed", "error")]
    result = Result(part, shown_as, "pass", sum(record["outcome"] == "passed" for record in tests),
                    len(tests), seconds=seconds, tests=tests)
    result.verdict, result.first_failure = verdict(returncode, timed_out, records, failures, log_tail, limits)
    return result


def verdict(returncode, timed_out, records, failures, log_tail, limits):
    """(verdict, its cause in one line). A signal that ended the box's contract comes as the
    return code 128 + its number."""
    finished = any("done" in record for record in records)
    running = "".join(f" (running {record['running']}...)" for record in records if "running" in record)
    causes = [failure["message"] for failure in failures] + ([] if finished else [last_line(log_tail)])
    if timed_out or returncode == 128 + getattr(signal, "SIGXCPU", -128):  # POSIX only, as SIGXFSZ
        used = f"{limits.seconds:g} s" if timed_out else f"{limits.cpu_seconds} s of CPU time"
        return "timeout", f"did not finish within {used}: stopped{running}"
    if returncode == 128 + getattr(signal, "SIGXFSZ", -128) or any(sign in cause for cause in causes for sign in FILE_SIZE_SIGNS):
        return "error", f"wrote more than {limits.file_bytes // MiB} MiB to one file (printed output counts): stopped"
    if any(sign in cause for cause in causes for sign in MEMORY_SIGNS):
        return "memory", f"ran out of memory (limit {limits.memory_bytes / 2 ** 30:g} GiB): {first_with_memory(causes)}"
    if not finished:
        return "error", f"stopped before its checks finished ({how_it_ended(returncode)}){running}: {last_line(log_tail)}"
    verdict_name, _, _, cause = shared("contract_check").finished_verdict(records)
    return verdict_name, cause


def first_with_memory(causes):
    return next(cause for cause in causes if any(sign in cause for sign in MEMORY_SIGNS))


def how_it_ended(returncode):
    """'killed by SIGKILL' for a return code of 128 + a signal's number, else 'exit status N'."""
    names = {number.value: number.name for number in signal.Signals}
    if returncode - 128 in names:
        return f"killed by {names[returncode - 128]}"
    return f"exit status {returncode}"


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# ---------------------------------------------------------------- inside the box


def enter_box(config_path):
    """The child's first step: join the cgroup, make the file system read-only outside home with
    the homes and devices hidden, set the limits, then answer the probes in a child of its own,
    without any capability, as the unprivileged user where the grader is root. Exit as that child
    did, a signal that ended it as 128 + its number (``unshare`` hides signals, and so reports them)."""
    config = json.loads(Path(config_path).read_text())
    if config["cgroup"]:
        Path(config["cgroup"], "cgroup.procs").write_text("0")  # 0: this process
    if config["read_only"]:
        staging = Path(config["home"]).parent / "kept"
        hide_homes(config["hidden"], config["python"], staging)
        hide_devices(staging / "devices")
        make_read_only_outside(config["home"])
    if can_set_limits():
        set_limits(config["limits"], shared_user=config["unprivileged"])
    user = [f"--reuid={BOX_USER}", f"--regid={BOX_USER}", "--clear-groups"] if config["unprivileged"] else []
    without_capabilities = ["setpriv", *user, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]
    contract = subprocess.run([*(without_capabilities if config["read_only"] or user else []),
                               sys.executable, __file__, "--answer-probes", config_path])
    sys.exit(exit_status(contract.returncode))


def set_limits(limits, shared_user):
    """The box's resource limits, inherited by everything it starts. Processes count per user:
    where every box runs as the one unprivileged user, they share a cap of ``processes`` for
    each CPU (as many boxes as run at once by default)."""
    cpu = limits["cpu_seconds"]
    processes = limits["processes"] * ((os.cpu_count() or 1) if shared_user else 1)
    for name, soft, hard in [("RLIMIT_AS", limits["memory_bytes"], limits["memory_bytes"]),
                             ("RLIMIT_CPU", cpu, cpu + 5),  # SIGXCPU at the soft limit, SIGKILL at the hard one
                             ("RLIMIT_FSIZE", limits["file_bytes"], limits["file_bytes"]),
                             ("RLIMIT_NPROC", processes, processes), ("RLIMIT_CORE", 0, 0)]:
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (AttributeError, ValueError, OSError):  # a limit this system does not have or lower
            pass


def hide_homes(homes, python, staging):
    """In this mount namespace: each of ``homes`` behind an empty file system in memory, but the
    ``python`` folders inside them, bound back in place (through ``staging``, as the empty file
    system hides the originals)."""
    kept = [folder for folder in python if any(Path(folder).is_relative_to(home) for home in homes)]
    for index, folder in enumerate(kept):
        (staging / str(index)).mkdir(parents=True)
        subprocess.run(["mount", "--rbind", folder, str(staging / str(index))], check=True)
    for home in homes:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=755", "hidden_home", home], check=True)
    for index, folder in enumerate(kept):
        Path(folder).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--rbind", str(staging / str(index)), folder], check=True)


def hide_devices(staging):
    """In this mount namespace: /dev behind an empty file system but for KEPT_DEVICES, each
    bound back in place through ``staging``, which is then let go."""
    staging.mkdir(parents=True)
    for name in KEPT_DEVICES:
        (staging / name).touch()
        subprocess.run(["mount", "--bind", f"/dev/{name}", str(staging / name)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=755", "hidden_devices", "/dev"], check=True)
    for name in KEPT_DEVICES:
        Path("/dev", name).touch()
        subprocess.run(["mount", "--bind", str(staging / name), f"/dev/{name}"], check=True)
        subprocess.run(["umount", str(staging / name)], check=True)


def make_read_only_outside(home):
    """In this mount namespace: every mount read-only, but ``home`` (bound onto itself), /proc
    and what hide_devices hid below /dev."""
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "--bind", home, home], check=True)
    for mount_point, options in mounts():
        if mount_point != home and not mount_point.startswith(("/proc", "/dev/")) and "ro" not in options:
            subprocess.run(["mount", "-o", "remount,bind,ro", mount_point], check=True)


def mounts():
    """(mount point, its options) of every mount of this namespace."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")  # spaces come as \040
        found.append((point, fields[5].split(",")))
    return found


def answer_probes(config):
    """Answer each check's probe on the file, one file of data per check in home/answers."""
    sys.path.insert(0, str(Path(config["probes"]).parent))
    from contract_probes import answer_probes as answer

    answer(config["probes"], config["file"], Path(config["inputs"]), Path(config["answers"]))


if __name__ == "__main__":
    step, config_file = sys.argv[1:3]
    if step == "--enter-box":
        enter_box(config_file)
    elif step == "--answer-probes":
        answer_probes(json.loads(Path(config_file).read_text()))
