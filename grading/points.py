"""A part's points shared by its checks, and what each check scores on a file's Result.

Each part's points (POINTS, the handout's) are shared by every check of its contract in
proportion to the check's weight, fixed before the file runs (protocol.expected_checks). Every
check keeps its share whatever the file does: one it stopped (whatever it raised), or that a
file stopped before (a crash, a loop, memory), and every check of a part that could not be
checked (missing, refused) score 0, with the reason. A check scores when it passed and every
check it ``rests_on`` (the handout's values it belongs to) scored; a device check the judge
could not run (the simulated GPU's limits, ``contract_probes.NOT_RUN``) scores on the same
terms, and says so.
"""
from typing import NamedTuple

from grading.protocol import PARTS, part_module

POINTS = {"A": 100, "B": 50}  # the handout's: Part A the required 100 points, Part B the bonus 50


class Scored(NamedTuple):
    """One check's score on a file, out of its share, and what it says."""

    name: str
    score: float
    max_score: float
    output: str


def scored_part(result, points, weights):
    """[Scored] of every check of ``result``'s part (``weights``: {name: weight}), named
    "Part A (vae.py): <check>", out of ``points`` in all; a portability warning adds a 0-point
    line that says why."""
    label = f"Part {result.part} ({PARTS[result.part].file})"
    recorded = {test["test"]: test for test in result.tests}
    worth = dict(zip(weights, shares(points, list(weights.values()))))
    stopped = f"not run: {result.verdict}: {result.first_failure}"
    scored = scored_checks(result.part, recorded)
    lines = []
    for name in weights:
        record = recorded.get(name, {"outcome": "stopped", "message": stopped})
        lines.append(Scored(f"{label}: {name}", worth[name] if name in scored else 0, worth[name],
                            check_output(record, scored)))
    if result.verdict == "portability":
        lines.append(Scored(f"{label}: portability", 0, 0, result.first_failure))
    return lines


def scored_checks(part, recorded):
    """The names of the checks that score: passed (or not run by the judge's decision), with
    every check they rest on scored in turn."""
    not_run = part_module(part, "contract_probes").NOT_RUN
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
    """What a check says: its message, or why a check that passed does not score."""
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
