"""Run a part's contract on a file and say what it found: the notebook's check before training,
and the records a grader's phases read (the ``grading`` package at the repository's root).

A contract (vae_contract.py, diffusion_contract.py) is a pytest file that checks the file an
environment variable names. Its verdict on a run that finished: ``error`` (the file does not
import, or crashes outside any check), ``fail`` (a check fails: the line names the equation and
its numbers), ``portability`` (every check passes, but the file chooses its device itself: a
warning) or ``pass``.

The source of this file is A3_PartA/contract_check.py; A3_PartB holds a byte copy so that each part's
folder runs alone (tests/test_contract_check.py names the source and keeps the copy equal).
"""
import contextlib
import io
import json
import os
from pathlib import Path

try:
    import pytest
except ImportError:  # the notebook's check then says how to get it, and training goes on
    pytest = None

TRAIN_ANYWAY_HINT = ("Fix it and run this cell again; to train with it anyway, set TRAIN_ANYWAY = True "
                     "in the parameters cell.")


class ContractFailed(Exception):
    """The file fails its contract, or does not run: the message is the verdict line."""


class Recorder:
    """A pytest plugin that keeps one record per check as it ends (``test``, ``outcome``,
    ``message``), one per PortabilityWarning (``warning``) and ``{"done": True}`` at the end,
    each also written at once as a JSON line to ``stream`` where one is given: whatever kills
    the run, what was written stays."""

    def __init__(self, stream=None):
        self.records = []
        self.stream = stream

    def write(self, **record):
        self.records.append(record)
        if self.stream is not None:
            self.stream.write(json.dumps(record) + "\n")

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            outcome = "error" if report.when == "setup" and report.failed else report.outcome
            rests_on = dict(report.user_properties).get("rests_on")
            self.write(test=report.nodeid.split("::")[-1], outcome=outcome, message=one_line(report),
                       **({"rests_on": list(rests_on)} if rests_on else {}))

    def pytest_collectreport(self, report):
        if report.failed:
            self.write(test=report.nodeid or "collection", outcome="error", message=one_line(report))

    def pytest_warning_recorded(self, warning_message, when, nodeid, location):
        if type(warning_message.message).__name__ == "PortabilityWarning":
            self.write(warning=f"{nodeid.split('::')[-1]}: {warning_message.message}")

    def pytest_sessionfinish(self, session, exitstatus):
        self.write(done=True)


def one_line(report):
    """The first line of why a check did not pass, without pytest's 'Failed: ' or 'Skipped: '."""
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        text = longrepr[2]
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(longrepr)
    first = text.strip().splitlines()[0] if text.strip() else ""
    for prefix in ("Failed: ", "Skipped: "):
        first = first.removeprefix(prefix)
    return first[:500]


def run_contract(contract, variables, stream=None, collect_only=False, plugins=()):
    """Run the contract at ``contract`` in this process, the environment holding ``variables``
    (the one naming the file under test, or a grading phase's seed), with ``plugins`` (a
    grading phase's): the Recorder's records. pytest runs alone, without the plugins installed
    beside it (one would write its folders next to the contract), any conftest.py or its cache."""
    recorder = Recorder(stream)
    with environment({**variables, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}):
        pytest.main([str(contract), "-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "--noconftest",
                     "--rootdir", str(Path(contract).parent), *(["--collect-only"] if collect_only else [])],
                    plugins=[recorder, *plugins])
    return recorder.records


@contextlib.contextmanager
def environment(values):
    """While inside, the environment holds ``values``; afterwards it is as before."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def finished_verdict(records):
    """(verdict, checks passed, checks run, its cause in one line) of a run that finished; the
    cause of a pass is the first check that the meta device could not run, if any. A run in
    which no check passed is never a pass."""
    tests = [record for record in records if "test" in record]
    passed = sum(record["outcome"] == "passed" for record in tests)
    errors = [record for record in tests if record["outcome"] == "error"]
    failures = [record for record in tests if record["outcome"] == "failed"]
    warnings = [record["warning"] for record in records if "warning" in record]
    not_run = [record["message"] for record in tests
               if record["outcome"] == "skipped" and "not run" in record["message"]]
    if errors:
        verdict, cause = "error", f"does not import or crashes outside any check: {errors[0]['message']}"
    elif failures:
        verdict, cause = "fail", f"{failures[0]['test']}: {failures[0]['message']}"
    elif not passed:
        verdict, cause = "error", "no check ran"
    elif warnings:
        verdict, cause = "portability", warnings[0]
    else:
        verdict, cause = "pass", (not_run[:1] or [""])[0]
    return verdict, passed, len(tests), cause


def verdict_line(name, verdict, passed, total, cause):
    """'vae.py: fail (25/26 checks passed): <cause>', as make_submission.py prints it."""
    counts = f" ({passed}/{total} checks passed)" if total else ""
    return f"{name}: {verdict}{counts}" + (f": {cause}" if cause else "")


def check_before_training(contract, variable, file, train_anyway=False):
    """The notebook's cell before training: the contract on ``file`` (the student's own), its
    output held back. ``pass`` prints one line and ``portability`` its warning; ``fail`` or
    ``error`` raises ContractFailed with the verdict line, so that *Run all* stops before the
    long training, unless ``train_anyway``, which prints it as a warning instead."""
    if pytest is None:
        print(f"WARNING: {Path(file).name} was not checked: pytest is not installed. Run "
              "`%pip install pytest`, then this cell again.")
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        records = run_contract(contract, {variable: str(file)})
    if any("done" in record for record in records):
        verdict, passed, total, cause = finished_verdict(records)
    else:
        verdict, passed, total, cause = "error", 0, 0, "the contract stopped before its checks finished"
    line = verdict_line(Path(file).name, verdict, passed, total, cause)
    if verdict in ("fail", "error") and not train_anyway:
        raise ContractFailed(f"{line}\n{TRAIN_ANYWAY_HINT}")
    print(line if verdict == "pass" else f"WARNING: {line}")
