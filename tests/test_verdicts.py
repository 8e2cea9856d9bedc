"""grading/verdicts.py: how a box's run becomes a verdict, and a box on a machine that gives
none of the extra isolation (no namespaces, no cgroup) still ends a file's check in its row.

The verdicts of real files, correct, buggy and hostile, are tested through the grader
(tests/test_grade_submissions.py) and make_submission.py (tests/test_submission.py).
"""

import signal

import pytest

from grading.protocol import BoxRun, box_protections
from grading.sandbox import Limits
from grading.verdicts import check_file, verdict

LIMITS = Limits(seconds=60, cpu_seconds=20, memory_bytes=5 * 2 ** 30)


def passed(test):
    return {"test": test, "outcome": "passed", "message": ""}


def failed(test, message, outcome="failed"):
    return {"test": test, "outcome": outcome, "message": message}


DONE = {"done": True}
PORTABILITY = {"warning": "test_takes_its_device_from_its_input[forward]: forward runs only on the device it picks itself"}


def judged(records, returncode=0, timed_out=False, log_tail=""):
    failures = [record for record in records if record.get("outcome") in ("failed", "error")]
    return verdict("A", BoxRun(records, returncode, timed_out, log_tail, 1.0), failures, LIMITS)


def test_every_check_passing_is_a_pass():
    assert judged([passed("test_a"), DONE]) == ("pass", "")


def test_a_portability_warning_without_failure_is_a_portability_verdict_with_the_warning():
    assert judged([passed("test_a"), PORTABILITY, DONE]) == ("portability", PORTABILITY["warning"])


def test_a_failure_outweighs_a_portability_warning_and_names_the_first_failing_check():
    records = [passed("test_a"), failed("test_b", "eq. (7) is off"), failed("test_c", "later"), PORTABILITY, DONE]
    assert judged(records) == ("fail", "test_b: eq. (7) is off")


def test_a_file_that_does_not_import_is_an_error_not_a_failure():
    records = [failed("test_a", "NameError: name 'nn' is not defined", outcome="error"), DONE]
    assert judged(records) == ("error", "does not import or crashes outside any check: NameError: name 'nn' is not defined")


def test_a_device_check_that_could_not_run_is_said_not_run_and_not_counted_as_passed():
    skipped = {"test": "test_runs_on_each_device_the_trainer_picks[sample-cuda]", "outcome": "skipped",
               "message": "device check not run: the meta device cannot run all of sample (...)"}
    assert judged([passed("test_a"), skipped, DONE]) == ("pass", skipped["message"])


def test_a_cpu_time_limit_is_a_timeout_naming_the_check_running():
    assert judged([passed("test_a"), {"running": "test_b"}], returncode=128 + signal.SIGXCPU) == (
        "timeout", "did not finish within 20 s of CPU time: stopped (running test_b...)")


def test_a_crash_in_the_middle_is_an_error_with_how_it_ended_and_the_last_line_it_printed():
    assert judged([passed("test_a"), {"running": "test_b"}], returncode=128 + signal.SIGSEGV,
                  log_tail="Fatal Python error\n") == (
        "error", "stopped before its checks finished (killed by SIGSEGV) (running test_b...): Fatal Python error")


def test_a_memory_error_anywhere_is_a_memory_verdict():
    assert judged([failed("test_a", "RuntimeError: DefaultCPUAllocator: not enough memory"), DONE])[0] == "memory"


@pytest.mark.slow
def test_without_the_extra_isolation_a_box_still_ends_a_file_in_its_row(tmp_path):
    """Rlimits, a fresh folder and a clean environment only: what every POSIX machine gives."""
    bare = {name: (what if name in ("own folder", "environment", "limits") else None)
            for name, what in box_protections(LIMITS).items()}
    exits = tmp_path / "vae.py"
    exits.write_text("import os\nos._exit(3)\n")
    result = check_file("A", exits, "vae.py", LIMITS, bare)
    assert (result.verdict, result.first_failure) == ("error", "stopped before its checks finished (exit status 3): no output")


@pytest.mark.slow
def test_a_file_that_waits_forever_is_stopped_at_the_wall_time_limit(tmp_path):
    """It uses no CPU time, so only the wall time can end it: the whole box is killed then."""
    waits = tmp_path / "vae.py"
    waits.write_text("import time\ntime.sleep(600)\n")
    result = check_file("A", waits, "vae.py", Limits(seconds=8))
    assert result.verdict == "timeout" and result.first_failure.startswith("did not finish within 8 s: stopped")
