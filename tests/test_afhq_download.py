"""AFHQ's download survives a disconnect at any point: a zip cut short is downloaded again, an
unzip cut short is never taken for the data, and the next run ends in a full, correct folder.

The zips are made here from tiny PNGs; ``Drive`` stands in for Google Drive (gdown)."""
import io
import shutil
import zipfile

import pytest

import afhq
import main
from afhq import download_afhq
from afhq_data import part_b_environment, zip_folder  # noqa: F401 (autouse fixture)


class Drive:
    """A downloader that writes ``zip_bytes`` to the path asked for, counting its calls."""

    def __init__(self, zip_bytes):
        self.zip_bytes = zip_bytes
        self.calls = 0

    def __call__(self, zip_path):
        self.calls += 1
        zip_path.write_bytes(self.zip_bytes)


@pytest.fixture(scope="module")
def afhq_zip(tmp_path_factory):
    """A zip laid out as AFHQ v2's: train/ and test/ with three classes of tiny PNGs.

    Returns (its bytes, {name in the zip: bytes})."""
    tree = tmp_path_factory.mktemp("afhq_tree")
    main.write_synthetic_afhq(tree, per_class=3, size=8)
    shutil.copytree(tree / "train", tree / "test")
    zip_path = tmp_path_factory.mktemp("zip") / "afhq_v2.zip"
    files = zip_folder(tree, zip_path)
    return zip_path.read_bytes(), files


@pytest.fixture
def drive(afhq_zip):
    return Drive(afhq_zip[0])


def class_files(afhq_zip, data_class):
    """{path inside the class folder: bytes} of the zip's train/<class>/."""
    prefix = f"train/{data_class}/"
    return {name[len(prefix):]: data for name, data in afhq_zip[1].items()
            if name.startswith(prefix)}


def folder_files(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes()
            for path in folder.rglob("*") if path.is_file()}


def test_a_first_run_downloads_and_unzips_only_the_class_asked_for(tmp_path, drive, afhq_zip):
    train = download_afhq(tmp_path / "data" / "train", "cat", download=drive)
    assert train == tmp_path / "data" / "train" and drive.calls == 1
    assert folder_files(train / "cat") == class_files(afhq_zip, "cat")
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["afhq_v2.zip", "train"]
    assert sorted(path.name for path in train.iterdir()) == ["cat"]


def test_all_unzips_every_class(tmp_path, drive, afhq_zip):
    train = download_afhq(tmp_path / "data", "all", download=drive)
    for name in ("cat", "dog", "wild"):
        assert folder_files(train / name) == class_files(afhq_zip, name)


def test_the_zip_is_kept_so_another_class_needs_no_new_download(tmp_path, drive, afhq_zip):
    download_afhq(tmp_path / "train", "cat", download=drive)
    download_afhq(tmp_path / "train", "dog", download=drive)
    assert drive.calls == 1
    assert folder_files(tmp_path / "train" / "dog") == class_files(afhq_zip, "dog")


def test_the_zip_is_deleted_when_asked(tmp_path, drive, capsys):
    download_afhq(tmp_path / "train", "cat", keep_zip=False, download=drive)
    assert not (tmp_path / "afhq_v2.zip").exists() and (tmp_path / "train" / "cat").is_dir()
    assert f"Deleted {tmp_path / 'afhq_v2.zip'}." in capsys.readouterr().out


def test_a_class_already_there_is_neither_downloaded_nor_unzipped_again(tmp_path, drive):
    download_afhq(tmp_path / "train", "cat", keep_zip=False, download=drive)
    marker = tmp_path / "train" / "cat" / "mine.png"
    marker.write_bytes(b"kept")
    download_afhq(tmp_path / "train", "cat", download=drive)
    assert drive.calls == 1 and marker.read_bytes() == b"kept"


@pytest.mark.parametrize("kept_bytes", [0, 100, -30], ids=["empty", "the start", "all but the end"])
def test_a_zip_cut_short_is_downloaded_again_with_one_line(tmp_path, drive, afhq_zip, capsys,
                                                           kept_bytes):
    (tmp_path / "afhq_v2.zip").write_bytes(afhq_zip[0][:kept_bytes])
    download_afhq(tmp_path / "train", "cat", download=drive)
    assert drive.calls == 1
    assert folder_files(tmp_path / "train" / "cat") == class_files(afhq_zip, "cat")
    said = [line for line in capsys.readouterr().out.splitlines() if "afhq_v2.zip" in line]
    assert len(said) == 1 and said[0].endswith("probably a download cut short: downloading it "
                                               "again.")


def test_a_whole_zip_already_there_is_not_downloaded_again(tmp_path, drive, afhq_zip):
    (tmp_path / "afhq_v2.zip").write_bytes(afhq_zip[0])
    download_afhq(tmp_path / "train", "cat", download=drive)
    assert drive.calls == 0
    assert folder_files(tmp_path / "train" / "cat") == class_files(afhq_zip, "cat")


def test_a_download_that_is_not_a_zip_raises_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"download of .*afhq_v2.zip is not a whole zip") as error:
        download_afhq(tmp_path / "train", "cat", download=Drive(b"<html>Quota exceeded</html>"))
    assert "\n" not in str(error.value)


def test_an_unzip_cut_short_is_not_taken_for_the_data_and_the_next_run_completes_it(
        tmp_path, drive, afhq_zip, monkeypatch):
    copy = shutil.copyfileobj
    copied = []

    def disconnect_after_two_files(source, target):
        if len(copied) == 2:
            raise KeyboardInterrupt  # as a Colab disconnect or Ctrl-C
        copied.append(copy(source, target))

    monkeypatch.setattr(shutil, "copyfileobj", disconnect_after_two_files)
    with pytest.raises(KeyboardInterrupt):
        download_afhq(tmp_path / "train", "cat", download=drive)
    assert not (tmp_path / "train" / "cat").exists()
    monkeypatch.setattr(shutil, "copyfileobj", copy)
    download_afhq(tmp_path / "train", "cat", download=drive)
    assert drive.calls == 1
    assert folder_files(tmp_path / "train" / "cat") == class_files(afhq_zip, "cat")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afhq_v2.zip", "train"]


def test_a_class_folder_unzipped_by_hand_and_cut_short_is_unzipped_again(tmp_path, drive,
                                                                          afhq_zip, capsys):
    download_afhq(tmp_path / "train", "cat", download=drive)
    cat = tmp_path / "train" / "cat"
    first, second = sorted(cat.iterdir())[:2]
    first.unlink()
    second.write_bytes(second.read_bytes()[:10])
    download_afhq(tmp_path / "train", "cat", download=drive)
    assert drive.calls == 1 and folder_files(cat) == class_files(afhq_zip, "cat")
    assert f"{cat} lacks 2 of the zip's 3 files" in capsys.readouterr().out


def test_a_damaged_member_deletes_the_zip_and_says_to_run_again(tmp_path, afhq_zip):
    damaged = bytearray(afhq_zip[0])
    member = zipfile.ZipFile(io.BytesIO(afhq_zip[0])).getinfo("train/cat/cat_0000.png")
    damaged[member.header_offset + 30 + len(member.filename) + 5] ^= 0xFF  # past its 30-byte
    # header and its name: a byte of its (stored) data, so its checksum no longer matches
    with pytest.raises(ValueError, match="is damaged .* run again to download it afresh"):
        download_afhq(tmp_path / "train", "cat", download=Drive(bytes(damaged)))
    assert not (tmp_path / "afhq_v2.zip").exists() and not (tmp_path / "train" / "cat").exists()


@pytest.mark.parametrize("name", ["train/cat/../../../evil.png", "train/cat//tmp/evil.png",
                                  "train/cat/C:/evil.png"])
def test_a_zip_member_that_would_leave_its_class_folder_is_refused(tmp_path, afhq_zip, name):
    with zipfile.ZipFile(tmp_path / "hostile.zip", "w") as archive:
        archive.writestr("train/cat/good.png", b"good")
        archive.writestr(name, b"evil")
    drive = Drive((tmp_path / "hostile.zip").read_bytes())
    with pytest.raises(ValueError, match="Refusing .*evil.png"):
        download_afhq(tmp_path / "data" / "train", "cat", download=drive)
    assert not list(tmp_path.rglob("evil.png"))


def test_an_afhq_v1_zip_unzips_its_class_into_the_train_folder(tmp_path):
    with zipfile.ZipFile(tmp_path / "v1.zip", "w") as archive:
        archive.writestr("afhq/train/cat/flickr_cat_000002.jpg", b"jpeg")
        archive.writestr("afhq/val/cat/flickr_cat_000008.jpg", b"jpeg")
    download_afhq(tmp_path / "data", "cat", download=Drive((tmp_path / "v1.zip").read_bytes()))
    assert folder_files(tmp_path / "data" / "train") == {"cat/flickr_cat_000002.jpg": b"jpeg"}


def test_a_zip_without_the_class_is_refused_as_not_afhq(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("photos/cat.png", b"png")
    with pytest.raises(ValueError, match="holds no train/cat/ images: it is not AFHQ's zip"):
        download_afhq(tmp_path / "train", "cat", download=Drive((tmp_path / "other.zip")
                                                                .read_bytes()))
    assert not (tmp_path / "train").exists()


def test_an_unknown_class_is_refused_before_any_download(tmp_path, drive):
    with pytest.raises(ValueError, match="data_class must be one of"):
        download_afhq(tmp_path / "train", "horse", download=drive)
    assert drive.calls == 0


# ---------------------------------------------------------------- main.py --download


@pytest.fixture
def gdown_drive(monkeypatch, afhq_zip):
    """gdown.download replaced by a fake that writes the zip, so main.py's own downloader runs;
    returns the list of the keyword arguments of each call."""
    import gdown

    calls = []

    def fake_download(**arguments):
        calls.append(arguments)
        with open(arguments["output"], "wb") as file:
            file.write(afhq_zip[0])

    monkeypatch.setattr(gdown, "download", fake_download)
    return calls


@pytest.fixture
def trained_on(monkeypatch):
    """main's train_diffusion replaced by a recorder of its settings."""
    received = []
    monkeypatch.setattr(main, "train_diffusion", lambda **settings: received.append(settings))
    return received


def test_main_download_fetches_afhq_by_its_drive_id_and_then_trains(tmp_path, gdown_drive,
                                                                   trained_on, afhq_zip):
    data = tmp_path / "data" / "train"
    assert main.main(["--download", "--data_path", str(data), "--save_folder",
                      str(tmp_path / "results")]) == 0
    assert gdown_drive == [dict(id=afhq.AFHQ_DRIVE_ID, output=str(tmp_path / "data" /
                                                                      "afhq_v2.zip"),
                                quiet=False, resume=True)]
    assert folder_files(data / "cat") == class_files(afhq_zip, "cat")
    assert trained_on[0]["data_path"] == str(data)


def test_main_download_after_a_download_and_an_unzip_cut_short_ends_in_the_full_folder(
        tmp_path, gdown_drive, trained_on, afhq_zip, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "afhq_v2.zip").write_bytes(afhq_zip[0][:-50])
    (data / ".dog.unzipping").mkdir()  # left by an unzip cut short
    (data / ".dog.unzipping" / "dog_0000.png").write_bytes(b"cut")
    assert main.main(["--download", "--data_class", "dog", "--data_path", str(data / "train"),
                      "--save_folder", str(tmp_path / "results")]) == 0
    assert len(gdown_drive) == 1 and "downloading it again" in capsys.readouterr().out
    assert folder_files(data / "train") == {f"dog/{name}": content for name, content in
                                            class_files(afhq_zip, "dog").items()}
    assert sorted(path.name for path in data.iterdir()) == ["afhq_v2.zip", "train"]


def test_main_delete_zip_deletes_it_after_unzipping(tmp_path, gdown_drive, trained_on):
    assert main.main(["--download", "--delete_zip", "--data_path", str(tmp_path / "train"),
                      "--save_folder", str(tmp_path / "results")]) == 0
    assert (tmp_path / "train" / "cat").is_dir() and not (tmp_path / "afhq_v2.zip").exists()


def test_main_delete_zip_without_download_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main.main(["--delete_zip"])
    assert exit_status.value.code == 2
    assert "--delete_zip goes with --download" in capsys.readouterr().err


def test_main_download_failure_exits_2_with_one_line(tmp_path, monkeypatch, trained_on, capsys):
    import gdown

    def no_internet(**arguments):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(gdown, "download", no_internet)
    assert main.main(["--download", "--data_path", str(tmp_path / "train"), "--save_folder",
                      str(tmp_path / "results")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == ["error: Could not download AFHQ (ConnectionError: Name or service not "
                      "known). Check the internet connection and run again: the download "
                      "resumes."]
    assert trained_on == []
