"""Build Gradescope's autograder from the contracts, and run it there, in tests or on a laptop.

    python make_autograder.py --output autograder.zip              # Part A 100 points, Part B 50
    python make_autograder.py --output autograder.zip --parts A --points A=100
    python make_autograder.py --local SUBMISSION                   # what a student would see

The zip follows Gradescope's autograder specification (the public gradescope/autograder_samples,
docs/specs.md): ``setup.sh`` and an executable ``run_autograder`` at its root, beside the
contracts and the tools; Gradescope unpacks it into /autograder/source. It runs setup.sh once to build its Ubuntu image (CPU torch and what the
contracts import, bounded as in requirements.txt), then run_autograder in a fresh container per
submission, from /autograder, the upload in /autograder/submission; it shows the student
/autograder/results/results.json. ``AUTOGRADER_ROOT`` names another root than /autograder, so
the same flow runs in the tests and on a staff laptop.

run_autograder finds vae.py and diffusion.py in the upload however the student made it (the
files, their folders, or make_submission.py's zip, which Gradescope unpacks; a zip left whole is
unpacked with grade_submissions.py's care), checks each part with submission_checks.py (the
file answers the contract's probes in a box; the checks are judged in processes that never
import it), and writes one test per check with grade_submissions.py's JSON builder: the same
box, verdicts and points as ``grade_submissions.py``.
"""
import argparse
import json
import re
import shutil
import stat
import tempfile
import time
import zipfile
from pathlib import Path

from grade_submissions import POINTS, gradescope, grade_part, IGNORED_FOLDERS, read_submission
from submission_checks import (PARTS, IsolationMissing, Limits, digests, expected_checks, judge_sources, protections,
                               require_isolation)

REPO_ROOT = Path(__file__).resolve().parent
CONFIG = "autograder.json"  # the parts graded, their points and checks, the limits
TOOLS = ("make_autograder.py", "grade_submissions.py", "submission_checks.py")
NEEDED = ("torch", "torchvision", "numpy", "pillow", "matplotlib", "tqdm", "pytest")  # what the contracts import
CPU_TORCH = "https://download.pytorch.org/whl/cpu"

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
exec python3 "${AUTOGRADER_ROOT:-/autograder}/source/make_autograder.py" --run "${AUTOGRADER_ROOT:-/autograder}"
"""


# ---------------------------------------------------------------- building the zip


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


def source_files():
    """Repository paths of every file run_autograder needs: the tools, and both parts' contracts
    with their probes and what they read."""
    return [*TOOLS, *(name for spec in PARTS.values() for name in spec.grading_files())]


def build(output, parts, points, limits, without_isolation=False):
    """Write the autograder's zip to ``output``, the grading files as their digests were taken."""
    requirements = requirement_lines()
    shipped = {name: data for part in PARTS for name, data in judge_sources(part).items()}
    torch = " ".join(f'"{requirements[name]}"' for name in ("torch", "torchvision"))
    others = [line for name, line in requirements.items() if name not in ("torch", "torchvision")]
    with zipfile.ZipFile(output, "w", zipfile.ZIP_DEFLATED) as archive:
        write_executable(archive, "setup.sh", SETUP_SH.format(cpu_torch=CPU_TORCH, torch=torch))
        write_executable(archive, "run_autograder", RUN_AUTOGRADER)
        archive.writestr("requirements.txt", "\n".join(others) + "\n")
        archive.writestr(CONFIG, json.dumps(config(parts, points, limits, without_isolation), indent=1))
        for name in source_files():
            archive.writestr(name, shipped.get(name) or (REPO_ROOT / name).read_bytes())


def write_executable(archive, name, text):
    """A file with its executable bits, which Gradescope needs on run_autograder."""
    entry = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
    entry.external_attr = (stat.S_IFREG | 0o755) << 16
    archive.writestr(entry, text, zipfile.ZIP_DEFLATED)


# ---------------------------------------------------------------- grading one submission


def graded(upload, settings):
    """The results.json of the submission in the folder ``upload``. Raises IsolationMissing
    where the box could write the grader (unless the zip was built --without-isolation), and
    RuntimeError where the grading files are not the ones the zip was built with."""
    started = time.monotonic()
    parts, limits = settings["parts"], Limits(**settings["limits"])
    protected = protections(limits)
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
    return {**gradescope(results, points, checks, settings["without_isolation"]),
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
    for name, what in protections(Limits(**settings["limits"])).items():
        print(f"- {name}: {what or 'NOT in force'}")


def shown_to_the_student(results):
    """results.json as lines of text: each test with its score, the output of those short of it."""
    lines = []
    for test in results["tests"]:
        lines.append(f"{test['score']:>8.2f} / {test['max_score']:<8.2f} {test['name']}")
        if test["output"] and (test["score"] < test["max_score"] or test["max_score"] == 0):
            lines.append(f"{'':>20}{test['output']}")
    lines.append(f"Total: {results['score']}")
    lines += [results["output"]] if results.get("output") else []
    return "\n".join(lines)


def local(submission, parts, points, limits, without_isolation=False):
    """--local: grade one submission (a folder or a zip) on this machine, as Gradescope would."""
    with tempfile.TemporaryDirectory(prefix="a3_upload_") as folder:
        upload = Path(submission)
        if upload.is_file():  # a zip, held in a folder as Gradescope holds an upload
            upload = Path(shutil.copy(upload, folder)).parent
        print(shown_to_the_student(graded(upload, config(parts, points, limits, without_isolation))))


def points_of(text):
    """'A=100' -> ('A', 100.0), for --points."""
    part, _, value = text.partition("=")
    if part not in PARTS or not value:
        raise argparse.ArgumentTypeError(f"{text!r}: give PART=POINTS with PART one of {', '.join(PARTS)}, e.g. A=100")
    try:
        return part, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the points must be a number") from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--output", type=Path, help="write the autograder's zip here")
    action.add_argument("--local", type=Path, metavar="SUBMISSION", help="grade a submission (folder or zip) here")
    action.add_argument("--run", type=Path, metavar="ROOT", help=argparse.SUPPRESS)  # run_autograder's
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="the parts graded")
    parser.add_argument("--points", nargs="+", type=points_of, default=[],
                        help=f"points of a part, e.g. A=100 B=50 (default: {' '.join(f'{p}={n}' for p, n in POINTS.items())})")
    parser.add_argument("--seconds", type=float, default=Limits.seconds, help="wall time per part and submission")
    parser.add_argument("--memory-gib", type=float, default=Limits.memory_bytes / 2 ** 30, help="memory per part")
    parser.add_argument("--without-isolation", action="store_true",
                        help="grade where a file could write the grader (every result says so)")
    args = parser.parse_args(argv)
    args.points = {**POINTS, **dict(args.points)}
    args.limits = Limits(seconds=args.seconds, memory_bytes=int(args.memory_gib * 2 ** 30))
    if args.local is not None and not args.local.exists():
        parser.error(f"--local {args.local}: no such file or folder")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.run is not None:
        run(args.run)
    elif args.local is not None:
        try:
            local(args.local, args.parts, args.points, args.limits, args.without_isolation)
        except IsolationMissing as missing:
            raise SystemExit(str(missing)) from None
    else:
        try:
            build(args.output, args.parts, args.points, args.limits, args.without_isolation)
        except OSError as error:
            raise SystemExit(f"Cannot write {args.output}: {error.strerror or error}. "
                             "Choose a folder you can write to.") from None
        print(f"Wrote {args.output}: upload it as the assignment's autograder on Gradescope "
              f"({', '.join(f'Part {part} {args.points[part]:g} points' for part in args.parts)}).")


if __name__ == "__main__":
    main()
