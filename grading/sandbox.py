"""The box: run a command from a stranger in a folder of its own, isolated as far as this
machine allows. It knows nothing of contracts; its caller says what runs in it.

Each box is a fresh temporary folder: ``home`` (its HOME, TMPDIR and working folder, the one
folder its user owns) and what the caller puts beside it, readable. The command runs in a child
process with an environment that holds none of the caller's variables, under limits on wall
time, CPU time, memory, file size and output, and never as root: as root, as the unprivileged
user ``nobody`` (``setpriv``); without root, in a user namespace whose file system is read-only
outside its home. Where the machine allows it (``unshare``), it also runs without network,
unable to see or signal other processes, with the file system read-only outside its home, the
homes and the devices hidden, and (as root, with a cgroup) a cap on its processes:
``protections()`` says which hold here. Where the box could write the caller's files
(``isolated()`` is false), ``require_isolation`` stops with IsolationMissing.

The box's first step is this file itself, copied into the box and run on its settings (as
nsjail or bubblewrap are run): it joins the cgroup, hides what the box must not see, sets the
limits, drops every capability, then runs the caller's command and exits as it did.

    python sandbox.py SETTINGS.json
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

try:
    import resource  # POSIX only: the limits
except ImportError:
    resource = None

PIDS_CGROUP = Path("/sys/fs/cgroup/pids")
BOX_USER = 65534  # nobody: the box's user (and group) when the caller is root
KEPT_DEVICES = ("null", "zero", "full", "random", "urandom")  # the only devices a box sees
SETTINGS = "sandbox.json"
MiB = 2 ** 20


class IsolationMissing(RuntimeError):
    """The box could write the caller's files on this machine: what is missing and how to get it."""


@dataclass(frozen=True)
class Limits:
    """What one box, or one child the caller limits alike (``limit_child``), may use."""

    seconds: float = 180.0  # wall time
    cpu_seconds: int = 300
    memory_bytes: int = 8 * 2 ** 30  # address space: importing torch alone reserves about 3.3 GB
    file_bytes: int = 16 * MiB  # any file it writes, its printed output included
    processes: int = 256  # threads count too


# ---------------------------------------------------------------- what this machine allows


def protections(limits=Limits(), packages=()):
    """{protection: what holds on this machine, or None where it does not}, in a fixed order.
    ``packages``: the Python packages the box's command imports (their folders must stay
    reachable)."""
    namespaces = namespaces_work()
    read_only = namespaces and bool(shutil.which("mount")) and bool(shutil.which("setpriv"))
    as_root = (os.geteuid() == 0 and bool(shutil.which("setpriv"))
               and (read_only or python_reachable_by_anyone(packages)))
    return {
        "own folder": "a fresh temporary folder as HOME, TMPDIR and working folder, deleted afterwards",
        "environment": "none of the grader's variables (credentials, tokens, keys): PATH and locale only",
        "limits": (f"{limits.seconds:g} s wall time, {limits.cpu_seconds} s CPU time, "
                   f"{limits.memory_bytes / 2 ** 30:g} GiB memory, {limits.file_bytes // MiB} MiB per file "
                   "written (printed output included), the whole process group killed at the end")
                  if can_set_limits() else None,
        "user": (f"the unprivileged user nobody (uid {BOX_USER}), owning only its folder, without any capability"
                 if as_root else "a user namespace of its own, without any capability on this machine"
                 if read_only else None),
        "network": "none (a network namespace of its own)" if namespaces else None,
        "other processes": "cannot see or signal them (a PID namespace of its own)" if namespaces else None,
        "file system": ("read-only outside its folder; your home, /root, /home and the devices but /dev/null, "
                        "zero, full, random and urandom hidden (a mount namespace of its own)") if read_only else None,
        "process count": (f"at most {limits.processes} processes and threads (a pids cgroup)"
                          if as_root and namespaces and pids_cgroup_works() else None),
    }


def isolated(protected):
    """Whether the box can write nothing of the caller's: it runs as an unprivileged user (the
    caller being root), or in a user namespace with the file system read-only outside its folder."""
    return bool(protected["user"]) and (os.geteuid() == 0 or bool(protected["file system"]))


def require_isolation(protected):
    """Raise IsolationMissing, naming what is missing and how to get it, unless ``isolated``."""
    if not isolated(protected):
        raise IsolationMissing(
            "Grading stopped: a student's file could write this grader's files here. Run it as root (a "
            "container or a throw-away VM; needs setpriv from util-linux), or as a user where user namespaces "
            "work (`unshare --user --map-root-user --mount true`), or pass --without-isolation to grade "
            "anyway, every result marked as graded without isolation.")


def python_reachable_by_anyone(packages):
    """Whether every folder above this Python and ``packages`` lets any user through, as the
    box's user needs where no mount namespace shows it them."""
    folders = {Path(folder).resolve() for folder in python_folders(packages)}
    return all(os.stat(folder).st_mode & 0o001 for path in folders for folder in (path, *path.parents))


def can_set_limits():
    return resource is not None


def namespaces_work():
    """Whether ``unshare`` gives a child its own network, mount and PID namespaces here."""
    if sys.platform != "linux" or not shutil.which("unshare"):
        return False
    trial = subprocess.run([*unshare_command(), "true"], capture_output=True)
    return trial.returncode == 0


def unshare_command():
    """The command that starts a child in namespaces of its own (a user namespace if not root)."""
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return ["unshare", *user, "--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]


def pids_cgroup_works():
    return os.access(PIDS_CGROUP, os.W_OK)


def python_folders(packages):
    """The folders of this Python and of ``packages``."""
    interpreter = {sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path(sys.executable).resolve().parent)}
    return interpreter | package_folders(packages)


def package_folders(packages):
    """The folders holding ``packages`` (those installed here)."""
    return {str(Path(find_spec(name).origin).parents[1]) for name in packages if find_spec(name) is not None}


# ---------------------------------------------------------------- a box, from the caller's side


def new_box():
    """A fresh box: its folder, holding an empty ``home`` (with ``home/tmp``)."""
    box = Path(tempfile.mkdtemp(prefix="a3_box_"))
    (box / "home" / "tmp").mkdir(parents=True)
    return box


def run_in_box(box, command, limits, protected, packages=()):
    """Run ``command`` (a list; it finds its files in ``box``, which the caller filled) in the
    box to its end or its wall time, its output written to ``box``/output.log: (its return
    code, a signal as 128 + its number; whether it timed out)."""
    cgroup = make_pids_cgroup(limits) if protected["process count"] else None
    try:
        settings = write_settings(box, command, limits, protected, cgroup, packages)
        hand_over(box)
        start = [sys.executable, str(settings.parent / "sandbox.py"), str(settings)]
        if protected["network"]:
            start = unshare_command() + start
        with open(box / "output.log", "wb") as log:
            child = subprocess.Popen(start, cwd=box / "home", env=box_environment(box / "home", packages),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            child.wait(timeout=limits.seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        kill_box(child, cgroup)  # all of it at its time limit, else what it left running
        return exit_status(child.returncode), timed_out
    finally:
        remove_cgroup(cgroup)


def write_settings(box, command, limits, protected, cgroup, packages):
    """Copy this file into ``box``/sandbox and write the box's settings beside it: their path."""
    folder = box / "sandbox"
    folder.mkdir()
    shutil.copy(Path(__file__), folder / "sandbox.py")
    settings = {"command": [str(part) for part in command], "home": str(box / "home"), "limits": vars(limits),
                "read_only": bool(protected["file system"]),
                "unprivileged": bool(protected["user"]) and os.geteuid() == 0,
                "cgroup": str(cgroup) if cgroup else None, "hidden": folders_to_hide(box),
                "python": sorted(python_folders(packages))}
    (folder / SETTINGS).write_text(json.dumps(settings))
    return folder / SETTINGS


def hand_over(box):
    """As root: ``box`` readable, its home owned by the box's user alone."""
    if os.geteuid() != 0:
        return
    for folder, _, files in os.walk(box):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(Path(folder) / name, 0o644)
    for folder, _, files in os.walk(box / "home"):
        os.chown(folder, BOX_USER, BOX_USER)
        os.chmod(folder, 0o700)
        for name in files:
            os.chown(Path(folder) / name, BOX_USER, BOX_USER)


def exit_status(returncode):
    """A return code as a shell gives it: 128 + the number of the signal that ended a process."""
    return 128 - returncode if returncode < 0 else returncode


def how_it_ended(returncode):
    """'killed by SIGKILL' for a return code of 128 + a signal's number, else 'exit status N'."""
    names = {number.value: number.name for number in signal.Signals}
    if returncode - 128 in names:
        return f"killed by {names[returncode - 128]}"
    return f"exit status {returncode}"


def kill_box(child, cgroup):
    """Kill the child's process group and every process left in its cgroup, and reap the child."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(child.pid, signal.SIGKILL)
        else:  # Windows has no process groups
            child.kill()
    except (ProcessLookupError, PermissionError):
        pass
    for pid in processes_of(cgroup):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    child.wait()


def folders_to_hide(box):
    """The home folders the box must not read (the caller's, /root, /home), but one holding the box."""
    homes = {str(Path.home()), "/root", "/home"}
    return sorted(home for home in homes if Path(home).is_dir() and not box.resolve().is_relative_to(Path(home).resolve()))


def box_environment(home, packages):
    """The child's whole environment: nothing of the caller's but PATH, and the folders of
    ``packages`` in case they sit where a fresh HOME does not look."""
    return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": str(home), "TMPDIR": str(home / "tmp"), "XDG_CACHE_HOME": str(home / ".cache"),
            "MPLCONFIGDIR": str(home / ".matplotlib"), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": os.pathsep.join(sorted(package_folders(packages)))}


def make_pids_cgroup(limits):
    """A new pids cgroup allowing ``limits.processes``; the box joins it."""
    cgroup = PIDS_CGROUP / f"a3_box_{uuid.uuid4().hex[:12]}"
    cgroup.mkdir()
    (cgroup / "pids.max").write_text(str(limits.processes))
    return cgroup


def processes_of(cgroup):
    if cgroup is None or not cgroup.is_dir():
        return []
    return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]


def remove_cgroup(cgroup):
    """Remove the cgroup once its last process is gone (the kernel takes a moment)."""
    for _ in range(100):
        if cgroup is None or not cgroup.exists():
            return
        try:
            cgroup.rmdir()
        except OSError:
            time.sleep(0.02)


def remove_tree(folder):
    """Delete ``folder`` even where the child took away permissions inside it."""
    def allow_and_retry(function, path, _error):
        for item in (os.path.dirname(path), path):
            os.chmod(item, 0o700)
        function(path)
    shutil.rmtree(folder, onerror=allow_and_retry)


def limit_child(limits):
    """The memory and CPU-time limits of ``limits``, in a child of the caller before it starts
    (``subprocess.run(..., preexec_fn=functools.partial(limit_child, limits))``), never above
    a limit already in force."""
    for name, value in (("RLIMIT_AS", limits.memory_bytes), ("RLIMIT_CPU", limits.cpu_seconds), ("RLIMIT_CORE", 0)):
        which = getattr(resource, name)
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))


# ---------------------------------------------------------------- inside the box


def enter(settings):
    """The box's first step: join the cgroup, make the file system read-only outside home with
    the homes and devices hidden, set the limits, then run the command in a child of its own,
    without any capability, as the unprivileged user where the caller is root. Exit as that
    child did, a signal that ended it as 128 + its number (``unshare`` hides signals, and so
    reports them)."""
    if settings["cgroup"]:
        Path(settings["cgroup"], "cgroup.procs").write_text("0")  # 0: this process
    if settings["read_only"]:
        staging = Path(settings["home"]).parent / "kept"
        hide_homes(settings["hidden"], settings["python"], staging)
        hide_devices(staging / "devices")
        make_read_only_outside(settings["home"])
    if can_set_limits():
        set_limits(settings["limits"], shared_user=settings["unprivileged"])
    user = [f"--reuid={BOX_USER}", f"--regid={BOX_USER}", "--clear-groups"] if settings["unprivileged"] else []
    without_capabilities = ["setpriv", *user, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]
    command = subprocess.run([*(without_capabilities if settings["read_only"] or user else []), *settings["command"]])
    sys.exit(exit_status(command.returncode))


def set_limits(limits, shared_user):
    """The box's resource limits, inherited by everything it starts. Processes count per user:
    where every box runs as the one unprivileged user, they share a cap of ``processes`` for
    each CPU (as many boxes as run at once by default)."""
    cpu = limits["cpu_seconds"]
    processes = limits["processes"] * ((os.cpu_count() or 1) if shared_user else 1)
    for name, soft, hard in [("RLIMIT_AS", limits["memory_bytes"], limits["memory_bytes"]),
                             ("RLIMIT_CPU", cpu, cpu + 5),  # SIGXCPU at the soft limit, SIGKILL at the hard one
                             ("RLIMIT_FSIZE", limits["file_bytes"], limits["file_bytes"]),
                             ("RLIMIT_NPROC", processes, processes), ("RLIMIT_CORE", 0, 0)]:
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (AttributeError, ValueError, OSError):  # a limit this system does not have or lower
            pass


def hide_homes(homes, python, staging):
    """In this mount namespace: each of ``homes`` behind an empty file system in memory, but the
    ``python`` folders inside them, bound back in place (through ``staging``, as the empty file
    system hides the originals)."""
    kept = [folder for folder in python if any(Path(folder).is_relative_to(home) for home in homes)]
    for index, folder in enumerate(kept):
        (staging / str(index)).mkdir(parents=True)
        subprocess.run(["mount", "--rbind", folder, str(staging / str(index))], check=True)
    for home in homes:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=755", "hidden_home", home], check=True)
    for index, folder in enumerate(kept):
        Path(folder).mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--rbind", str(staging / str(index)), folder], check=True)


def hide_devices(staging):
    """In this mount namespace: /dev behind an empty file system but for KEPT_DEVICES, each
    bound back in place through ``staging``, which is then let go."""
    staging.mkdir(parents=True)
    for name in KEPT_DEVICES:
        (staging / name).touch()
        subprocess.run(["mount", "--bind", f"/dev/{name}", str(staging / name)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=755", "hidden_devices", "/dev"], check=True)
    for name in KEPT_DEVICES:
        Path("/dev", name).touch()
        subprocess.run(["mount", "--bind", str(staging / name), f"/dev/{name}"], check=True)
        subprocess.run(["umount", str(staging / name)], check=True)


def make_read_only_outside(home):
    """In this mount namespace: every mount read-only, but ``home`` (bound onto itself), /proc
    and what hide_devices hid below /dev."""
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "--bind", home, home], check=True)
    for mount_point, options in mounts():
        if mount_point != home and not mount_point.startswith(("/proc", "/dev/")) and "ro" not in options:
            subprocess.run(["mount", "-o", "remount,bind,ro", mount_point], check=True)


def mounts():
    """(mount point, its options) of every mount of this namespace."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape")  # spaces come as \040
        found.append((point, fields[5].split(",")))
    return found


if __name__ == "__main__":
    enter(json.loads(Path(sys.argv[1]).read_text()))
