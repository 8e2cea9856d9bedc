"""Build the zip the handout asks for: each part's code and its executed notebook.

    python make_submission.py                 # both parts -> A3_submission.zip
    python make_submission.py --parts A       # Part A only
    python make_submission.py --output ~/A3.zip

Exactly the assignment's files are packed (PART_FILES: the starter's names and the modules
they import, so that a part's folder runs alone), so
scratch code, data, results, checkpoints, caches, wandb runs and credentials can
never slip in; everything else at the top of a part's folder is listed on stderr
as left out. A notebook that was never run, or that holds an error output, is
packed anyway but reported on stderr, because the graders read the outputs.

Before packing, vae.py and diffusion.py are run against their contracts (vae_contract.py,
diffusion_contract.py, the repository's own copies), each in a
box of its own (grading/verdicts.py), and one line per file gives the verdict and
its first cause; the zip is written whatever they say. --no-check skips it.
"""
import argparse
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat

from grading.protocol import PARTS
from grading.verdicts import check_file

REPO_ROOT = Path(__file__).resolve().parent
PART_FOLDERS = {"A": "A3_PartA", "B": "A3_PartB"}
PART_FILES = {  # the starter's files, and the modules of this package that they import
    "A": ("vae.py", "a3_helper.py", "variational_autoencoders.ipynb",
          "vae_contract.py", "vae_probes.py", "contract_check.py", "contract_probes.py"),  # the notebook's check
    "B": ("diffusion.py", "main.py", "trainer.py", "unet.py", "utils.py",
          "afhq.py", "checkpoints.py", "device.py", "fid_score.py", "files.py", "images.py",
          "reporting.py", "settings.py", "run_diffusion.ipynb", "requirements.txt",
          "diffusion_contract.py", "diffusion_probes.py", "diffusion_reference.py", "simulated_devices.py",
          "contract_check.py", "contract_probes.py"),
}


def files_of_part(root, part):
    """The assignment's files of one part, sorted.

    Raises FileNotFoundError naming every missing file and the folder searched.
    """
    folder = Path(root) / PART_FOLDERS[part]
    missing = [name for name in PART_FILES[part] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Part {part}: {', '.join(missing)} not found in {folder}. Put the part's finished "
            "files there, by the starter's names, or choose the parts you have with --parts."
        )
    return sorted(folder / name for name in PART_FILES[part])


def entries_left_out(root, part):
    """Everything else at the top of a part's folder (scratch code, data, credentials), sorted."""
    folder = Path(root) / PART_FOLDERS[part]
    return sorted(path for path in folder.iterdir() if path.name not in PART_FILES[part])


def notebook_problems(path):
    """Why a notebook's outputs would not satisfy a grader: a list of sentences, empty if none."""
    notebook = nbformat.read(path, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    problems = []
    if not any(cell.get("execution_count") for cell in code_cells):
        problems.append("it has not been run (no code cell has been executed)")
    errors = [output for cell in code_cells for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    if errors:
        problems.append(f"it holds {len(errors)} error output(s), the first: "
                        f"{errors[0].get('ename', 'Error')}: {errors[0].get('evalue', '')}")
    return problems


def warn_about_notebooks(files, root):
    """Print a clear warning on stderr for every notebook with problems; return how many."""
    warned = 0
    for path in files:
        if path.suffix != ".ipynb":
            continue
        for problem in notebook_problems(path):
            print(f"WARNING: {path.relative_to(root)}: {problem}. Run it top to bottom, "
                  "save it, then build the zip again.", file=sys.stderr)
            warned += 1
    return warned


def write_zip(files, root, output):
    """Write `files` into the zip `output`, each under its path relative to `root`."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, arcname=path.relative_to(root).as_posix())
    return output


def report_packed(files, root, output):
    """Print each packed file with its size, then the zip's own size."""
    for path in files:
        print(f"  {path.relative_to(root).as_posix():<45} {path.stat().st_size / 1024:8.1f} KiB")
    print(f"Wrote {output} ({output.stat().st_size / 1024:.1f} KiB, {len(files)} files)")


def report_left_out(entries, root):
    """List on stderr every file and folder that was not packed, and why."""
    if not entries:
        return
    print("Left out of the zip (not part of the assignment's files, PART_FILES):", file=sys.stderr)
    for path in entries:
        print(f"  {path.relative_to(root).as_posix()}{'/' if path.is_dir() else ''}",
              file=sys.stderr)


def check_against_contracts(root, parts):
    """Run each part's contract on its file, both at once, and print one line per file: the
    verdict, with its first cause unless it passes (on stderr, as a warning)."""
    contracts = [PARTS[part].contract for part in parts if not (REPO_ROOT / PARTS[part].contract).is_file()]
    if contracts:
        print(f"WARNING: not checked: {', '.join(contracts)} not found next to {Path(__file__).name}",
              file=sys.stderr)
        return
    files = [Path(PART_FOLDERS[part]) / PARTS[part].file for part in parts]
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        results = list(pool.map(lambda part, file: check_file(part, root / file, file.as_posix()), parts, files))
    for result in results:
        counts = f" ({result.passed}/{result.total} checks passed)" if result.total else ""
        if result.verdict == "pass":
            print(f"Checked {result.file}: pass{counts}")
        else:
            print(f"WARNING: {result.file}: {result.verdict}{counts}: {result.first_failure}", file=sys.stderr)


def build_submission(root, parts, output, check=True):
    """Collect, check, zip and report the chosen parts; return the zip's path."""
    root = Path(root).resolve()
    parts = list(dict.fromkeys(parts))
    files = [path for part in parts for path in files_of_part(root, part)]
    warn_about_notebooks(files, root)
    if check:
        check_against_contracts(root, parts)
    output = write_zip(files, root, output)
    report_packed(files, root, output)
    report_left_out([path for part in parts for path in entries_left_out(root, part)], root)
    return output


def parse_args(argv=None):
    """Command-line options: which parts to pack and where the zip goes (not a folder)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=sorted(PART_FOLDERS), default=["A", "B"],
                        help="parts to pack (default: both)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "A3_submission.zip",
                        help="path of the zip to write (default: A3_submission.zip here)")
    parser.add_argument("--no-check", action="store_true",
                        help="do not run the contracts on vae.py and diffusion.py before packing")
    args = parser.parse_args(argv)
    if args.output.is_dir():
        parser.error(f"--output {args.output} is a folder, not a zip file. Pass a file path "
                     f"such as {args.output / 'A3_submission.zip'}.")
    return args


def main(argv=None):
    """Entry point: build the zip, printing a bad-input message without a traceback."""
    args = parse_args(argv)
    try:
        build_submission(REPO_ROOT, args.parts, args.output, check=not args.no_check)
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
