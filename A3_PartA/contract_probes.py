"""How a contract's checks get what the file under test computes, so that grading never runs the
file in the process that judges it.

Each check of a contract (vae_contract.py, diffusion_contract.py) draws its inputs, hands them
to one *probe* (a function of the part's probes module, vae_probes.py or diffusion_probes.py,
that calls the file and returns plain data: tensors, numbers, strings, in lists, tuples and
dicts) through the ``run`` fixture (defined here), and judges what comes back against the
handout's values for those inputs:

    def test_q_sample_mean(run):
        x_0 = images(T, seed=1)
        mean = run(probe_q_sample, x_0=x_0, t=torch.arange(T), noise=torch.zeros_like(x_0))
        ...judge mean against eq. (6)...

A student's run (``pytest``, the notebook's check) calls the probe on the imported file at once.
A grader (the ``grading`` package at the repository's root, which does not ship with the parts)
runs the same contract in phases: the inputs are drawn and saved in its own process, the file
answers the probes in a box, and the answers are judged in its own process again, which never
imports the file. During those phases the grader's plugin sits in pytest's stash (``GRADING``)
and ``run`` hands each check to it.

Whatever the file raises in a probe (``pytest.skip`` and ``pytest.exit``, ``SystemExit``,
``KeyboardInterrupt`` included) fails that check: a check the file stops earns nothing. Only the
judge itself may call a check not run (``NOT_RUN``), and a contract declares each check's
``weight`` and what it ``rests_on``, so that a part's points are fixed before the file runs.
Every probe runs as on a machine without a GPU (``machine_with("cpu")``), in a student's run and
in the box alike, whatever the machine has. The answer is checked to be data of a bounded size
before any judge computes with it (``outcome``), in both runs alike.

The source of this file is A3_PartA/contract_probes.py; A3_PartB holds a byte copy so that each part's
folder runs alone (tests/test_contract_check.py names the source and keeps the copy equal).
"""
import contextlib
import functools
import os
import traceback

import pytest
import torch

SEED = "A3_CONTRACT_SEED"  # added to every seed of a contract's inputs; unset in a student's run
GRADING = pytest.StashKey()  # the grader's plugin while a grading phase runs; absent in a student's run
NOT_RUN = "device check not run"  # how the judge starts a check it could not run; no probe may
FAILED = pytest.fail.Exception  # taken before the file under test runs
MAX_ELEMENTS = 2 ** 24  # in one answer: the largest a check asks for is 400,000 (eq. (2)'s moments)


def seeded(seed):
    """A check's ``seed``, offset by the grading's own draw (none in a student's run)."""
    return seed + int(os.environ.get(SEED, "0"))


def weight(points):
    """A check's weight in its part's points (1 if not given): the checks of the handout's
    values weigh the most. A grader reads it before the file runs."""
    def weighed(check):
        check.weight = points
        return check
    return weighed


def rests_on(request, *checks):
    """Mark a check that is no evidence of the math alone (a shape, a range, a device, the file
    compared with itself, what the box observed): a grader scores it only when ``checks`` (the
    handout's values it belongs to: check functions, or ``(check, parameter id)`` for one case
    of a parametrized check) pass."""
    request.node.user_properties.append(("rests_on", tuple(map(check_name, checks))))


def check_name(check):
    """The name pytest reports for a check function, or ``(check, parameter id)``: ``test_x[id]``."""
    function, *ids = check if isinstance(check, tuple) else (check,)
    return function.__name__ + "".join(f"[{parameter}]" for parameter in ids)


@contextlib.contextmanager
def machine_with(device_type):
    """While inside, torch says the machine's best device is ``device_type`` ("cuda", "mps" or
    "cpu"), as the trainer's default device and a file's own choice of device read it."""
    saved = torch.cuda.is_available, torch.cuda.device_count, torch.backends.mps.is_available
    torch.cuda.is_available = answering(saved[0], device_type == "cuda")
    torch.cuda.device_count = answering(saved[1], int(device_type == "cuda"))
    torch.backends.mps.is_available = answering(saved[2], device_type == "mps")
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.device_count, torch.backends.mps.is_available = saved


def answering(function, answer):
    """A stand-in for ``function`` that returns ``answer``; it keeps the original's name and
    ``__wrapped__``, which torch itself reads."""
    return functools.wraps(function)(lambda *args, **kwargs: answer)


@pytest.fixture
def run(request):
    """The ``run(probe, **inputs)`` of one check, a fixture each contract imports: the probe's
    answer on the file under test (the contract's ``under_test``), or, while a grader's phase
    runs, what its plugin does with the check (``GRADING``). A check calls it once, so that one
    saved answer belongs to one check."""
    name = request.node.name
    grading = request.config.stash.get(GRADING, None)
    answerer = grading.answerer(name) if grading is not None else answering_here(request)
    calls = []

    def run(probe, **inputs):
        if calls:
            raise RuntimeError(f"{name} calls run() twice; a check hands its inputs to one probe")
        calls.append(probe)
        return answerer(probe, inputs)

    return run


def answering_here(request):
    """A student's run: each probe answered at once on the imported file, its answer checked
    as a grader checks the box's (``outcome``)."""
    under_test = imported_under_test(request)
    return lambda probe, inputs: outcome(answer(probe, under_test, inputs))


def imported_under_test(request):
    """The contract's ``under_test``, imported as on a machine without a GPU; whatever stops its
    import fails the check, as in the box."""
    try:
        with machine_with("cpu"):
            return request.getfixturevalue("under_test")
    except BaseException as error:  # noqa: BLE001 - whatever stops the import is the verdict
        replay(raised(error))


def outcome(given):
    """The probe's data, checked to be bounded (``bounded``), or the failure it raised."""
    if "raised" in given:
        replay(given)
    return bounded(given.get("returned"))


def replay(given):
    """End the check as the probe ended: a failure with its message."""
    pytest.fail(str(given.get("message", ""))[:500], pytrace=False)


def bounded(value):
    """``value`` as read from an answer, each tensor checked before any judge computes with it:
    dense, of a real or bool dtype, its storage holding every element its strides reach, at most
    MAX_ELEMENTS in all; returned as fresh contiguous copies. Fails the check otherwise."""
    counted = [0]

    def check(item, depth=0):
        if depth > 20:
            pytest.fail("the answer is nested more than 20 deep", pytrace=False)
        if isinstance(item, torch.Tensor):
            return checked_tensor(item, counted)
        if isinstance(item, (list, tuple)):
            return type(item)(check(part, depth + 1) for part in item)
        if isinstance(item, dict):
            return {key: check(part, depth + 1) for key, part in item.items()}
        return item

    return check(value)


def checked_tensor(tensor, counted):
    """One tensor of an answer, copied, once its size and its storage are shown sound."""
    if tensor.layout != torch.strided or tensor.is_complex() or tensor.is_quantized or tensor.device.type != "cpu":
        pytest.fail(f"the answer holds a {tensor.layout} {tensor.dtype} tensor on {tensor.device}, not plain data",
                    pytrace=False)
    counted[0] += tensor.numel()
    if counted[0] > MAX_ELEMENTS:
        pytest.fail(f"the answer holds more than {MAX_ELEMENTS:,} values, more than any check asks for", pytrace=False)
    if tensor.numel():
        strides = tensor.stride()
        reach = tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, strides))
        if min(strides, default=0) < 0 or (reach + 1) * tensor.element_size() > tensor.untyped_storage().nbytes():
            pytest.fail("the answer holds a tensor whose strides reach beyond its storage", pytrace=False)
    return tensor.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------- answering a probe


def answer(probe, under_test, inputs):
    """{"returned": the probe's data} or {"raised": its outcome, "message": one line}, the probe
    run as on a machine without a GPU."""
    try:
        with machine_with("cpu"):
            return {"returned": plain(probe(under_test, **inputs))}
    except BaseException as error:  # noqa: BLE001 - a check's outcome, whatever the file raised
        return raised(error)


def raised(error):
    """A probe's exception as its check reports it: always a failure, with its first line; a
    check the file stopped (a skip, an exit, an interrupt) says so."""
    if isinstance(error, FAILED):
        return {"raised": "failed", "message": (str(error.msg).strip().splitlines() or [""])[0][:500]}
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    line = (text.splitlines() or [type(error).__name__])[-1][:500]
    if not isinstance(error, Exception):  # pytest's skip and exit, SystemExit, KeyboardInterrupt
        line = f"the file stopped this check ({line}): a check the file stops earns nothing"
    return {"raised": "failed", "message": line}


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
