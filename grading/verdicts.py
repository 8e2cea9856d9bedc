"""One verdict on one file, from what its checking gave (protocol.py).

Verdicts (VERDICTS): ``pass``; ``portability`` (every check passes, on every device the trainer
picks by default, but the file chooses its device itself instead of from its input: a warning);
``fail`` (a check fails); ``error`` (it does not import, or crashes outside any check);
``timeout``; ``memory``; ``missing`` (no such file). A run that finished gets the verdict the
notebook's check gives (the part's ``contract_check.finished_verdict``).
"""
import signal
from dataclasses import dataclass, field
from pathlib import Path

from grading.protocol import PARTS, PhaseStopped, box_protections, last_line, part_module, run_checks
from grading.sandbox import Limits, MiB, how_it_ended

VERDICTS = ("pass", "portability", "fail", "error", "timeout", "memory", "missing")
MEMORY_SIGNS = ("MemoryError", "not enough memory", "Cannot allocate memory", "bad_alloc", "out of memory")
FILE_SIZE_SIGNS = ("File too large",)


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


def check_file(part, path, shown_as, limits=Limits(), protected=None):
    """The Result of part's contract on the file at ``path`` (``shown_as`` in messages), the
    file answering its probes in a box and judged apart (protocol.run_checks)."""
    if not Path(path).is_file():
        return Result(part, shown_as, "missing", first_failure=f"no {PARTS[part].file} found")
    protected = box_protections(limits) if protected is None else protected
    try:
        run = run_checks(part, path, limits, protected)
    except PhaseStopped as stopped:  # on what the box wrote: its verdict, not the grader's crash
        return Result(part, shown_as, "error", first_failure=f"its answers could not be judged: {stopped}")
    tests = [record for record in run.records if "test" in record]
    failures = [record for record in tests if record["outcome"] in ("failed", "error")]
    result = Result(part, shown_as, "pass", sum(record["outcome"] == "passed" for record in tests),
                    len(tests), seconds=run.seconds, tests=tests)
    result.verdict, result.first_failure = verdict(part, run, failures, limits)
    return result


def verdict(part, run, failures, limits):
    """(verdict, its cause in one line) of part's BoxRun ``run``. A signal that ended the box
    comes as the return code 128 + its number."""
    finished = any("done" in record for record in run.records)
    running = "".join(f" (running {record['running']}...)" for record in run.records if "running" in record)
    causes = [failure["message"] for failure in failures] + ([] if finished else [last_line(run.log_tail)])
    if run.timed_out or run.returncode == 128 + getattr(signal, "SIGXCPU", -128):  # POSIX only, as SIGXFSZ
        used = f"{limits.seconds:g} s" if run.timed_out else f"{limits.cpu_seconds} s of CPU time"
        return "timeout", f"did not finish within {used}: stopped{running}"
    if run.returncode == 128 + getattr(signal, "SIGXFSZ", -128) or any(sign in cause for cause in causes for sign in FILE_SIZE_SIGNS):
        return "error", f"wrote more than {limits.file_bytes // MiB} MiB to one file (printed output counts): stopped"
    if any(sign in cause for cause in causes for sign in MEMORY_SIGNS):
        return "memory", f"ran out of memory (limit {limits.memory_bytes / 2 ** 30:g} GiB): {first_with_memory(causes)}"
    if not finished:
        return "error", f"stopped before its checks finished ({how_it_ended(run.returncode)}){running}: {last_line(run.log_tail)}"
    verdict_name, _, _, cause = part_module(part, "contract_check").finished_verdict(run.records)
    return verdict_name, cause


def first_with_memory(causes):
    return next(cause for cause in causes if any(sign in cause for sign in MEMORY_SIGNS))
