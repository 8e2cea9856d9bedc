"""What a grading's phases and its box hand each other, as files of data (protocol.py).

The inputs phase saves each check's inputs as ``NNNN-<check>.pt`` (``input_name``); the box
writes the probe's answer under the same name, or ``IMPORT_ANSWER`` where the file did not
import; the judge phase finds each check's answer by its name (``answer_of``). Every file is
written whole or not at all (``save``) and read as data only (``torch.load(weights_only=True)``).
Imported by the grader (protocol.py) and, beside them, by phase.py and answer.py.
"""
import hashlib

import torch

INPUTS_DRAWN = "inputs drawn for the box"  # how each check ends in the inputs phase
NOT_ANSWERED = "not answered: the box stopped before this check's probe ran"
IMPORT_ANSWER = "import.pt"  # the answer that says the file did not import
JUDGES_ONLY = ("vae_contract", "diffusion_contract", "diffusion_reference", "contract_check")  # never in a box


def check_key(check):
    """A file name's part for a check's name, whatever its parameters hold."""
    return hashlib.sha256(check.encode()).hexdigest()[:24]


def input_name(number, check):
    """The file of the ``number``-th check's inputs (the number orders the box's answers as the
    checks run)."""
    return f"{number:04d}-{check_key(check)}.pt"


def answer_of(answers, check):
    """The path of the box's answer to ``check`` in the folder ``answers``, or None."""
    return min(answers.glob(f"*-{check_key(check)}.pt"), default=None)


def save(path, data):
    """Write ``data`` to ``path`` whole: to a temporary name first, then renamed."""
    partial = path.with_suffix(".partial")
    torch.save(data, partial)
    partial.replace(path)
