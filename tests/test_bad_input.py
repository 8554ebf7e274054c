"""Bad input to each script's command line: a clear one-line message and exit status, and nothing lost.

The scripts run in-process here (`mrl.utils.script.run(main, args)`, exactly what their `__main__` does), which is faster
than a subprocess per case; tests/test_train_supervised.py checks the same on the real command line."""

import io
import json

import pytest
from PIL import Image
from test_data import make_image_folder

import datasets
import evaluate
import train_ssl
import train_supervised
from mrl.report.tracking import wandb_configured
from mrl.utils import script as entry_point

FAST = {"train_supervised.py": ["--image_size", "8", "--batch_size", "16", "--grad_accum_steps", "1", "--epochs", "1",
                                "--num_workers", "0", "--report_to", "none", "--model", "resnet18"],
        "train_ssl.py": ["--image_size", "8", "--batch_size", "16", "--epochs", "1", "--num_workers", "0",
                         "--report_to", "none", "--model", "resnet18", "--knn_bank_samples", "64"]}
MODULES = {"train_supervised.py": train_supervised, "train_ssl.py": train_ssl, "evaluate.py": evaluate}
TRAINING = list(FAST)


def run(script, *argv):
    """(exit status, stderr-style message) of the script's command line, in-process."""
    module = MODULES[script]
    with pytest.raises(SystemExit) as exit_info:
        args = module.get_args_parser().parse_args([str(a) for a in argv])
        entry_point.run(module.main, args)
        raise SystemExit(0)
    code = exit_info.value.code
    return (1, code) if isinstance(code, str) else (code, "")


@pytest.mark.parametrize("script", TRAINING + ["evaluate.py"])
def test_unknown_dataset_and_model_names_list_the_valid_ones(script, capsys):
    required = ["--checkpoint", "x"] if script == "evaluate.py" else []
    assert run(script, *required, "--dataset", "imagenet22k")[0] == 2
    assert "invalid choice: 'imagenet22k' (choose from 'cats_vs_dogs', 'cifar10'" in capsys.readouterr().err
    if script != "evaluate.py":  # --model also takes timm names and folders: checked before any work, one line
        code, message = run(script, "--model", "vit_b16", "--report_to", "none")
        assert code == 1 and message.startswith("error: unknown --model 'vit_b16'; choose one of: cnn4, cnn4_bn, "
                                                "resnet18, resnet34, resnet50, timm/<name>, hf-hub:<user>/<repo>")


@pytest.mark.parametrize("script", TRAINING)
def test_dataset_without_labels_or_without_images(script, tmp_path):
    no_labels = datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))] * 8})
    no_labels.save_to_disk(tmp_path / "no_labels")
    code, message = run(script, *FAST[script], "--dataset", "custom", "--dataset_path", tmp_path / "no_labels",
                        "--output_dir", tmp_path / "out")
    assert code == 1 and message.startswith("error: the train split has no label column")
    no_images = datasets.Dataset.from_dict({"text": ["a", "b"] * 4, "label": [0, 1] * 4})
    no_images.save_to_disk(tmp_path / "no_images")
    code, message = run(script, *FAST[script], "--dataset", "custom", "--dataset_path", tmp_path / "no_images",
                        "--output_dir", tmp_path / "out2")
    assert code == 1 and message.startswith("error: the train split has no image column (columns: text, label)")
    (tmp_path / "one_class" / "cat").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "one_class" / "cat" / f"{i}.png")
    code, message = run(script, *FAST[script], "--dataset", "custom", "--dataset_path", tmp_path / "one_class",
                        "--output_dir", tmp_path / "out3")
    assert code == 1 and "image folder with one class subfolder (cat)" in message and "at least two" in message


@pytest.mark.parametrize("script", TRAINING)
def test_empty_folder_and_a_folder_of_unreadable_files(script, tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    code, message = run(script, *FAST[script], "--dataset", "custom", "--dataset_path", tmp_path / "empty",
                        "--output_dir", tmp_path / "out")
    assert code == 1 and message.startswith(f"error: could not load dataset {tmp_path / 'empty'}")
    for name in ("a", "b"):
        (tmp_path / "broken" / name).mkdir(parents=True)
        for i in range(40):
            (tmp_path / "broken" / name / f"{i}.png").write_bytes(b"" if i % 2 else b"\x89PNG broken")
    code, message = run(script, *FAST[script], "--dataset", "custom", "--dataset_path", tmp_path / "broken",
                        "--output_dir", tmp_path / "out2")
    assert code == 1 and "could be read (" in message and ": corrupt or empty files?" in message, message
    assert str(tmp_path / "broken") in message  # the first unreadable files are named


def _image_bytes(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("script", TRAINING)
def test_odd_images_train_and_unreadable_ones_are_skipped(script, tmp_path, capsys):
    """CMYK, grayscale, palette, 16-bit, RGBA and 1x1 images are used; zero-byte and corrupt ones are skipped."""
    folder = make_image_folder(tmp_path / "folder")  # digits in L / RGBA, some 120 px, and one corrupt file
    odd = [Image.new("CMYK", (20, 20), (0, 50, 90, 10)), Image.new("P", (12, 9)), Image.new("I;16", (10, 10)),
           Image.new("RGB", (1, 1), (200, 10, 10))]
    for i, image in enumerate(odd):
        (folder / "zero" / f"odd{i}.{'jpg' if image.mode == 'CMYK' else 'png'}").write_bytes(
            _image_bytes(image, "JPEG" if image.mode == "CMYK" else "PNG"))
    (folder / "zero" / "empty.png").write_bytes(b"")
    code, message = run(script, *FAST[script], "--dataset", "custom", "--dataset_path", folder, "--val_fraction",
                        0.2, "--test_fraction", 0.2, "--output_dir", tmp_path / "out")
    assert code == 0, message
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("script", TRAINING)
def test_dims_out_of_range(script, tmp_path):
    code, message = run(script, *FAST[script], "--dataset", "digits", "--dims", "0,8", "--output_dir", tmp_path / "o")
    assert code == 1 and "--dims must lie in 1..512" in message


@pytest.mark.parametrize("script", TRAINING)
def test_unwritable_output_dir(script, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    code, message = run(script, *FAST[script], "--dataset", "digits", "--output_dir", tmp_path / "a_file" / "run")
    assert code == 1 and message.startswith(f"error: cannot create --output_dir {tmp_path / 'a_file' / 'run'}")


@pytest.mark.parametrize("script", TRAINING)
def test_an_existing_run_is_not_overwritten(script, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints" / "step_00000010").mkdir(parents=True)
    (out / "config.json").write_text('{"kept": true}')
    code, message = run(script, *FAST[script], "--dataset", "digits", "--output_dir", out)
    assert code == 1 and "already holds a run (config.json, checkpoints)" in message and "--overwrite" in message
    assert (out / "config.json").read_text() == '{"kept": true}' and (out / "checkpoints" / "step_00000010").is_dir()
    # --overwrite replaces all of the old run, its evaluation too, and keeps what is not the run's
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    code, message = run(script, *FAST[script], "--dataset", "digits", "--output_dir", out, "--overwrite",
                        "--max_train_samples", 64)
    assert code == 0, message
    assert not (out / "eval").exists() and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["format_version"] == 1
    assert [p.name for p in (out / "checkpoints").iterdir()] != ["step_00000010"]
    # the weights are as readable as every other output (safetensors writes them through a 0600 temporary file)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777


@pytest.mark.parametrize("script", TRAINING + ["evaluate.py"])
def test_wandb_without_a_login_is_one_line_before_any_work(script, tmp_path, monkeypatch):
    # W&B would wait forever at its login prompt (or fail with a traceback without a terminal)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--checkpoint", tmp_path / "run"] if script == "evaluate.py" else [*FAST[script], "--dataset", "digits"]
    code, message = run(script, *argv, "--output_dir", tmp_path / "out", "--report_to", "wandb")
    assert code == 1 and message.startswith("error: --report_to wandb, but W&B is not logged in")
    assert "wandb login" in message and "WANDB_MODE=offline" in message and not (tmp_path / "out").exists()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    assert wandb_configured()  # what `wandb login` saves is recognized


@pytest.mark.parametrize("script", TRAINING)
@pytest.mark.parametrize("argv,code,message", [
    (["--dims", "8,x"], 2, "dims must be integers"),
    (["--dataset", "custom"], 1, "error: --dataset custom needs --dataset_path"),
    (["--dataset_path", "/nonexistent/data"], 1, "error: --dataset_path /nonexistent/data does not exist"),
    (["--checkpointing_steps", "often"], 1, "error: --checkpointing_steps must be 'epoch' or a number"),
    (["--epochs", "0"], 1, "error: --epochs must be at least 1"),
    (["--seed", str(2**32)], 1, "error: --seed must be in 0..4294967295"),
    (["--val_fraction", "0.6", "--test_fraction", "0.5"], 1, "error: --val_fraction must be in (0, 1)"),
])
def test_flags_that_cannot_work(script, argv, code, message, tmp_path, capsys):
    got_code, got_message = run(script, *FAST[script], "--dataset", "digits", "--output_dir", tmp_path / "o", *argv)
    assert got_code == code and message in got_message + capsys.readouterr().err


@pytest.mark.parametrize("script", TRAINING + ["evaluate.py"])
def test_help_states_each_default_once(script, capsys):
    with pytest.raises(SystemExit):
        MODULES[script].get_args_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "(default: None)" not in text
    for flag_help in text.split(" --")[1:]:
        assert flag_help.count("(default:") <= 1, flag_help
