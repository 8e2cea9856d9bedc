"""A submission from a stranger, read with care: a zip unpacked (entries outside its folder,
links, zip bombs, encrypted and corrupt zips refused with a reason) or a folder, its vae.py and
diffusion.py found wherever they sit (``__MACOSX/`` and ``.ipynb_checkpoints/`` ignored), and
each part's file checked (verdicts.check_file).
"""
import os
import re
import shutil
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from grading.protocol import PARTS
from grading.verdicts import Result, check_file

IGNORED_FOLDERS = {"__MACOSX", ".ipynb_checkpoints", "__pycache__"}
MAX_ENTRIES = 2000
MAX_UNPACKED_BYTES = 200 * 2 ** 20
MAX_RATIO = 200  # unpacked size over packed size, of an entry or of the whole zip
MAX_FILE_BYTES = 5 * 2 ** 20  # a vae.py or diffusion.py larger than this is not a student's


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
    for part, spec in PARTS.items():
        found = find(folder, spec.file)
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


# ---------------------------------------------------------------- checking its files


def grade_part(submission, part, limits, protected):
    """The Result of one part of one submission."""
    file_name = PARTS[part].file
    if submission.problem:
        return Result(part, "", "error", first_failure=submission.problem)
    if part not in submission.files:
        return Result(part, "", "missing", first_failure=f"no {file_name} in the submission" +
                      (f"; {submission.note}" if submission.note else ""))
    shown_as, path = submission.files[part]
    if path.stat().st_size > MAX_FILE_BYTES:
        return Result(part, shown_as, "error", first_failure=f"{file_name} is larger than {MAX_FILE_BYTES // 2 ** 20} MiB")
    return check_file(part, path, shown_as, limits, protected)
