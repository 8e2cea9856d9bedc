"""AFHQ's download and unzip (``main.py --download``, the notebook's DOWNLOAD_AFHQ): the 6.5 GB
zip from Google Drive by gdown, then each class asked for unzipped into ``data/train/<class>``,
both safe to run again after a disconnect at any point."""
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

AFHQ_DRIVE_ID = "1-1npXlqCw1CYQ5SBbrlSgZdA9TEwZre4"
AFHQ_ZIP_NAME = "afhq_v2.zip"
AFHQ_CLASSES = ("cat", "dog", "wild")


def afhq_root(folder):
    """The folder that AFHQ's zip goes into and unpacks in: the one above ``folder`` when it is a
    ``train`` folder (as ``./data/train``), else ``folder`` itself."""
    folder = Path(folder).expanduser()
    return folder.parent if folder.name == "train" else folder


def download_hint(folder):
    """How to download AFHQ (a 6.5 GB zip) so that ``folder`` holds the class folders: main.py's
    ``--download`` (``download_afhq``), which survives a cut-short download or unzip; paths are
    written relative to the working directory, where the user types them."""
    root = afhq_root(Path(folder).expanduser().resolve())
    relative = os.path.relpath(root)
    if not relative.startswith(".."):
        root = "." if relative == "." else f"./{Path(relative).as_posix()}"
    return (f"Download AFHQ (a 6.5 GB zip, into {root}) by running the command again with "
            "--download added (in the notebook: DOWNLOAD_AFHQ = True); a download or unzip cut "
            "short is completed by running it again.")


def afhq_class_names(data_class):
    """The AFHQ classes that ``data_class`` ("cat", "dog", "wild", or "all"/None) trains on."""
    if data_class in (None, "all"):
        return AFHQ_CLASSES
    if data_class not in AFHQ_CLASSES:
        raise ValueError(f"data_class must be one of {AFHQ_CLASSES} or 'all', got {data_class!r}.")
    return (data_class,)


def gdown_download(zip_path):
    """Download AFHQ's zip from Google Drive to ``zip_path``; gdown resumes its own partial file
    of an earlier, interrupted call."""
    import gdown  # only a download needs it

    try:
        gdown.download(id=AFHQ_DRIVE_ID, output=str(zip_path), quiet=False, resume=True)
    except Exception as error:  # noqa: BLE001 - the network and Google Drive fail in many ways
        raise ValueError(f"Could not download AFHQ ({type(error).__name__}: {error}). Check the "
                         "internet connection and run again: the download resumes.") from None


def download_afhq(folder, data_class="cat", keep_zip=True, download=gdown_download):
    """Make ``folder`` (``--data_path``: a ``train`` folder or the one above it) hold AFHQ's
    training images of ``data_class``, downloading the zip if needed; returns the train folder.

    Safe to run again after a disconnect at any point: a zip cut short is downloaded again (one
    line says so), each class is unzipped into a temporary folder renamed into place only when
    complete (a class folder missing files of the zip is unzipped again), and only the classes
    asked for are unzipped. The zip is kept, so another class needs no new download, unless
    ``keep_zip`` is False. ``download(zip_path)`` fetches the zip (tests pass their own).
    """
    root = afhq_root(folder)
    zip_path = root / AFHQ_ZIP_NAME
    train_folder = root / "train"
    for name in afhq_class_names(data_class):
        if not extracted_in_full(train_folder / name, zip_path):
            fetch_zip(zip_path, download)
            extract_class(zip_path, name, train_folder)
    if not keep_zip and zip_path.exists():
        zip_path.unlink()
        print(f"Deleted {zip_path}.")
    return train_folder


def zip_problem(zip_path):
    """None for a whole zip file, else what is wrong with it. A zip's directory is at its end,
    so a file cut short has none."""
    if not zip_path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(zip_path):
            return None
    except zipfile.BadZipFile as error:
        return f"not a whole zip ({error}; {zip_path.stat().st_size:,} bytes)"


def fetch_zip(zip_path, download):
    """Download the zip unless a whole one is there; one cut short is downloaded again."""
    problem = zip_problem(zip_path)
    if problem is None:
        return
    if problem != "missing":
        print(f"{zip_path} is {problem}, probably a download cut short: downloading it again.")
        zip_path.unlink()
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    download(zip_path)
    problem = zip_problem(zip_path)
    if problem is not None:
        raise ValueError(f"The download of {zip_path} is {problem} (Google Drive may refuse "
                         "for a while after many downloads): run the download again later.")


def class_members(archive, data_class):
    """``(member, path inside the class folder)`` of each file of ``train/<class>/`` in the zip
    (``afhq/train/<class>/`` in AFHQ v1). A name that would leave the class folder is refused."""
    prefixes = (f"train/{data_class}/", f"afhq/train/{data_class}/")
    members = []
    for member in archive.infolist():
        prefix = next((p for p in prefixes if member.filename.startswith(p)), None)
        if prefix is None or member.is_dir():
            continue
        inside = PurePosixPath(member.filename[len(prefix):])
        if inside.is_absolute() or ".." in inside.parts or ":" in member.filename:  # C: too
            raise ValueError(f"Refusing {member.filename!r} of the zip: it would be written "
                             "outside its class folder. Download AFHQ from its usual source.")
        members.append((member, inside))
    return members


def extracted_in_full(class_folder, zip_path):
    """Whether ``class_folder`` is there and, when the zip is at hand, holds each of the class's
    files of the zip at its full size (a folder unzipped by hand and cut short does not)."""
    if not class_folder.is_dir():
        return False
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = class_members(archive, class_folder.name)
    except (OSError, zipfile.BadZipFile):  # no zip (deleted) or one cut short: trust the folder
        return True
    missing = [inside for member, inside in members
               if not (class_folder / inside).is_file()
               or (class_folder / inside).stat().st_size != member.file_size]
    if missing:
        print(f"{class_folder} lacks {len(missing)} of the zip's {len(members)} files (an unzip "
              "cut short): unzipping it again.")
    return not missing


def extract_class(zip_path, data_class, train_folder):
    """Unzip ``train/<class>/`` into ``train_folder/<class>`` through a temporary folder beside
    ``train_folder``, renamed into place when complete; one left by a cut-short run is redone."""
    partial = train_folder.parent / f".{data_class}.unzipping"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = class_members(archive, data_class)
            if not members:
                raise ValueError(f"{zip_path} holds no train/{data_class}/ images: it is not "
                                 "AFHQ's zip. Delete it and download again.")
            for member, inside in tqdm(members, desc=f"unzipping train/{data_class}"):
                (partial / inside).parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(partial / inside, "wb") as target:
                    shutil.copyfileobj(source, target)
    except zipfile.BadZipFile as error:  # a damaged member: its checksum differs
        zip_path.unlink()
        raise ValueError(f"{zip_path} is damaged ({error}), so it is deleted: run again to "
                         "download it afresh.") from None
    train_folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(train_folder / data_class, ignore_errors=True)  # one cut short by hand
    os.replace(partial, train_folder / data_class)
