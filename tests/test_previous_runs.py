"""Users keep their runs: run folders written by earlier versions load, evaluate and resume with today's code --
SSL runs of the code before the method registry (commit PREVIOUS, the last one before mrl/ssl/methods.py and
mrl/ssl/model.py), and supervised runs of the code before mrl/ became packages (FLAT, the last flat mrl/).

The previous version is taken from the repository's own history (`git archive`) and run as it was, so the run
folders are really written by it: a ReLIC run (EMA target, the learnable `log_temperature`) and a BYOL run (the
predictor) with a checkpoint mid-epoch. Today's code resumes each from that checkpoint and must end with exactly the
weights the previous version's uninterrupted run saved.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
from conftest import ROOT, run_script
from safetensors.torch import load_file
from test_train_ssl import run_main

from mrl.run_folder.final_model import load_model

PREVIOUS = "663f805"
FLAT = "35a8b2e"
# 48 digits images in batches of 16: 3 optimizer steps, a checkpoint after the second (mid-epoch)
ARGS = ["--dataset", "digits", "--image_size", "8", "--num_workers", "0", "--batch_size", "16",
        "--max_train_samples", "48", "--knn_every", "0", "--knn_bank_samples", "100", "--epochs", "1",
        "--checkpointing_steps", "2", "--proj_hidden_dim", "64", "--dims", "8,64,512", "--report_to", "none"]

pytestmark = pytest.mark.xdist_group("test_previous_runs")


def checkout(commit, folder):
    """The repository as it was at `commit` (from its own history), in `folder`; returns the environment that runs it."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], capture_output=True)
    assert archive.returncode == 0, f"these tests need the repository's history (commit {commit}): " \
                                    f"{archive.stderr.decode()[:300]}"
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(folder, filter="data")
    return dict(os.environ, PYTHONPATH=str(folder), HF_DATASETS_DISABLE_PROGRESS_BARS="1")


@pytest.fixture(scope="module")
def previous_runs(tmp_path_factory):
    """{method: run folder} written by the previous version's train_ssl.py."""
    tmp = tmp_path_factory.mktemp("previous")
    env = checkout(PREVIOUS, tmp / "code")
    runs = {}
    for method in ("relic", "byol"):
        runs[method] = tmp / method
        subprocess.run([sys.executable, str(tmp / "code" / "train_ssl.py"), *ARGS, "--method", method,
                        "--output_dir", str(runs[method])], cwd=tmp, env=env, check=True, capture_output=True,
                       timeout=600)
    return runs


# 60 digits images in batches of 20: 3 optimizer steps, a checkpoint after the second (mid-epoch); MRL-E heads
SUPERVISED = ["--dataset", "digits", "--image_size", "8", "--num_workers", "0", "--batch_size", "20",
              "--grad_accum_steps", "1", "--max_train_samples", "60", "--epochs", "1", "--checkpointing_steps", "2",
              "--lr", "2e-3", "--tied", "--dims", "8,64,512", "--report_to", "none"]


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    """A supervised run folder written by FLAT's train_supervised.py."""
    tmp = tmp_path_factory.mktemp("flat")
    env = checkout(FLAT, tmp / "code")
    subprocess.run([sys.executable, str(tmp / "code" / "train_supervised.py"), *SUPERVISED, "--output_dir",
                    str(tmp / "run")], cwd=tmp, env=env, check=True, capture_output=True, timeout=600)
    return tmp / "run"


def test_a_run_of_the_flat_layout_loads_evaluates_and_resumes_to_its_own_weights(flat_run, tmp_path):
    backbone, heads, config = load_model(flat_run)
    saved = load_file(flat_run / "model.safetensors")
    assert config["heads"]["tied"] and heads.dims == [8, 64, 512]
    assert all(torch.equal(value, saved["backbone." + key]) for key, value in backbone.state_dict().items())
    assert all(torch.equal(value, saved["heads." + key]) for key, value in heads.state_dict().items())
    run_script("evaluate.py", "--checkpoint", flat_run, "--dims", 8, 512, "--no-pca", "--max_train_samples", 200,
               "--max_eval_samples", 60, "--num_workers", 0, "--feature_cache", "none", "--no-retrieval_grid",
               "--output_dir", tmp_path / "eval", tmp_path=tmp_path)
    per_dim = json.loads((tmp_path / "eval" / "results.json").read_text())["runs"][0]["per_dim"]
    assert [r["dim"] for r in per_dim] == [8, 512] and all(0 < r["head"] <= 1 for r in per_dim)
    resumed = tmp_path / "resumed"
    shutil.copytree(flat_run / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    result = run_script("train_supervised.py", *SUPERVISED, "--output_dir", resumed, "--resume_from_checkpoint",
                        "latest", tmp_path=tmp_path)
    assert "resumed from" in result.stdout
    a, b = load_file(flat_run / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("method", ["relic", "byol"])
def test_a_previous_run_and_its_checkpoint_load(previous_runs, method):
    run = previous_runs[method]
    backbone, heads, config = load_model(run)
    saved = load_file(run / "model.safetensors")
    assert heads is None and config["ssl"]["method"] == method and config["ssl"]["exported"] == "target"
    assert all(torch.equal(value, saved["backbone." + key]) for key, value in backbone.state_dict().items())
    checkpoint = run / "checkpoints" / "step_00000002"  # the training model's keys: the target's backbone is used
    backbone, _, _ = load_model(checkpoint)
    state = load_file(checkpoint / "model.safetensors")
    assert {"log_temperature"} <= state.keys() if method == "relic" else any(k.startswith("predictor.") for k in state)
    assert all(torch.equal(value, state["target.module.backbone." + key])
               for key, value in backbone.state_dict().items())


@pytest.mark.parametrize("method", ["relic", "byol"])
def test_a_previous_runs_checkpoint_resumes_to_the_weights_its_own_run_saved(previous_runs, method, tmp_path, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(previous_runs[method] / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    run_main([*ARGS, "--method", method, "--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert "resumed from" in capsys.readouterr().out
    a, b = load_file(previous_runs[method] / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_a_previous_run_evaluates(previous_runs, tmp_path):
    run = previous_runs["relic"]
    run_script("evaluate.py", "--checkpoint", run, "--dims", 8, 512, "--no-pca", "--max_train_samples", 200,
               "--max_eval_samples", 60, "--num_workers", 0, "--feature_cache", "none", "--no-retrieval_grid",
               "--output_dir", tmp_path / "eval", tmp_path=tmp_path)
    per_dim = json.loads((tmp_path / "eval" / "results.json").read_text())["runs"][0]["per_dim"]
    assert [r["dim"] for r in per_dim] == [8, 512] and all(0 < r["probe"] <= 1 for r in per_dim)
