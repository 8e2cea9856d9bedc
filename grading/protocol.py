"""How one file is checked against its part's contract without ever running in the process
that judges it: what each phase runs, where, and what passes between them. Nothing here is
about Linux; the box is sandbox.py's.

1. **Collect** (once per process and grading files, ``expected_checks``): each check's name and
   weight, before any file runs.
2. **Inputs**: in a folder of the grader's own (``write_judges``), each check draws its inputs
   from a seed drawn afresh (``draw_inputs``).
3. **Answers**: the box holds the part's probes, answer.py, the inputs and the student's file
   with the .py files beside it, never the contract, its references or the judges
   (exchange.JUDGES_ONLY); there the file answers each check's probe (``prepare_box``). Only
   the answers are taken from it (``take_answers``).
4. **Judge**: in the grader's folder again, its files checked unchanged (``judges_intact``),
   each check judges its answer, read as data (``judged_records``).

Phases 1, 2 and 4 run phase.py in a process of their own, under the box's memory and CPU
limits, on the grading files as read when grading began (``judge_sources``).
"""
import functools
import hashlib
import json
import multiprocessing
import os
import secrets
import shutil
import sys
import tempfile
import time
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path
from typing import NamedTuple

from grading.exchange import IMPORT_ANSWER, INPUTS_DRAWN, JUDGES_ONLY, NOT_ANSWERED
from grading.sandbox import (Limits, can_set_limits, exit_status, how_it_ended, limit_child, new_box, protections,
                             remove_tree, run_in_box)

REPO_ROOT = Path(__file__).resolve().parents[1]
BOX_PACKAGES = ("torch", "pytest", "matplotlib")  # what the probes import
JUDGE_TOOLS = ("grading/phase.py", "grading/exchange.py")  # run beside a contract in the grader's folder
BOX_TOOLS = ("grading/answer.py", "grading/exchange.py")  # run beside the probes in the box
SIBLING_BYTES = 5 * 2 ** 20  # a .py file beside the checked one, copied with it unless larger
ANSWER_BYTES = 64 * 2 ** 20  # an answer file larger than this is not taken from the box


class Part(NamedTuple):
    """What grading one part takes: the file checked, its contract, the variable naming the file,
    the probes the box answers, what else the judge reads and what else the probes read."""

    file: str
    contract: str
    variable: str
    probes: str
    judge_reads: tuple
    probes_read: tuple

    def box_files(self):
        """The repository paths of every file the box holds but the student's."""
        return (self.probes, *self.probes_read, *BOX_TOOLS)

    def grading_files(self):
        """The repository paths of every file grading this part runs."""
        return tuple(dict.fromkeys((self.contract, *self.judge_reads, *JUDGE_TOOLS, *self.box_files())))


PARTS = {
    "A": Part("vae.py", "A3_PartA/vae_contract.py", "A3_VAE", "A3_PartA/vae_probes.py",
              ("A3_PartA/contract_check.py",), ("A3_PartA/contract_probes.py", "A3_PartA/a3_helper.py")),
    "B": Part("diffusion.py", "A3_PartB/diffusion_contract.py", "A3_DIFFUSION", "A3_PartB/diffusion_probes.py",
              ("A3_PartB/diffusion_reference.py", "A3_PartB/contract_check.py"),
              ("A3_PartB/contract_probes.py", "A3_PartB/simulated_devices.py")),
}


class PhaseStopped(RuntimeError):
    """A grading phase (phase.py) that did not finish, and how it ended."""


class BoxRun(NamedTuple):
    """What one file's checking gave: the judged records, how the box ended, its output's end."""

    records: list
    returncode: int
    timed_out: bool
    log_tail: str
    seconds: float


def box_protections(limits=Limits()):
    """sandbox.protections for a box that runs the probes."""
    return protections(limits, BOX_PACKAGES)


@functools.cache
def part_module(part, name):
    """The module ``name`` of part's folder (contract_check, contract_probes), loaded in the
    grader's process, where the part's contract reads it."""
    spec = spec_from_file_location(f"part_{part}_{name}", REPO_ROOT / Path(PARTS[part].contract).parent / f"{name}.py")
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the grader's own files


@functools.cache
def judge_sources(part):
    """{path in the repository: its bytes} of every file part's grading runs, read once, when
    grading begins: whatever happens to the repository later, the phases run these."""
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


# ---------------------------------------------------------------- one file, phase by phase


def run_checks(part, path, limits, protected):
    """Check the file at ``path`` against part's contract, phase by phase: the BoxRun. Raises
    PhaseStopped where the box's answers could not be judged."""
    box, grader = new_box(), Path(tempfile.mkdtemp(prefix="a3_grader_"))
    try:
        contract = write_judges(part, grader / "judges")
        exchange, seed = grader / "exchange", secrets.randbelow(2 ** 31)
        questions = draw_inputs(contract, exchange, seed, limits)
        command = prepare_box(box, part, Path(path), exchange / "inputs")
        started = time.monotonic()
        returncode, timed_out = run_in_box(box, command, limits, protected, BOX_PACKAGES)
        seconds = round(time.monotonic() - started, 1)
        finished = take_answers(box, exchange / "answers", questions)
        log_tail = tail(box / "output.log").replace(str(box), "<box>")
        if not judges_intact(part, contract.parent):
            raise PhaseStopped("the grader's files changed while the box ran")
        records = judged_records(contract, exchange, seed, finished, limits)
        return BoxRun(records, returncode, timed_out, log_tail, seconds)
    finally:
        remove_tree(box)
        remove_tree(grader)


def phase_records(phase, contract, exchange, seed, limits):
    """The records of ``contract`` (in the grader's own folder) run in this grading ``phase``
    ("collect", "inputs" or "judge") by phase.py, in a process of the grader's own that never
    imports the file under test, under the box's time and memory limits."""
    records, log = exchange / f"{phase}.jsonl", exchange / f"{phase}.log"
    child = phase_processes().Process(target=run_phase, daemon=True,
                                      args=(phase, contract, exchange, seed, records, log, limits))
    child.start()
    child.join(limits.seconds)
    if child.is_alive():
        child.kill()
        child.join()
        raise PhaseStopped(f"the {phase} phase of {contract.name} did not finish within {limits.seconds:g} s")
    found = read_records(records, exchange)
    if child.exitcode not in (0, 1) or not any("done" in record for record in found):
        output = log.read_text(errors="replace") if log.is_file() else ""
        raise PhaseStopped(f"the {phase} phase of {contract.name} stopped ({how_it_ended(exit_status(child.exitcode))}): "
                           f"{last_line(output)}")
    return found


@functools.cache
def phase_processes():
    """Where the phases start: forked from a server that imported torch and pytest once (each
    phase would spend most of its time importing them), or spawned where no fork server is."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "pytest"])
    return context


def run_phase(phase_name, contract, exchange, seed, records, log, limits):
    """A phase's process: its output written to ``log``, the limits set, then phase.py of the
    grader's own folder imported from there (writing no bytecode into it) and run."""
    with open(log, "wb") as output:
        for stream in (1, 2):  # stdout and stderr
            os.dup2(output.fileno(), stream)
    if can_set_limits():
        limit_child(limits)
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(contract.parent))
    import phase  # the grader's own copy, beside the contract, as the contract's modules are

    phase.run_phase(phase_name, str(contract), str(exchange), str(seed), str(records))


def draw_inputs(contract, exchange, seed, limits):
    """Save each check's inputs, drawn from ``seed``, under ``exchange``/inputs: their file names."""
    (exchange / "inputs").mkdir(parents=True)
    unexpected = [record for record in phase_records("inputs", contract, exchange, seed, limits)
                  if "test" in record and record["message"] != INPUTS_DRAWN]
    if unexpected:
        raise RuntimeError(f"checks of {contract.name} ended before drawing their inputs: {unexpected[:3]}")
    return sorted(path.name for path in (exchange / "inputs").glob("*.pt"))


def prepare_box(box, part, path, inputs):
    """Put into ``box``/check what the box reads: the part's probes and what they read, as
    read when grading began, answer.py, the checks' ``inputs``, and the student's file with the
    .py files beside it but the grader's own (exchange.JUDGES_ONLY). The box's command."""
    spec, check = PARTS[part], box / "check"
    sources = judge_sources(part)
    for relative in spec.box_files():
        (check / relative).parent.mkdir(parents=True, exist_ok=True)
        (check / relative).write_bytes(sources[relative])
    (check / "submission").mkdir()
    judges_only = {f"{name}.py" for name in JUDGES_ONLY}
    for sibling in path.parent.glob("*.py"):  # what it may import, as it does beside them in its part
        if (sibling.is_file() and not sibling.is_symlink() and sibling.stat().st_size <= SIBLING_BYTES
                and sibling.name not in judges_only):
            shutil.copy(sibling, check / "submission" / sibling.name)
    shutil.copy(path, check / "submission" / spec.file)
    shutil.copytree(inputs, check / "inputs")
    return [sys.executable, check / "grading" / "answer.py", check / spec.probes, check / "submission" / spec.file,
            check / "inputs", box / "home" / "answers"]


def take_answers(box, answers, questions):
    """Copy the box's answers to ``questions`` (and the one saying the file did not import) into
    ``answers``: regular files of at most ANSWER_BYTES only, at their own place in the box,
    nothing else of it. Whether the box answered them all (or the import's failure, which ends
    its run)."""
    answers.mkdir()
    given = box.resolve() / "home" / "answers"
    for name in (*questions, IMPORT_ANSWER):
        path = box / "home" / "answers" / name
        if (path.resolve() == given / name and path.is_file() and not path.is_symlink()
                and path.stat().st_size <= ANSWER_BYTES):
            shutil.copyfile(path, answers / name)
    return (answers / IMPORT_ANSWER).is_file() or all((answers / name).is_file() for name in questions)


def judged_records(contract, exchange, seed, finished, limits):
    """The records of the judge phase: one per check the box answered, then ``{"done": True}``
    if it answered them all, else ``{"running": the first check it did not answer}`` where it
    answered some (one that answered none stopped on importing the file)."""
    records = phase_records("judge", contract, exchange, seed, limits)
    kept = [record for record in records if "done" not in record and record.get("message") != NOT_ANSWERED]
    skipped = [record["test"] for record in records if record.get("message") == NOT_ANSWERED]
    running = [{"running": skipped[0]}] if skipped and any("test" in record for record in kept) else []
    return kept + ([{"done": True}] if finished else running)


def read_records(path, folder):
    """The records a Recorder wrote, one JSON object a line (a cut last line dropped), the
    ``folder`` written ``<box>`` in them."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").replace(str(folder), "<box>").splitlines():
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


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"
