"""Grade a folder of submissions with the contracts, for course staff.

    python grade_submissions.py SUBMISSIONS --out REPORT

SUBMISSIONS holds one zip (or one folder) per submission, named after the student. In each,
vae.py and diffusion.py are found wherever they sit (``__MACOSX/`` and ``.ipynb_checkpoints/``
ignored), and each answers its contract's probes in a box of its own, judged apart
(submission_checks.py).
REPORT gets ``report.csv`` (one row per submission and part), ``report.md`` (the same table,
the counts of each verdict and the protections in force) and ``<submission>/results.json`` in
the format of Gradescope's autograders. Zips from strangers are unpacked with care: entries
outside the folder, links, zip bombs, encrypted and corrupt zips are refused with a reason.
"""

import argparse
import csv
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from submission_checks import (PARTS, VERDICTS, IsolationMissing, Limits, Result, check_file, expected_checks,
                               protections, require_isolation, shared)

COLUMNS = ("submission", "part", "file", "verdict", "passed", "total", "first_failure", "seconds")
IGNORED_FOLDERS = {"__MACOSX", ".ipynb_checkpoints", "__pycache__"}
MAX_ENTRIES = 2000
MAX_UNPACKED_BYTES = 200 * 2 ** 20
MAX_RATIO = 200  # unpacked size over packed size, of an entry or of the whole zip
MAX_FILE_BYTES = 5 * 2 ** 20  # a vae.py or diffusion.py larger than this is not a student's
POINTS = {"A": 100, "B": 50}  # the handout's: Part A the required 100 points, Part B the bonus 50
WITHOUT_ISOLATION = ("Graded WITHOUT isolation (--without-isolation): the student's file could have written "
                     "the grader's files.")


class Refused(Exception):
    """A zip that is not unpacked, and why."""


@dataclass
class Submission:
    """One student's submission: its files by part, or the reason none can be checked."""

    name: str
    files: dict = field(default_factory=dict)  # part -> (path inside the submission, path on disk)
    problem: str = ""  # why the submission could not be read
    note: str = ""  # said where a file is missing


# ---------------------------------------------------------------- unpacking zips from strangers


def unpack(zip_path, destination):
    """Unpack the zip into ``destination`` with every check below; a note on its names ('' if
    none). Raises Refused with the reason for a zip that is corrupt, encrypted, empty, too large,
    a bomb, or has an entry that would land outside ``destination``."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            entries = archive.infolist()
            check_entries(entries)
            for entry in entries:
                if not entry.is_dir() and not is_link(entry):
                    write_entry(archive, entry, destination)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, OSError) as error:
        raise Refused(f"not a readable zip ({getattr(error, 'strerror', None) or error})") from None  # no path
    foreign = [entry.filename for entry in entries if not entry.flag_bits & 0x800 and not entry.filename.isascii()]
    return f"its names are not UTF-8 (e.g. {foreign[0]!r}): zip it again with UTF-8 names" if foreign else ""


def check_entries(entries):
    """Raise Refused unless every entry may be unpacked."""
    if not entries:
        raise Refused("the zip is empty")
    if len(entries) > MAX_ENTRIES:
        raise Refused(f"the zip has {len(entries)} entries, more than {MAX_ENTRIES}")
    if any(entry.flag_bits & 0x1 for entry in entries):
        raise Refused("the zip is encrypted (password-protected)")
    for entry in entries:
        parts = PurePosixPath(entry.filename.replace("\\", "/")).parts
        if entry.filename.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", entry.filename) or ".." in parts:
            raise Refused(f"entry {entry.filename!r} would be written outside the submission's folder")
    unpacked = sum(entry.file_size for entry in entries)
    packed = sum(entry.compress_size for entry in entries)
    if unpacked > MAX_UNPACKED_BYTES:
        raise Refused(f"it would unpack to {unpacked / 2 ** 20:.0f} MiB, more than {MAX_UNPACKED_BYTES // 2 ** 20} MiB")
    if any(entry.file_size > MAX_RATIO * max(entry.compress_size, 1) for entry in entries) or unpacked > MAX_RATIO * max(packed, 1):
        raise Refused(f"it is compressed more than {MAX_RATIO} times (a zip bomb?)")


def is_link(entry):
    """Whether the entry is a symbolic link (never followed, never written)."""
    return stat.S_ISLNK(entry.external_attr >> 16)


def write_entry(archive, entry, destination):
    """Write one entry under ``destination``. zipfile reads no more than the entry declares, the
    size check_entries capped, and refuses an entry whose content does not match its CRC."""
    target = destination.joinpath(*PurePosixPath(entry.filename.replace("\\", "/")).parts)
    if not target.resolve().is_relative_to(destination.resolve()):
        raise Refused(f"entry {entry.filename!r} would be written outside the submission's folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(entry) as source, open(target, "wb") as copy:
        shutil.copyfileobj(source, copy)


# ---------------------------------------------------------------- finding the files


def read_submission(path, scratch):
    """The Submission at ``path`` (a zip, unpacked into ``scratch``, or a folder)."""
    submission = Submission(path.stem if path.is_file() else path.name)
    folder = path
    if path.is_file():
        folder = scratch / "unpacked"
        folder.mkdir()
        try:
            submission.note = unpack(path, folder)
        except Refused as refused:
            submission.problem = f"zip refused: {refused}"
            return submission
    for part, (file_name, *_) in PARTS.items():
        found = find(folder, file_name)
        if found is not None:
            submission.files[part] = (found.relative_to(folder).as_posix(), found)
    return submission


def find(folder, file_name):
    """The submission's ``file_name``: the shallowest regular file of that name, outside the
    ignored folders and not a link; ties go to the first path in sorted order."""
    candidates = []
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if name not in IGNORED_FOLDERS)
        path = Path(root) / file_name
        if file_name in files and path.is_file() and not path.is_symlink():
            candidates.append(path)
    return min(candidates, key=lambda path: (len(path.parts), str(path)), default=None)


# ---------------------------------------------------------------- grading


def grade(submissions, out, limits=Limits(), jobs=None, progress=True, without_isolation=False):
    """Grade every zip and folder in ``submissions``; write the report into ``out``; the rows.
    Raises IsolationMissing where the box could write the grader, unless ``without_isolation``."""
    entries = sorted(path for path in Path(submissions).iterdir()
                     if (path.is_dir() or path.suffix.lower() == ".zip") and not path.name.startswith(".")
                     and path.name not in IGNORED_FOLDERS)
    protected = protections(limits)
    if not without_isolation:
        require_isolation(protected)
    checks = {part: expected_checks(part) for part in PARTS}  # fixed before any file runs
    with tempfile.TemporaryDirectory(prefix="a3_grading_") as scratch:
        read = [read_submission(path, Path(tempfile.mkdtemp(dir=scratch))) for path in entries]
        tasks = [(submission, part) for submission in read for part in PARTS]
        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            results = list(tqdm(pool.map(lambda task: grade_part(*task, limits, protected), tasks),
                                total=len(tasks), desc="grading", unit="file", disable=not progress))
    rows = [(submission.name, result) for (submission, _), result in zip(tasks, results)]
    write_report(Path(out), rows, protected, checks, without_isolation)
    return rows


def grade_part(submission, part, limits, protected):
    """The Result of one part of one submission."""
    file_name = PARTS[part][0]
    if submission.problem:
        return Result(part, "", "error", first_failure=submission.problem)
    if part not in submission.files:
        return Result(part, "", "missing", first_failure=f"no {file_name} in the submission" +
                      (f"; {submission.note}" if submission.note else ""))
    shown_as, path = submission.files[part]
    if path.stat().st_size > MAX_FILE_BYTES:
        return Result(part, shown_as, "error", first_failure=f"{file_name} is larger than {MAX_FILE_BYTES // 2 ** 20} MiB")
    return check_file(part, path, shown_as, limits, protected)


# ---------------------------------------------------------------- the report


def write_report(out, rows, protected, checks, without_isolation=False):
    """report.csv, report.md and <submission>/results.json under ``out``, each part's points
    shared by its ``checks`` ({part: {name: weight}})."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "report.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(COLUMNS)
        writer.writerows(row_values(name, result) for name, result in rows)
    (out / "report.md").write_text(markdown(rows, protected, without_isolation))
    for name in dict.fromkeys(name for name, _ in rows):
        folder = out / safe_name(name)
        folder.mkdir(exist_ok=True)
        mine = [result for row_name, result in rows if row_name == name]
        graded = gradescope(mine, checks=checks, without_isolation=without_isolation)
        (folder / "results.json").write_text(json.dumps(graded, indent=1))


def row_values(name, result):
    """A report row, in the order of COLUMNS."""
    return (name, result.part, result.file, result.verdict, result.passed, result.total,
            result.first_failure, f"{result.seconds:.1f}")


def verdict_counts(rows):
    """{verdict: how many rows have it}, for every verdict."""
    return {verdict: sum(result.verdict == verdict for _, result in rows) for verdict in VERDICTS}


def markdown(rows, protected, without_isolation=False):
    """The report as a Markdown page: protections, counts of each verdict, the table."""
    counts = verdict_counts(rows)
    lines = ["# Grading report", "", "## Protections in force", ""]
    lines += [f"**{WITHOUT_ISOLATION}**", ""] if without_isolation else []
    lines += [f"- {name}: {what}" if what else f"- {name}: **not in force** on this machine"
              for name, what in protected.items()]
    lines += ["", "## Verdicts", "", " | ".join(f"{verdict}: {count}" for verdict, count in counts.items()), "",
              "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(value).replace("|", "\\|") for value in row_values(name, result)) + " |"
              for name, result in rows]
    return "\n".join(lines) + "\n"


def gradescope(results, points=POINTS, checks=None, without_isolation=False):
    """A submission's results.json in Gradescope's format: for each part graded, one test per
    check of its contract (``checks``: part -> {name: weight}; by default collected from the
    contract), named "Part A (vae.py): <check>", the part's ``points`` shared by every check in
    proportion to its weight, fixed before the file ran (``graded_checks``)."""
    tests, score = [], 0.0
    for result in results:
        weights = checks[result.part] if checks else expected_checks(result.part)
        part_tests, part_score = graded_checks(result, points[result.part], weights)
        tests += part_tests
        score += part_score
    graded = {"score": round(score, 2), "tests": tests}
    return {**graded, "output": WITHOUT_ISOLATION} if without_isolation else graded


def graded_checks(result, points, weights):
    """(Gradescope's tests of one part, their score).

    Every check keeps its share whatever the file does: one it stopped (whatever it raised), or
    that a file stopped before (a crash, a loop, memory), and every check of a part that could
    not be checked (missing, refused) score 0, with the reason. A check scores when it passed
    and every check it ``rests_on`` (the handout's values it belongs to) scored; a device check
    the judge could not run (the simulated GPU's limits, ``NOT_RUN``) scores on the same terms,
    and says so. A portability warning is a 0-point test that says why."""
    label = f"Part {result.part} ({PARTS[result.part].file})"
    recorded = {test["test"]: test for test in result.tests}
    worth = dict(zip(weights, shares(points, list(weights.values()))))
    stopped = f"not run: {result.verdict}: {result.first_failure}"
    scored = scored_checks(recorded)
    tests, score = [], 0.0
    for name in weights:
        record = recorded.get(name, {"outcome": "stopped", "message": stopped})
        earned = worth[name] if name in scored else 0
        tests.append(gradescope_test(f"{label}: {name}", earned, worth[name], check_output(record, scored)))
        score += earned
    if result.verdict == "portability":
        tests.append(gradescope_test(f"{label}: portability", 0, 0, result.first_failure))
    return tests, round(score, 2)


def scored_checks(recorded):
    """The names of the checks that score: passed (or not run by the judge's decision), with
    every check they rest on scored in turn."""
    not_run = shared("contract_probes").NOT_RUN
    scored = {name for name, record in recorded.items() if record["outcome"] == "passed" or (
        record["outcome"] == "skipped" and record["message"].startswith(not_run) and record.get("rests_on"))}
    while True:
        kept = {name for name in scored if not unmet(recorded[name], scored)}
        if kept == scored:
            return scored
        scored = kept


def unmet(record, scored):
    """The checks ``record`` rests on that did not score (a name covers its parametrized checks)."""
    return [check for check in record.get("rests_on", [])
            if not any(name == check or name.startswith(f"{check}[") for name in scored)]


def check_output(record, scored):
    """What a check's test says: its message, or why a check that passed does not score."""
    missing = unmet(record, scored)
    if record["outcome"] in ("passed", "skipped") and missing:
        return f"{record['outcome']}, not scored: it rests on {missing[0]}, which did not score"
    return record["message"]


def shares(points, weights):
    """``points`` split in proportion to ``weights``, in whole hundredths that add up to it
    exactly (the largest remainders get the hundredths left over)."""
    total, hundredths = sum(weights) or 1, round(points * 100)
    exact = [hundredths * weight / total for weight in weights]
    floors = [int(value) for value in exact]
    left = hundredths - sum(floors)
    for index in sorted(range(len(weights)), key=lambda index: floors[index] - exact[index])[:left]:
        floors[index] += 1
    return [value / 100 for value in floors]


def gradescope_test(name, score, max_score, output):
    """One test of results.json, always visible to the student."""
    return {"name": name, "score": score, "max_score": max_score,
            "status": "passed" if score >= max_score else "failed", "output": output, "visibility": "visible"}


def safe_name(name):
    """``name`` as a folder name that stays inside the report."""
    cleaned = re.sub(r"[^\w.-]", "_", name).lstrip(".")
    return cleaned or "_"


# ---------------------------------------------------------------- command line


def parse_args(argv=None):
    """The command line: the submissions folder, the report folder (not inside it), limits."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("submissions", type=Path, help="folder with one zip or folder per submission")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="submissions checked at once (default: CPU count)")
    parser.add_argument("--seconds", type=float, default=Limits.seconds, help="wall time per file and part")
    parser.add_argument("--memory-gib", type=float, default=Limits.memory_bytes / 2 ** 30, help="memory per file and part")
    parser.add_argument("--without-isolation", action="store_true",
                        help="grade where a file could write the grader (every result says so)")
    args = parser.parse_args(argv)
    if not args.submissions.is_dir():
        parser.error(f"{args.submissions} is not a folder; pass the folder that holds the submissions")
    if args.out.resolve().is_relative_to(args.submissions.resolve()):
        parser.error(f"--out {args.out} is inside {args.submissions}; choose a folder outside it")
    return args


def main(argv=None):
    """Entry point: grade, then print the counts of each verdict and where the report is."""
    args = parse_args(argv)
    limits = Limits(seconds=args.seconds, memory_bytes=int(args.memory_gib * 2 ** 30))
    try:
        rows = grade(args.submissions, args.out, limits, args.jobs, without_isolation=args.without_isolation)
    except IsolationMissing as missing:
        raise SystemExit(str(missing)) from None
    counts = verdict_counts(rows)
    print(", ".join(f"{verdict} {count}" for verdict, count in counts.items() if count), f"-> {args.out / 'report.csv'}")


if __name__ == "__main__":
    main()
