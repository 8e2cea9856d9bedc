"""utils.py (setup, train, visualize) and the main.py command line with its demo."""
import inspect
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

import fid_score
import images
import main
import utils
from afhq_data import make_afhq_folder, part_b_environment  # noqa: F401 (autouse fixture)

PART_B = Path(__file__).resolve().parents[1] / "A3_PartB"
TINY = dict(unet_dim_mults=[1, 2], image_size=16, batch_size=4, time_steps=10, unet_dim=8,
            dataloader_workers=0)
pytestmark = pytest.mark.filterwarnings("ignore:Skipping unreadable image:UserWarning")


@pytest.fixture(scope="module")
def afhq(tmp_path_factory):
    return make_afhq_folder(tmp_path_factory.mktemp("afhq"), classes=("cat",), per_class=8,
                            size=64)


def run_part_b(arguments, environment=None, cwd=PART_B):
    """Run a Python command in A3_PartB with stdin closed, as a notebook or CI would."""
    return subprocess.run([sys.executable, *arguments], cwd=cwd, env=environment,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------- utils


def test_utils_functions_take_the_handout_arguments():
    expected = ["train_steps", "save_and_sample_every", "fid", "save_folder", "data_path",
                "load_path", "unet_dim_mults", "image_size", "batch_size", "data_class",
                "time_steps", "unet_dim", "learning_rate", "dataloader_workers", "Diffusion"]
    defaults = dict(load_path=None, unet_dim_mults=[1, 2, 4, 8], image_size=32, batch_size=32,
                    data_class="cat", time_steps=50, unet_dim=16, learning_rate=1e-3,
                    dataloader_workers=16, Diffusion=None)
    for function in (utils.setup_diffusion, utils.train_diffusion, utils.visualize_diffusion):
        parameters = inspect.signature(function).parameters
        assert [name for name in parameters if name in expected] == expected
        assert {name: parameters[name].default for name in defaults} == defaults


def test_setup_is_seeded(afhq, tmp_path):
    first, _, _ = utils.setup_diffusion(1, 1, False, tmp_path, afhq, **TINY)
    torch.manual_seed(123)
    second, _, _ = utils.setup_diffusion(1, 1, False, tmp_path, afhq, **TINY)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_setup_uses_a_given_diffusion_class(afhq, tmp_path):
    class CustomDiffusion(utils.DefaultDiffusion):
        pass

    _, diffusion, trainer = utils.setup_diffusion(1, 1, False, tmp_path, afhq,
                                                  Diffusion=CustomDiffusion, **TINY)
    assert isinstance(diffusion, CustomDiffusion) and trainer.model is diffusion
    assert diffusion.num_timesteps == 10 and diffusion.model.dim == 8


def test_train_then_visualize_with_the_default_checkpoint(afhq, tmp_path):
    trainer = utils.train_diffusion(train_steps=2, save_and_sample_every=2, fid=False,
                                    save_folder=tmp_path, data_path=afhq, **TINY)
    assert trainer.step == 2 and (tmp_path / "model.pt").is_file()
    forward, backward = utils.visualize_diffusion(train_steps=2, save_and_sample_every=2,
                                                  fid=False, save_folder=tmp_path,
                                                  data_path=afhq, **TINY)
    assert forward.is_file() and backward.is_file()


def test_resume_goes_on_from_the_checkpoint_in_the_save_folder(afhq, tmp_path, capsys):
    utils.train_diffusion(2, 2, False, tmp_path, afhq, **TINY)
    trainer = utils.train_diffusion(4, 2, False, tmp_path, afhq, resume=True, **TINY)
    assert "Resuming from step 2 of 4" in capsys.readouterr().out
    assert [row["step"] for row in trainer.history] == [1, 2, 3, 4]


def test_resume_leaves_a_finished_run_untouched(afhq, tmp_path, capsys):
    utils.train_diffusion(2, 2, False, tmp_path, afhq, **TINY)
    checkpoint = tmp_path / "model.pt"
    before = checkpoint.read_bytes(), checkpoint.stat().st_mtime_ns
    trainer = utils.train_diffusion(2, 2, False, tmp_path, afhq, resume=True, **TINY)
    assert trainer.step == 2 and "Nothing to train" in capsys.readouterr().out
    assert (checkpoint.read_bytes(), checkpoint.stat().st_mtime_ns) == before


def test_resume_keeps_a_checkpoint_of_other_settings_aside_and_trains_afresh(afhq, tmp_path,
                                                                            capsys):
    utils.train_diffusion(2, 2, False, tmp_path, afhq, **TINY)
    other = (tmp_path / "model.pt").read_bytes()
    trainer = utils.train_diffusion(2, 2, False, tmp_path, afhq, resume=True,
                                    **{**TINY, "unet_dim": 16})
    assert (tmp_path / "model.set_aside_1.pt").read_bytes() == other
    assert "unet_dim: checkpoint 8, model 16" in capsys.readouterr().out
    assert [row["step"] for row in trainer.history] == [1, 2]


def test_a_checkpoint_that_cannot_be_set_aside_stops_with_a_save_error_and_stays(afhq, tmp_path,
                                                                                 monkeypatch):
    import checkpoints
    from files import SaveError
    utils.train_diffusion(2, 2, False, tmp_path, afhq, **TINY)
    before = (tmp_path / "model.pt").read_bytes()

    def refused(source, target):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(checkpoints.os, "replace", refused)
    with pytest.raises(SaveError, match="model.set_aside_1.pt: Permission denied"):
        utils.train_diffusion(2, 2, False, tmp_path, afhq, resume=True, **{**TINY, "unet_dim": 16})
    assert (tmp_path / "model.pt").read_bytes() == before


def test_without_resume_a_run_starts_from_step_0(afhq, tmp_path):
    utils.train_diffusion(2, 2, False, tmp_path, afhq, **TINY)
    trainer = utils.train_diffusion(2, 2, False, tmp_path, afhq, **TINY)
    assert [row["step"] for row in trainer.history] == [1, 2]


def test_visualize_without_a_checkpoint_says_to_train_first(afhq, tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt: train first"):
        utils.visualize_diffusion(2, 2, False, tmp_path, afhq, **TINY)


# ---------------------------------------------------------------- the demo (main.py)


def record_demo_calls(monkeypatch):
    """main's train and visualize replaced by recorders; returns the list of (name, settings)."""
    calls = []
    for name in ("train_diffusion", "visualize_diffusion"):
        monkeypatch.setattr(main, name,
                            lambda name=name, **settings: calls.append((name, settings)))
    return calls


def test_demo_writes_synthetic_cats_and_trains_briefly(tmp_path, monkeypatch):
    calls = record_demo_calls(monkeypatch)
    main.run_demo(main.parse_flags(["--demo", "--save_folder", str(tmp_path)]))
    cats = list((tmp_path / "demo_data" / "train" / "cat").glob("*.png"))
    assert len(cats) == 300
    (_, trained), (_, visualized) = calls
    assert {flag: trained[flag] for flag in main.DEMO_STEPS} == main.DEMO_STEPS
    assert visualized["save_folder"] == str(tmp_path) and visualized["load_path"] is None


def test_writing_the_synthetic_images_again_keeps_the_files_and_so_the_decoded_cache(tmp_path):
    first = main.write_synthetic_afhq(tmp_path, classes=("cat",), per_class=3, size=8)
    files = images.list_image_files(first, "cat")
    key = images.image_set_key(files, 8)
    times = [path.stat().st_mtime_ns for path in files]
    os.utime(files[0], ns=(1, 1))  # a file left by an older run: the same bytes, older time
    main.write_synthetic_afhq(tmp_path, classes=("cat",), per_class=3, size=8)
    assert [path.stat().st_mtime_ns for path in files[1:]] == times[1:]
    assert files[0].stat().st_mtime_ns == 1
    main.write_synthetic_afhq(tmp_path, classes=("cat",), per_class=3, size=8, seed=1)
    assert images.image_set_key(files, 8) != key  # other images are written over the old


def test_synthetic_writer_rejects_unknown_layouts(tmp_path):
    with pytest.raises(ValueError, match="layout must be 'v1' or 'v2'"):
        main.write_synthetic_afhq(tmp_path, layout="v3")


# ---------------------------------------------------------------- command line


def test_help_lists_the_flags_with_their_defaults():
    result = run_part_b(["main.py", "--help"])
    assert result.returncode == 0
    for flag in ("--train_steps", "--save_and_sample_every", "--fid", "--data_class",
                 "--unet_dim_mults", "--visualize", "--demo"):
        assert flag in result.stdout
    assert "(default: 10000)" in result.stdout and "(default: ./data/train/)" in result.stdout


def test_every_flag_has_a_help_line():
    actions = main.build_parser()._actions
    assert [action.dest for action in actions if not action.help] == []


def test_flag_defaults_are_the_starters():
    arguments = vars(main.build_parser().parse_args([]))
    assert arguments == dict(
        train_steps=10000, save_and_sample_every=1000, fid=False, save_folder="./results",
        data_path="./data/train/", load_path=None, unet_dim_mults=[1, 2, 4, 8], image_size=32,
        batch_size=32, data_class="cat", time_steps=50, unet_dim=16, learning_rate=1e-3,
        dataloader_workers=16, precision="auto", checkpoint_minutes=5, resume=False,
        cuda_graph=True, download=False, delete_zip=False, visualize=False, demo=False)


def test_main_passes_settings_to_train_diffusion_by_keyword(tmp_path, monkeypatch):
    received = []
    monkeypatch.setattr(main, "train_diffusion", lambda **settings: received.append(settings))
    monkeypatch.setattr(main, "inception_network", lambda device: None)
    assert main.main(["--fid", "--unet_dim_mults", "1", "2", "--data_class", "all",
                      "--save_folder", str(tmp_path)]) == 0
    assert received[0]["fid"] is True and received[0]["unet_dim_mults"] == [1, 2]
    assert received[0]["data_class"] == "all" and received[0]["load_path"] is None
    assert received[0]["precision"] == "auto" and received[0]["cuda_graph"] is True


def test_resume_flag_reaches_train_diffusion(tmp_path, monkeypatch):
    received = []
    monkeypatch.setattr(main, "train_diffusion", lambda **settings: received.append(settings))
    assert main.main(["--resume", "--save_folder", str(tmp_path)]) == 0
    assert received[0]["resume"] is True


def test_no_cuda_graph_reaches_the_trainer(tmp_path, monkeypatch):
    received = []
    monkeypatch.setattr(main, "train_diffusion", lambda **settings: received.append(settings))
    assert main.main(["--no_cuda_graph", "--save_folder", str(tmp_path)]) == 0
    assert received[0]["cuda_graph"] is False


def test_the_fid_network_built_by_the_fid_check_is_the_one_training_uses(tmp_path, monkeypatch):
    def network(images):
        return images

    network.__module__ = "cleanfid.features"  # as clean-fid's build_feature_extractor makes it
    received = []
    monkeypatch.setattr(main, "train_diffusion", lambda **settings: received.append(settings))
    monkeypatch.setattr(fid_score, "build_feature_extractor", lambda *args, **kwargs: network)
    assert main.main(["--fid", "--save_folder", str(tmp_path)]) == 0
    assert received[0]["fid_feature_extractor"] is network
    assert fid_score.extractor_name(network) == fid_score.extractor_name(None) == "inception"


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16)])
def test_train_diffusion_passes_the_precision_to_the_trainer(afhq, tmp_path, precision, dtype):
    trainer = utils.train_diffusion(1, 1, False, tmp_path, afhq, precision=precision, **TINY)
    assert trainer.amp_dtype is dtype and trainer.step == 1


def test_visualize_flag_calls_visualize_diffusion(tmp_path, monkeypatch):
    torch.save({"step": 5, "model": {}}, tmp_path / "model.pt")
    received = []
    monkeypatch.setattr(main, "visualize_diffusion", lambda **settings: received.append(settings))
    assert main.main(["--visualize", "--save_folder", str(tmp_path)]) == 0
    assert received[0]["save_folder"] == str(tmp_path)


def test_demo_flag_runs_the_demo_in_the_save_folder_with_its_own_step_counts(tmp_path,
                                                                             monkeypatch):
    calls = record_demo_calls(monkeypatch)
    assert main.main(["--demo", "--save_folder", str(tmp_path)]) == 0
    (_, trained), _ = calls
    assert trained["save_folder"] == str(tmp_path)
    assert {flag: trained[flag] for flag in main.DEMO_STEPS} == main.DEMO_STEPS


def test_demo_honours_the_step_flags_and_says_it_ignores_the_data_path(tmp_path, monkeypatch,
                                                                       capsys):
    calls = record_demo_calls(monkeypatch)
    arguments = ["--demo", "--save_folder", str(tmp_path), "--train_steps", "20",
                 "--save_and_sample_every", "5", "--data_path", "elsewhere", "--unet_dim", "8"]
    assert main.main(arguments) == 0
    (_, trained), _ = calls
    assert (trained["train_steps"], trained["save_and_sample_every"]) == (20, 5)
    assert trained["unet_dim"] == 8 and trained["data_path"] != "elsewhere"
    assert "--data_path is ignored" in capsys.readouterr().out


def test_ctrl_c_in_the_demo_stops_it_with_status_130(tmp_path, monkeypatch, capsys):
    visualized = []

    def interrupted(**settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "train_diffusion", interrupted)
    monkeypatch.setattr(main, "visualize_diffusion", lambda **settings: visualized.append(1))
    assert main.main(["--demo", "--save_folder", str(tmp_path)]) == 130
    assert visualized == [] and "Interrupted" in capsys.readouterr().err


def test_ctrl_c_during_training_exits_130(tmp_path, monkeypatch):
    def interrupted(**settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(main, "train_diffusion", interrupted)
    assert main.main(["--save_folder", str(tmp_path)]) == 130


def test_data_class_outside_the_choices_is_refused():
    with pytest.raises(SystemExit):
        main.main(["--data_class", "horse"])


def test_missing_data_exits_2_with_one_message_and_no_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_part_b(["main.py", "--data_path", str(missing), "--save_folder",
                         str(tmp_path / "results")])
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: Data folder {missing} does not exist")
    assert "--download" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_training_finishes_offline_with_no_wandb_key_and_stdin_closed(afhq, tmp_path):
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("WANDB_MODE", "WANDB_API_KEY")}
    environment.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), WANDB_SILENT="true")
    script = ("import torch, utils; torch.set_num_threads(1); utils.train_diffusion("
              f"train_steps=1, save_and_sample_every=1, fid=False, save_folder=r'{tmp_path}', "
              f"data_path=r'{afhq}', **{TINY!r})")
    result = run_part_b(["-c", script], environment)
    assert result.returncode == 0, result.stderr
    assert "logging offline" in result.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*"))


# ---------------------------------------------------------------- command line: bad input


def run_main_expecting_an_error(arguments, capsys):
    """Run main.main in this process; returns its stderr after checking status 2, one line."""
    assert main.main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Traceback" not in error
    return error


@pytest.mark.parametrize("arguments, message", [
    (["--train_steps", "-5"], "argument --train_steps: must be at least 1, got -5"),
    (["--save_and_sample_every", "0"], "argument --save_and_sample_every: must be at least 1"),
    (["--batch_size", "0"], "argument --batch_size: must be at least 1"),
    (["--time_steps", "0"], "argument --time_steps: must be at least 1"),
    (["--learning_rate", "0"], "argument --learning_rate: must be positive"),
    (["--checkpoint_minutes", "0"], "argument --checkpoint_minutes: must be positive"),
    (["--dataloader_workers", "-1"], "argument --dataloader_workers: must be 0 or more"),
    (["--unet_dim_mults", "1", "0"], "argument --unet_dim_mults: must be at least 1, got 0"),
])
def test_numbers_out_of_range_are_refused_by_argparse_naming_the_flag(capsys, arguments,
                                                                      message):
    with pytest.raises(SystemExit) as exit_:
        main.main(arguments)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


@pytest.mark.parametrize("arguments, message", [
    (["--unet_dim", "12"], "--unet_dim must be a multiple of 8"),
    (["--image_size", "30"], "--image_size 30 cannot be halved 3 times, as --unet_dim_mults 1 2 4 8"),
    (["--precision", "fp16"], "--precision: precision='fp16' needs a CUDA GPU"),
])
def test_bad_settings_are_refused_by_flag_before_any_work(afhq, tmp_path, capsys, monkeypatch,
                                                          arguments, message):
    decodes = []
    monkeypatch.setattr(images, "decode_image", lambda *args: decodes.append(args))
    results = tmp_path / "results"
    error = run_main_expecting_an_error(
        [*arguments, "--data_path", str(afhq), "--save_folder", str(results)], capsys)
    assert message in error
    assert decodes == [] and not (results / "metrics.csv").exists()
    assert not (results / "wandb").exists()


def test_results_folder_that_cannot_be_written_is_refused(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    error = run_main_expecting_an_error(["--save_folder", str(tmp_path / "a_file" / "runs")],
                                        capsys)
    assert "--save_folder" in error and "cannot be written" in error


@pytest.mark.parametrize("content, message", [
    (b"this is a text file", "not a readable checkpoint"),
    (b"PK\x03\x04half a zip", "not a readable checkpoint"),
])
def test_load_path_that_is_not_a_checkpoint_is_refused(tmp_path, capsys, content, message):
    (tmp_path / "notes.pt").write_bytes(content)
    error = run_main_expecting_an_error(
        ["--load_path", str(tmp_path / "notes.pt"), "--save_folder", str(tmp_path)], capsys)
    assert "--load_path" in error and message in error


def test_resuming_a_checkpoint_already_at_train_steps_is_refused(tmp_path, capsys):
    torch.save({"step": 100, "model": {}}, tmp_path / "model.pt")
    error = run_main_expecting_an_error(["--load_path", str(tmp_path / "model.pt"),
                                         "--train_steps", "50", "--save_folder", str(tmp_path)],
                                        capsys)
    assert "is at step 100, and --train_steps is 50: pass a larger --train_steps" in error


def test_visualize_without_a_checkpoint_is_refused_before_decoding(afhq, tmp_path, capsys):
    error = run_main_expecting_an_error(["--visualize", "--save_folder", str(tmp_path),
                                         "--data_path", str(afhq)], capsys)
    assert f"No checkpoint at {tmp_path / 'model.pt'}" in error


def test_fid_without_internet_is_refused_before_any_work(afhq, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    decodes = []
    monkeypatch.setattr(fid_score, "build_feature_extractor", offline)
    monkeypatch.setattr(images, "decode_image", lambda *args: decodes.append(args))
    error = run_main_expecting_an_error(["--fid", "--data_path", str(afhq), "--save_folder",
                                         str(tmp_path)], capsys)
    assert "--fid: FID needs clean-fid's Inception network" in error
    assert "turn FID off" in error and decodes == []


def run_in_a_terminal(arguments, environment, timeout=300):
    """Run a Python command in A3_PartB with a pseudo-terminal as stdin, stdout and stderr, as
    a user's shell does; returns (exit status, everything printed). A program that waits for
    input is killed at ``timeout`` and its status is None."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, *arguments], cwd=PART_B, env=environment,
                               stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        try:
            chunk = os.read(leader, 65536) if ready else b""
        except OSError:  # the terminal closed: the program ended
            break
        if ready and not chunk:
            break
        output += chunk
    else:
        process.kill()
    os.close(leader)
    status = process.wait() if process.returncode is None and time.monotonic() < deadline else None
    return status, output.decode(errors="replace")


@pytest.mark.slow
def test_demo_in_a_terminal_without_a_wandb_key_finishes_without_asking(tmp_path):
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("WANDB_MODE", "WANDB_API_KEY")}
    environment.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path))
    tiny = ["--unet_dim", "8", "--unet_dim_mults", "1", "2", "--image_size", "16",
            "--batch_size", "4", "--time_steps", "5", "--dataloader_workers", "0"]
    status, output = run_in_a_terminal(
        ["main.py", "--demo", "--train_steps", "2", "--save_and_sample_every", "2",
         "--save_folder", str(tmp_path / "demo"), *tiny], environment)
    assert status == 0, output
    assert "logging offline" in output and "Enter your choice" not in output
    assert (tmp_path / "demo" / "backward_diffusion.png").is_file()
