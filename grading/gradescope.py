"""Gradescope: its results.json, the autograder's zip, and what runs in it per submission.

The zip follows Gradescope's autograder specification (the public gradescope/autograder_samples,
docs/specs.md): ``setup.sh`` and an executable ``run_autograder`` at its root, beside this
package, the contracts with their probes and the settings (``autograder.json``); Gradescope
unpacks it into /autograder/source. It runs setup.sh once to build its Ubuntu image (CPU torch
and what the contracts import, bounded as in requirements.txt), then run_autograder in a fresh
container per submission, from /autograder, the upload in /autograder/submission; it shows the
student /autograder/results/results.json. ``AUTOGRADER_ROOT`` names another root than
/autograder, so the same flow runs in the tests and on a staff laptop. run_autograder runs

    python3 -m grading.gradescope ROOT

which finds vae.py and diffusion.py in the upload however the student made it (the files, their
folders, or make_submission.py's zip, which Gradescope unpacks; a zip left whole is unpacked with
the same care, submissions.py), checks each part (verdicts.check_file) and writes one test per
check with its points (points.py).
"""
import json
import re
import stat
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from grading.points import POINTS, scored_part
from grading.protocol import PARTS, REPO_ROOT, box_protections, digests, expected_checks, judge_sources
from grading.sandbox import IsolationMissing, Limits, require_isolation
from grading.submissions import IGNORED_FOLDERS, grade_part, read_submission

CONFIG = "autograder.json"  # the parts graded, their points and checks, the limits
NEEDED = ("torch", "torchvision", "numpy", "pillow", "matplotlib", "tqdm", "pytest")  # what the contracts import
CPU_TORCH = "https://download.pytorch.org/whl/cpu"
WITHOUT_ISOLATION = ("Graded WITHOUT isolation (--without-isolation): the student's file could have written "
                     "the grader's files.")

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, to build the autograder's image (Ubuntu).
set -euo pipefail
apt-get update -q
apt-get install -y -q python3 python3-pip util-linux
export PIP_BREAK_SYSTEM_PACKAGES=1  # Ubuntu 23.04 on: the image is this autograder's alone
python3 -m pip install -q --no-cache-dir --index-url {cpu_torch} {torch}
python3 -m pip install -q --no-cache-dir -r /autograder/source/requirements.txt
"""

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this once per submission, from /autograder (AUTOGRADER_ROOT names another root).
root="${AUTOGRADER_ROOT:-/autograder}"
cd "$root/source"
exec python3 -m grading.gradescope "$root"
"""


# ---------------------------------------------------------------- results.json


def results_json(results, points=POINTS, checks=None, without_isolation=False):
    """A submission's results.json: for each part graded (its Result), one test per check of its
    contract (``checks``: part -> {name: weight}; by default collected from the contract), the
    part's ``points`` shared as points.py says."""
    tests = []
    for result in results:
        weights = checks[result.part] if checks else expected_checks(result.part)
        tests += [gradescope_test(line) for line in scored_part(result, points[result.part], weights)]
    graded = {"score": round(sum(item["score"] for item in tests), 2), "tests": tests}
    return {**graded, "output": WITHOUT_ISOLATION} if without_isolation else graded


def gradescope_test(line):
    """One test of results.json, always visible to the student."""
    return {"name": line.name, "score": line.score, "max_score": line.max_score,
            "status": "passed" if line.score >= line.max_score else "failed", "output": line.output,
            "visibility": "visible"}


def shown_to_the_student(results):
    """results.json as lines of text: each test with its score, the output of those short of it."""
    lines = []
    for item in results["tests"]:
        lines.append(f"{item['score']:>8.2f} / {item['max_score']:<8.2f} {item['name']}")
        if item["output"] and (item["score"] < item["max_score"] or item["max_score"] == 0):
            lines.append(f"{'':>20}{item['output']}")
    lines.append(f"Total: {results['score']}")
    lines += [results["output"]] if results.get("output") else []
    return "\n".join(lines)


# ---------------------------------------------------------------- the autograder's zip


def requirement_lines():
    """{package: its line of requirements.txt}, for the packages the contracts import."""
    lines = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        name = re.split(r"[<>=!~ \[#]", line.strip(), maxsplit=1)[0].lower()
        if name in NEEDED:
            lines[name] = line.split("#")[0].strip()
    return lines


def config(parts, points, limits, without_isolation=False):
    """The autograder's settings: each part graded, with its points, its checks and their
    weights, and the sha256 of each grading file; the box's limits; whether to grade without
    isolation."""
    return {"parts": {part: {"points": points[part], "checks": expected_checks(part), "files": digests(part)}
                      for part in parts},
            "limits": {"seconds": limits.seconds, "memory_bytes": limits.memory_bytes},
            "without_isolation": without_isolation}


def package_files():
    """Repository paths of this package's modules, which run_autograder runs."""
    return sorted(path.relative_to(REPO_ROOT).as_posix() for path in Path(__file__).parent.glob("*.py"))


def build(output, parts, points, limits, without_isolation=False):
    """Write the autograder's zip to ``output``: this package, and both parts' grading files as
    their digests were taken."""
    requirements = requirement_lines()
    shipped = {name: data for part in PARTS for name, data in judge_sources(part).items()}
    torch = " ".join(f'"{requirements[name]}"' for name in ("torch", "torchvision"))
    others = [line for name, line in requirements.items() if name not in ("torch", "torchvision")]
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        write_executable(archive, "setup.sh", SETUP_SH.format(cpu_torch=CPU_TORCH, torch=torch))
        write_executable(archive, "run_autograder", RUN_AUTOGRADER)
        archive.writestr("requirements.txt", "\n".join(others) + "\n")
        archive.writestr(CONFIG, json.dumps(config(parts, points, limits, without_isolation), indent=1))
        for name in dict.fromkeys([*package_files(), *shipped]):
            archive.writestr(name, shipped.get(name) or (REPO_ROOT / name).read_bytes())


def write_executable(archive, name, text):
    """A file with its executable bits, which Gradescope needs on run_autograder."""
    entry = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
    entry.external_attr = (stat.S_IFREG | 0o755) << 16
    archive.writestr(entry, text, zipfile.ZIP_DEFLATED)


# ---------------------------------------------------------------- grading one upload


def graded(upload, settings):
    """The results.json of the submission in the folder ``upload``. Raises IsolationMissing
    where the box could write the grader (unless the zip was built --without-isolation), and
    RuntimeError where the grading files are not the ones the zip was built with."""
    started = time.monotonic()
    parts, limits = settings["parts"], Limits(**settings["limits"])
    protected = box_protections(limits)
    if not settings["without_isolation"]:
        require_isolation(protected)
    changed = [part for part in parts if digests(part) != parts[part]["files"]]
    if changed:
        raise RuntimeError(f"the grading files of part {changed[0]} are not the ones this autograder was built with: "
                           "build it again with make_autograder.py")
    with tempfile.TemporaryDirectory(prefix="a3_autograder_") as scratch:
        submission = read_submission(upload, Path(scratch))
        if not submission.files and (whole := lone_zip(upload)):  # a zip Gradescope left whole
            submission = read_submission(whole, Path(scratch))
        results = [grade_part(submission, part, limits, protected) for part in parts]
    points = {part: parts[part]["points"] for part in parts}
    checks = {part: parts[part]["checks"] for part in parts}
    return {**results_json(results, points, checks, settings["without_isolation"]),
            "execution_time": round(time.monotonic() - started), "visibility": "visible", "stdout_visibility": "hidden"}


def lone_zip(upload):
    """The one zip at the top of the upload, if it holds nothing else but ignored folders."""
    entries = [path for path in upload.iterdir() if path.name not in IGNORED_FOLDERS]
    return entries[0] if len(entries) == 1 and entries[0].suffix.lower() == ".zip" else None


def run(root):
    """What run_autograder does: grade ``root``/submission with ``root``/source's settings and
    write ``root``/results/results.json."""
    root = Path(root)
    settings = json.loads((root / "source" / CONFIG).read_text())
    try:
        results = graded(root / "submission", settings)
    except (IsolationMissing, RuntimeError) as stopped:  # said to the student and to staff, never a traceback
        results = {"score": 0, "output": f"Not graded: {stopped}", "tests": [], "visibility": "visible"}
    (root / "results").mkdir(parents=True, exist_ok=True)
    (root / "results" / "results.json").write_text(json.dumps(results, indent=1))
    said = results.get("output") or f"score {results['score']} in {results['execution_time']} s"
    print(said, "- the box's protections here:")
    for name, what in box_protections(Limits(**settings["limits"])).items():
        print(f"- {name}: {what or 'NOT in force'}")


if __name__ == "__main__":
    run(sys.argv[1])
