"""Users keep their runs: SSL run folders written by the code before the method registry (commit PREVIOUS, the last
one before mrl/methods.py and mrl/ssl_model.py) load, evaluate and resume with today's code.

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
from safetensors.torch import load_file

from conftest import ROOT, run_script
from test_train_ssl import run_main
from mrl.checkpoint import load_model

PREVIOUS = "663f805"
# 48 digits images in batches of 16: 3 optimizer steps, a checkpoint after the second (mid-epoch)
ARGS = ["--dataset", "digits", "--image_size", "8", "--num_workers", "0", "--batch_size", "16",
        "--max_train_samples", "48", "--knn_every", "0", "--knn_bank_samples", "100", "--epochs", "1",
        "--checkpointing_steps", "2", "--proj_hidden_dim", "64", "--dims", "8,64,512", "--report_to", "none"]

pytestmark = pytest.mark.xdist_group("test_previous_runs")


@pytest.fixture(scope="module")
def previous_runs(tmp_path_factory):
    """{method: run folder} written by the previous version's train_ssl.py."""
    tmp = tmp_path_factory.mktemp("previous")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS], capture_output=True)
    assert archive.returncode == 0, f"these tests need the repository's history (commit {PREVIOUS}): " \
                                    f"{archive.stderr.decode()[:300]}"
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(tmp / "code", filter="data")
    env = dict(os.environ, PYTHONPATH=str(tmp / "code"), HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    runs = {}
    for method in ("relic", "byol"):
        runs[method] = tmp / method
        subprocess.run([sys.executable, str(tmp / "code" / "train_ssl.py"), *ARGS, "--method", method,
                        "--output_dir", str(runs[method])], cwd=tmp, env=env, check=True, capture_output=True,
                       timeout=600)
    return runs


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
