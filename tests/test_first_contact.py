"""What trips a newcomer, run as a newcomer runs it: a documented command run twice, misspelled flags and choices,
an evaluation of a small run, a wrong --checkpoint with W&B on, a resume that finds nothing, offline mode."""

import json
import os
import subprocess
import sys

import pytest
from conftest import DIGITS_FAST, ROOT, run_script

import datasets
import evaluate
import train_ssl
import train_supervised
from mrl import UserError
from mrl.data.sources import load_splits
from mrl.models.backbones import build_backbone
from mrl.utils import hub_access

pytestmark = pytest.mark.xdist_group("test_first_contact")

# 64 digits images at 8 px in batches of 32, one epoch: a run in a few seconds
SMALL = [*DIGITS_FAST, "--max_train_samples", 64, "--epochs", 1, "--dims", "8,512"]


@pytest.fixture(scope="module")
def reruns(tmp_path_factory):
    """A documented command run as a newcomer runs it, without --output_dir: first with --resume_from_checkpoint
    latest (nothing to resume yet), again under `accelerate launch`, then again with latest; and once with an explicit
    --output_dir that holds a run. (the folder, the default run folder, {name: result})."""
    tmp = tmp_path_factory.mktemp("reruns")
    base = tmp / "runs" / "supervised_mrl_digits_resnet18"
    first = run_script("train_supervised.py", *SMALL, "--resume_from_checkpoint", "latest", tmp_path=tmp)
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               str(ROOT / "train_supervised.py"), *map(str, SMALL), "--report_to", "none"],
                              cwd=tmp, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, HF_DATASETS_DISABLE_PROGRESS_BARS="1"))
    assert launched.returncode == 0, launched.stderr[-2000:]
    resumed = run_script("train_supervised.py", *SMALL, "--resume_from_checkpoint", "latest", tmp_path=tmp)
    refused = run_script("train_supervised.py", *SMALL, "--output_dir", base, tmp_path=tmp, check=False)
    return tmp, base, {"first": first, "launched": launched, "resumed": resumed, "refused": refused}


def test_a_command_run_again_writes_beside_the_first_and_latest_resumes_the_newest(reruns):
    """Without --output_dir, the second run of a command (here under `accelerate launch`) writes runs/<name>_2 and
    says so, the first kept; --resume_from_checkpoint latest continues the newest of them; an explicit --output_dir
    that holds a run is still refused."""
    tmp, base, results = reruns
    name = os.path.join("runs", base.name)
    assert f"output: {name}" in results["first"].stdout and (base / "model.safetensors").is_file()
    assert (f"--output_dir not given: {name} holds a run, so this run writes to {name}_2"
            in results["launched"].stdout)
    assert (tmp / "runs" / f"{base.name}_2" / "model.safetensors").is_file()
    assert f"so this run continues {name}_2" in results["resumed"].stdout
    assert "resumed from" in results["resumed"].stdout and not (tmp / "runs" / f"{base.name}_3").exists()
    assert results["refused"].returncode == 1 and f"--output_dir {base} already holds a run" in results["refused"].stderr


def test_latest_on_a_fresh_folder_says_it_starts_from_step_0(reruns):
    _, base, results = reruns
    assert f"no checkpoint in {os.path.join('runs', base.name, 'checkpoints')}: starting from step 0" \
        in results["first"].stdout


@pytest.mark.parametrize("module, argv, expected", [
    (train_supervised, ["--dataset", "cifar-10"], "invalid choice: 'cifar-10'"),
    (train_ssl, ["--method", "simclr", "--ema_momentum", "0.9"], "--ema_momentum is a flag of relic and byol"),
    (evaluate, ["--checkpoint", "x", "--probe_max_itr", "3"], "unrecognized arguments: --probe_max_itr 3"),
])
def test_a_bad_flag_is_one_line_with_the_closest_valid_one(module, argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.get_args_parser().parse_args(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "usage:" not in lines[0] and expected in lines[0], lines
    assert lines[0].endswith("--help` lists every flag)")
    if "invalid choice" in expected or "unrecognized" in expected:
        assert "did you mean cifar10?" in lines[0] or "did you mean --probe_max_iter?" in lines[0]


def test_a_wrong_checkpoint_with_wandb_on_writes_nothing(tmp_path):
    missing = tmp_path / "no_such_run"
    result = run_script("evaluate.py", "--checkpoint", missing, tmp_path=tmp_path, wandb=True, check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(f"error: --checkpoint {missing}")
    assert not missing.exists() and not list((tmp_path / "wandb").iterdir())  # no W&B run started, no folder made


def test_a_small_run_is_evaluated_on_its_own_subset_unless_asked_otherwise(reruns, tmp_path):
    _, run, _ = reruns  # trained on 64 of the 1,437 training images
    common = ("evaluate.py", "--checkpoint", run, "--dims", "8,512", "--no-pca", "--num_workers", 0,
              "--no-retrieval_grid", "--no-adaptive_retrieval", "--feature_cache", "none")
    result = run_script(*common, "--output_dir", tmp_path / "own", tmp_path=tmp_path)
    assert "trained with --max_train_samples 64: evaluating on the same training subset" in result.stdout
    assert json.loads((tmp_path / "own" / "results.json").read_text())["runs"][0]["n"]["train"] == 64
    run_script(*common, "--max_train_samples", 0, "--output_dir", tmp_path / "all", tmp_path=tmp_path)
    everything = json.loads((tmp_path / "all" / "results.json").read_text())["runs"][0]["n"]["train"]
    assert everything == len(load_splits("digits").train)  # 1,437 digits: the whole training split


def test_the_size_error_names_the_model_asked_for():
    with pytest.raises(UserError, match="cnn4_bn needs images of at least"):
        build_backbone("cnn4_bn", 32)


def test_offline_the_error_does_not_ask_to_go_offline(monkeypatch):
    def fails(*args, **kwargs):  # what datasets raises offline for a dataset that is not in the cache
        raise ConnectionError("Couldn't reach 'microsoft/cats_vs_dogs' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", fails)
    monkeypatch.setattr(hub_access, "offline", lambda: True)
    with pytest.raises(UserError) as error:
        load_splits("cats_vs_dogs")
    assert "HF_HUB_OFFLINE is set" in str(error.value) and "set HF_HUB_OFFLINE=1" not in str(error.value)
    monkeypatch.setattr(hub_access, "offline", lambda: False)
    monkeypatch.setattr(hub_access, "hub_unreachable", lambda timeout=5: None)
    with pytest.raises(UserError, match="set HF_HUB_OFFLINE=1 to use a copy"):
        load_splits("cats_vs_dogs")
