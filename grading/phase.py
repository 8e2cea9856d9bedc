"""One grading phase of a part's contract, imported from the grader's own folder beside the
contract, in a process that never imports the file under test (protocol.run_phase):
``run_phase(PHASE, CONTRACT, EXCHANGE, SEED, RECORDS)``.

- ``collect``: each check's name and weight (``contract_probes.weight``), before any file runs;
- ``inputs``: each check draws its inputs, from seeds offset by SEED (``contract_probes.seeded``),
  and saves them with its probe's name into EXCHANGE/inputs instead of calling the probe;
- ``judge``: each check reads the box's answer from EXCHANGE/answers as data only, and judges
  it as in a student's run (``contract_probes.outcome``).

The records (``contract_check.Recorder``) go to the file RECORDS, one JSON line each.
"""
import functools
import itertools
import json
from pathlib import Path

import pytest
import torch

from contract_check import run_contract
from contract_probes import GRADING, SEED, outcome, replay
from exchange import IMPORT_ANSWER, INPUTS_DRAWN, NOT_ANSWERED, answer_of, input_name, save


class Exchange:
    """The pytest plugin of a grading phase: what each check's ``run`` does in it
    (``answerer``), and, in the collect phase, each check's weight written to ``stream``."""

    def __init__(self, phase, folder, stream):
        self.phase, self.folder, self.stream = phase, folder, stream
        self.inputs_saved = itertools.count()  # numbers the saved inputs in the order the checks run

    def pytest_configure(self, config):
        config.stash[GRADING] = self

    def pytest_collection_finish(self, session):
        if self.phase == "collect":
            for item in session.items:
                weight = getattr(item.function, "weight", 1)
                self.stream.write(json.dumps({"check": item.nodeid.split("::")[-1], "weight": weight}) + "\n")

    def answerer(self, check):
        """``run(probe, **inputs)``'s work for ``check`` in this phase. In the judge phase, a
        file that did not import fails every check here, as in a student's run."""
        if self.phase == "inputs":
            return functools.partial(self.save_inputs, check)
        if (self.folder / "answers" / IMPORT_ANSWER).is_file():
            replay(read_answer(self.folder / "answers" / IMPORT_ANSWER))
        return functools.partial(self.judged_answer, check)

    def save_inputs(self, check, probe, inputs):
        save(self.folder / "inputs" / input_name(next(self.inputs_saved), check),
             {"check": check, "probe": probe.__name__, "inputs": inputs})
        pytest.skip(INPUTS_DRAWN)

    def judged_answer(self, check, probe, inputs):
        """What the box's probe returned for ``check``; what it raised is raised again here."""
        found = answer_of(self.folder / "answers", check)
        if found is None:
            pytest.skip(NOT_ANSWERED)
        given = read_answer(found)
        if given.get("probe") != probe.__name__:
            pytest.fail(f"the box did not answer {probe.__name__}", pytrace=False)
        return outcome(given)


def read_answer(path):
    """One answer the box wrote, read as data only: a dict, or the check fails."""
    try:
        given = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever the box wrote, it is not the grader's crash
        pytest.fail(f"the box's answer cannot be read as data ({type(error).__name__})", pytrace=False)
    if not isinstance(given, dict):
        pytest.fail("the box's answer is not one of a probe's", pytrace=False)
    return given


def run_phase(phase, contract, folder, seed, records):
    """Run ``contract`` in ``phase``, its records written to the file ``records``."""
    with open(records, "w", buffering=1) as stream:
        run_contract(contract, {SEED: seed}, stream, collect_only=phase == "collect",
                     plugins=[Exchange(phase, Path(folder), stream)])
