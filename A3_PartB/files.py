"""Files that survive faults: atomic writes with errors that say what to do, and caches that a
damaged or unwritable file never breaks (the decoded images and the FID statistics)."""
import contextlib
import errno
import io
import os
from pathlib import Path

WRITE_ADVICE = {  # errno -> what to do when a file cannot be written
    errno.ENOSPC: "Free some space on that disk, or write to a folder on another disk",
    errno.EDQUOT: "Free some of your disk quota, or write to a folder on another disk",
    errno.EROFS: "That disk is read-only: write to a folder on another disk",
}
OTHER_WRITE_ADVICE = "Write to a folder you can write to, or make this one writable"


class SaveError(OSError):
    """A file could not be written (a full disk, no permission): the message names the file,
    the reason and what to do, then ``next_step`` (how to resume, say). ``path``, the
    ``os_error`` and its ``reason`` are kept for callers that go on or add to the message."""

    def __init__(self, path, error, next_step=""):
        self.path = path
        self.os_error = error
        self.reason = error.strerror or str(error)
        advice = WRITE_ADVICE.get(error.errno, OTHER_WRITE_ADVICE)
        super().__init__(f"Cannot write {path}: {self.reason}. {advice}; files already saved "
                         f"there are intact. {next_step}".rstrip())
        self.errno = error.errno


@contextlib.contextmanager
def reported_write_errors(path):
    """Turn an OSError raised while writing ``path`` into a SaveError that explains it."""
    try:
        yield
    except SaveError:
        raise
    except OSError as error:
        raise SaveError(path, error) from None


def atomic_write(path, write):
    """Call ``write(binary_file)`` on a buffer in memory, write it to a temporary file beside
    ``path``, then rename that to ``path``.

    A crash or Ctrl-C mid-write leaves the previous file intact instead of a truncated one, and
    a full disk or a folder without write permission raises SaveError, leaving no temporary file.
    The buffer is why: torch.save's zip writer, writing to a full disk itself, raises a
    RuntimeError ("unexpected pos") in place of the disk's OSError.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buffer = io.BytesIO()
    write(buffer)
    try:
        with reported_write_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as file:
                file.write(buffer.getbuffer())
            os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def default_cache_folder():
    """Where decoded images and FID statistics are kept: shared by every results folder (Parts
    1, 2 and 5 decode once between them), in the user's cache (``$XDG_CACHE_HOME``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "a3_ddpm"


def read_cache(cache_file, read):
    """``read(cache_file)``, or None when there is no such file or it cannot be used.

    A cache cut short (by a full disk or a killed copy) or holding something else is said in one
    line and left for the caller to rebuild: it never stops a run, nor needs deleting by hand.
    ``read`` raises ValueError, saying why, for a readable file of the wrong content.
    """
    try:
        if not cache_file.is_file():  # which raises for a folder the user may not enter
            return None
        return read(cache_file)
    except ValueError as error:
        reason = str(error)
    except Exception as error:  # noqa: BLE001 - loading a damaged file fails in many ways
        reason = f"it cannot be read: {type(error).__name__}"
    print(f"Cache file {cache_file} is not usable ({reason}): rebuilding it.")
    return None


def write_cache(cache_file, write):
    """``atomic_write`` a cache file; one that cannot be written is said in one line, and the
    run goes on without it (the next run computes it again)."""
    try:
        atomic_write(cache_file, write)
    except SaveError as error:
        print(f"Cannot write the cache file {cache_file} ({error.reason}), so this run goes on "
              "without it. To keep the cache between runs, set XDG_CACHE_HOME (or pass "
              "cache_folder) to a folder you can write to.")
