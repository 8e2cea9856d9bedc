"""Build Gradescope's autograder from the contracts, or grade one submission here as it would.

    python make_autograder.py --output autograder.zip              # Part A 100 points, Part B 50
    python make_autograder.py --output autograder.zip --parts A --points A=100
    python make_autograder.py --local SUBMISSION                   # what a student would see

The zip, and what it runs per submission, are the ``grading`` package's (grading/gradescope.py).
"""
import argparse
import shutil
import tempfile
from pathlib import Path

from grading.gradescope import build, config, graded, shown_to_the_student
from grading.points import POINTS
from grading.protocol import PARTS
from grading.sandbox import IsolationMissing, Limits


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
    if args.local is not None:
        try:
            local(args.local, args.parts, args.points, args.limits, args.without_isolation)
        except IsolationMissing as missing:
            raise SystemExit(str(missing)) from None
        return
    try:
        build(args.output, args.parts, args.points, args.limits, args.without_isolation)
    except OSError as error:
        raise SystemExit(f"Cannot write {args.output}: {error.strerror or error}. "
                         "Choose a folder you can write to.") from None
    print(f"Wrote {args.output}: upload it as the assignment's autograder on Gradescope "
          f"({', '.join(f'Part {part} {args.points[part]:g} points' for part in args.parts)}).")


if __name__ == "__main__":
    main()
