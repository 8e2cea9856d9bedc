"""The machinery of the fair-and-sharp tests: mutants of a correct file, and a contract's verdicts.

A contract test file checks the file that an environment variable names, as a student runs it.
``verdicts`` runs it once per file, all in one subprocess (torch is imported once), and reads
which of its tests failed, with their messages, from junit reports.
"""

import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import NamedTuple

RUN_CONTRACT = """
import os, sys, pytest
contract, variable, *pairs = sys.argv[1:]
for path, report in zip(pairs[::2], pairs[1::2]):
    os.environ[variable] = path
    pytest.main([contract, "-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception",
                 "--junitxml=" + report])
"""  # unraisableexception runs gc.collect five times a run, slow with torch loaded


class Mutant(NamedTuple):
    name: str
    edits: tuple  # (text of the correct file, its replacement) pairs
    caught_by: set  # the contract tests that must fail


def write_mutant(correct_file, folder, mutant):
    """``correct_file`` with the mutant's edits, each of which must apply exactly once, written
    under the same name into a new ``folder``."""
    source = correct_file.read_text()
    for old, new in mutant.edits:
        assert source.count(old) == 1, f"{mutant.name}: {old!r} is not in {correct_file} once"
        source = source.replace(old, new)
    folder.mkdir()
    (folder / correct_file.name).write_text(source)
    return folder / correct_file.name


def failures(report):
    """{test name with its parameters: failure message} of a junit report."""
    failed = {}
    for case in ElementTree.parse(report).iter("testcase"):
        for problem in [*case.iter("failure"), *case.iter("error")]:
            failed[case.get("name")] = problem.get("message", "")
    return failed


def verdicts(contract, variable, correct, mutated, mutants, folder):
    """{name: the contract's failures on the file} for the ``correct`` files (name -> path) and for
    the ``mutants`` of the file ``mutated``, the contract reading the file's path from the
    environment ``variable``. Mutants and reports are written to ``folder``."""
    files = dict(correct, **{mutant.name: write_mutant(mutated, folder / mutant.name, mutant) for mutant in mutants})
    arguments = [str(contract), variable]
    for name, path in files.items():
        arguments += [str(path), str(folder / f"{name}.xml")]
    run = subprocess.run([sys.executable, "-c", RUN_CONTRACT, *arguments], cwd=Path(contract).parents[1],
                         capture_output=True, text=True, timeout=600)
    missing = [name for name in files if not (folder / f"{name}.xml").is_file()]
    assert not missing, f"no report for {missing}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return {name: failures(folder / f"{name}.xml") for name in files}
