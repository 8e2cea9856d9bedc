"""Grade a folder of submissions with the contracts, for course staff.

    python grade_submissions.py SUBMISSIONS --out REPORT

SUBMISSIONS holds one zip (or one folder) per submission, named after the student. In each,
vae.py and diffusion.py are found wherever they sit, and each answers its contract's probes in a
box of its own, judged apart (the ``grading`` package). REPORT gets ``report.csv``,
``report.md`` and ``<submission>/results.json`` in the format of Gradescope's autograders.
Zips from strangers are unpacked with care: entries outside the folder, links, zip bombs,
encrypted and corrupt zips are refused with a reason.
"""
import argparse
import os
from pathlib import Path

from grading.batch import grade, verdict_counts
from grading.sandbox import IsolationMissing, Limits


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
