"""How a contract's checks get what the file under test computes, so that grading never runs the
file in the process that judges it.

Each check of a contract (vae_contract.py, diffusion_contract.py) draws its inputs, hands them
to one *probe* (a function of the contract that calls the file and returns plain data: tensors,
numbers, strings, in lists, tuples and dicts) through the ``run`` fixture (defined here), and judges what comes
back against the handout's values for those inputs:

    def test_q_sample_mean(run):
        x_0 = images(T, seed=1)
        mean = run(probe_q_sample, x_0=x_0, t=torch.arange(T), noise=torch.zeros_like(x_0))
        ...judge mean against eq. (6)...

A student's run (``pytest``, the notebook's check) calls the probe on the imported file at once.
A grader runs the same contract three times, with ``A3_CONTRACT_PHASE``:

1. ``inputs``, in the grader's process: each check draws its inputs, from seeds offset by
   ``A3_CONTRACT_SEED`` (drawn afresh for each grading), and saves them with its probe's name;
2. in the box, ``answer_probes`` imports the file and writes each probe's answer (or what it
   raised) with ``torch.save``; nothing else of the box is read;
3. ``judge``, in the grader's process again, which never imports the file: each check reads its
   answer with ``torch.load(weights_only=True)`` and judges it, as in a student's run.

Each part's folder holds this same file, as each part runs alone on Colab;
tests/test_contract_check.py keeps the two copies identical.
"""
import hashlib
import itertools
import os
import sys
import traceback
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import pytest
import torch

PHASE = "A3_CONTRACT_PHASE"  # "inputs" or "judge" while grading; unset in a student's run
EXCHANGE = "A3_CONTRACT_EXCHANGE"  # the folder holding inputs/ and answers/ while grading
SEED = "A3_CONTRACT_SEED"  # added to every seed of a contract's inputs; 0 in a student's run
INPUTS_DRAWN = "inputs drawn for the box"  # how each check ends in the inputs phase
NOT_ANSWERED = "not answered: the box stopped before this check's probe ran"
IMPORT_ANSWER = "import"  # the answer's name that says the file did not import
INPUTS_SAVED = itertools.count()  # numbers the saved inputs in the order the checks run
SKIPPED, FAILED = pytest.skip.Exception, pytest.fail.Exception  # taken before the file under test runs


def seeded(seed):
    """A check's ``seed``, offset by the grading's own draw (none in a student's run)."""
    return seed + int(os.environ.get(SEED, "0"))


def rests_on(request, *checks):
    """Mark a check that judges what the box observed beside the file's answers (the simulated
    device, the calls a stub received): a grader scores it only when ``checks`` pass."""
    request.node.user_properties.append(("rests_on", checks))


@pytest.fixture
def run(request):
    """The ``run(probe, **inputs)`` of one check, a fixture each contract imports: the probe's
    answer on the file under test (the contract's ``under_test``), as the phase gets it. A check
    calls it once, so that one saved answer belongs to one check."""
    phase = os.environ.get(PHASE, "")
    exchange = Path(os.environ.get(EXCHANGE, "."))
    name = request.node.name
    if phase == "judge" and (exchange / "answers" / f"{IMPORT_ANSWER}.pt").is_file():
        replay(torch.load(exchange / "answers" / f"{IMPORT_ANSWER}.pt", weights_only=True))
    under_test = request.getfixturevalue("under_test") if phase == "" else None
    calls = []

    def run(probe, **inputs):
        if calls:
            raise RuntimeError(f"{name} calls run() twice; a check hands its inputs to one probe")
        calls.append(probe)
        if phase == "inputs":
            torch.save({"check": name, "probe": probe.__name__, "inputs": inputs},
                       exchange / "inputs" / f"{next(INPUTS_SAVED):04d}-{file_name(name)}.pt")
            pytest.skip(INPUTS_DRAWN)
        if phase == "judge":
            return judged_answer(exchange / "answers", name, probe)
        return plain(probe(under_test, **inputs))  # the data a grading's box would hand back

    return run


def file_name(check):
    """A file name for a check's name, whatever its parameters hold (after the number of its
    inputs, which orders the box's answers as the checks run)."""
    return hashlib.sha256(check.encode()).hexdigest()[:24]


def judged_answer(answers, check, probe):
    """What the box's probe returned for ``check``, read as data only; what it raised is raised
    again here, so that the check ends as it would in a student's run."""
    found = sorted(answers.glob(f"*-{file_name(check)}.pt"))
    if not found:
        pytest.skip(NOT_ANSWERED)
    answer = torch.load(found[0], weights_only=True)
    if answer.get("probe") != probe.__name__:
        pytest.fail(f"the box answered {answer.get('probe')!r}, not {probe.__name__}", pytrace=False)
    if "raised" in answer:
        replay(answer)
    return answer["returned"]


def replay(answer):
    """End the check as the box's probe ended: a skip, or a failure with its message."""
    if answer["raised"] == "skipped":
        pytest.skip(answer["message"])
    pytest.fail(answer["message"], pytrace=False)


# ---------------------------------------------------------------- in the box


def answer_probes(contract, file, inputs, answers):
    """Import the file under test as ``contract`` does, then answer each saved check's probe
    into ``answers``, one file each, written whole or not at all."""
    sys.path.insert(0, str(Path(contract).parent))
    spec = spec_from_file_location(Path(contract).stem, contract)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    answers.mkdir(exist_ok=True)
    try:
        under_test = module.load_under_test(Path(file))
    except BaseException as error:  # noqa: BLE001 - whatever stops the import is the verdict
        save(answers / f"{IMPORT_ANSWER}.pt", {"probe": "", **raised(error)})
        return
    for request_file in sorted(inputs.glob("*.pt")):  # in the order the checks run
        request = torch.load(request_file, weights_only=True)
        save(answers / request_file.name, {"probe": request["probe"],
                                           **answer(getattr(module, request["probe"]), under_test, request["inputs"])})


def answer(probe, under_test, inputs):
    """{"returned": the probe's data} or {"raised": its outcome, "message": one line}."""
    try:
        return {"returned": plain(probe(under_test, **inputs))}
    except BaseException as error:  # noqa: BLE001 - a check's outcome, whatever the file raised
        return raised(error)


def raised(error):
    """A probe's exception as its check reports it: a skip or a failure, with its first line."""
    if isinstance(error, SKIPPED):
        return {"raised": "skipped", "message": str(error.msg)}
    if isinstance(error, FAILED):
        return {"raised": "failed", "message": str(error.msg).strip().splitlines()[0][:500]}
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return {"raised": "failed", "message": (text.splitlines() or [type(error).__name__])[-1][:500]}


def plain(value):
    """``value`` as data that ``torch.load(weights_only=True)`` reads: tensors detached, on the
    CPU; numbers, strings, None; lists, tuples and dicts of those."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return (tuple if isinstance(value, tuple) else list)(plain(item) for item in value)
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    raise TypeError(f"a probe returned a {type(value).__name__}, which is not data")


def save(path, data):
    """Write ``data`` to ``path`` whole: to a temporary name first, then renamed."""
    partial = path.with_suffix(".partial")
    torch.save(data, partial)
    partial.replace(path)
