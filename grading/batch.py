"""Grade a folder of submissions, several at once, and write the staff's report.

The report folder gets ``report.csv`` (one row per submission and part), ``report.md`` (the same
table, the counts of each verdict and the protections in force) and
``<submission>/results.json`` in Gradescope's format (gradescope.results_json).
"""
import csv
import json
import os
import re
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from grading.gradescope import WITHOUT_ISOLATION, results_json
from grading.protocol import PARTS, box_protections, expected_checks
from grading.sandbox import Limits, require_isolation
from grading.submissions import IGNORED_FOLDERS, grade_part, read_submission
from grading.verdicts import VERDICTS

COLUMNS = ("submission", "part", "file", "verdict", "passed", "total", "first_failure", "seconds")


def grade(submissions, out, limits=Limits(), jobs=None, progress=True, without_isolation=False):
    """Grade every zip and folder in ``submissions``; write the report into ``out``; the rows.
    Raises IsolationMissing where the box could write the grader, unless ``without_isolation``."""
    entries = sorted(path for path in Path(submissions).iterdir()
                     if (path.is_dir() or path.suffix.lower() == ".zip") and not path.name.startswith(".")
                     and path.name not in IGNORED_FOLDERS)
    protected = box_protections(limits)
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
        graded = results_json(mine, checks=checks, without_isolation=without_isolation)
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


def safe_name(name):
    """``name`` as a folder name that stays inside the report."""
    cleaned = re.sub(r"[^\w.-]", "_", name).lstrip(".")
    return cleaned or "_"
