"""The grading package reads top-down: each module imports only the layers its package docstring
lists before it (no import back up, no circle), the two modules the phases and the box run beside
the contract and the probes (SCRIPTS) import only the exchange's format, and nothing in a part's folder imports grading (grading-only code
does not ship with the parts)."""
import ast
import re
from pathlib import Path

import grading

REPO = Path(__file__).resolve().parents[1]
LAYERS = re.findall(r"^- ``(\w+)``", grading.__doc__, flags=re.MULTILINE)
SCRIPTS = {"phase": {"exchange"}, "answer": {"exchange"}}  # run from the grader's folder and the box


def imported_names(path):
    """The names of the modules the file at ``path`` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def grading_imports(path):
    """The grading modules the file at ``path`` imports, as ``grading.x`` or, in a script, ``x``."""
    modules = {path.stem for path in (REPO / "grading").glob("*.py")}
    return {name.removeprefix("grading.") for name in imported_names(path)
            if name.startswith("grading.") or name in modules} - {"__init__"}


def test_the_package_docstring_lists_every_module_once_but_the_scripts():
    modules = {path.stem for path in (REPO / "grading").glob("*.py")} - {"__init__"}
    assert sorted(LAYERS) == sorted(set(LAYERS)) == sorted(modules - set(SCRIPTS))


def test_each_module_imports_only_the_layers_listed_before_it():
    """Above the exchange, a layer may also run the SCRIPTS, which import only the exchange."""
    for index, name in enumerate(LAYERS):
        scripts = set(SCRIPTS) if index > LAYERS.index("exchange") else set()
        assert grading_imports(REPO / "grading" / f"{name}.py") <= set(LAYERS[:index]) | scripts, name


def test_the_phase_and_box_scripts_import_only_the_exchange():
    for name, allowed in SCRIPTS.items():
        assert grading_imports(REPO / "grading" / f"{name}.py") == allowed


def test_a_module_importing_a_layer_above_it_is_caught(tmp_path):
    """The check is sharp: sandbox importing verdicts would be an arrow back up."""
    upward = tmp_path / "sandbox.py"
    upward.write_text("from grading.verdicts import Result\n")
    assert not grading_imports(upward) <= set(LAYERS[:LAYERS.index("sandbox")])


def test_nothing_in_a_parts_folder_imports_grading():
    for path in REPO.glob("A3_Part*/*.py"):
        assert not any(name.split(".")[0] == "grading" for name in imported_names(path)), path
