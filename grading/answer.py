"""In the box: the file under test answers each check's probe, and nothing else of the box is
read (protocol.py). Run by the box's command, beside exchange.py:

    python answer.py PROBES FILE INPUTS ANSWERS

PROBES is the part's probes module (vae_probes.py, diffusion_probes.py), FILE the student's
file, INPUTS the folder of the checks' inputs, ANSWERS the folder the answers go to.
"""
import importlib.abc
import sys
from importlib.util import module_from_spec, spec_from_file_location
from pathlib import Path

import torch

from exchange import IMPORT_ANSWER, JUDGES_ONLY, save


class JudgesOnly(importlib.abc.MetaPathFinder):
    """Refuses the modules that only the grader's processes hold (JUDGES_ONLY)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in JUDGES_ONLY:
            raise ImportError(f"{name} is the grader's (the handout's values and the checks): a file under "
                              "grading cannot import it", name=name)
        return None


def answer_probes(probes, file, inputs, answers):
    """Import the file under test with the part's ``probes`` module, as on a machine without a
    GPU, then answer each saved check's probe into ``answers``, one file each, in the order the
    checks run."""
    sys.meta_path.insert(0, JudgesOnly())
    sys.path.insert(0, str(Path(probes).parent))
    from contract_probes import answer, machine_with, raised  # the part's own, beside its probes

    spec = spec_from_file_location(Path(probes).stem, probes)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    answers.mkdir(exist_ok=True)
    try:
        with machine_with("cpu"):
            under_test = module.load_under_test(Path(file))
    except BaseException as error:  # noqa: BLE001 - whatever stops the import is the verdict
        save(answers / IMPORT_ANSWER, {"probe": "", **raised(error)})
        return
    for request_file in sorted(inputs.glob("*.pt")):
        request = torch.load(request_file, weights_only=True)
        save(answers / request_file.name, {"probe": request["probe"],
                                           **answer(getattr(module, request["probe"]), under_test, request["inputs"])})


if __name__ == "__main__":
    probes_file, file_under_test, inputs_folder, answers_folder = sys.argv[1:5]
    answer_probes(probes_file, file_under_test, Path(inputs_folder), Path(answers_folder))
