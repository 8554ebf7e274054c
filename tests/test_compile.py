"""Runs under torch.compile (Accelerate's --dynamo_backend): what they save loads everywhere, and two compiled
processes stop and resume.

torch.compile runs on the CPU, but inductor's code generation takes minutes there (a 2-process SSL run on digits:
161 s against 24 s with the eager backend). These runs use the backends that trace the model as inductor's does
without generating code: aot_eager (TorchDynamo and AOTAutograd) for one process, eager (TorchDynamo) for two. The
wrapper torch.compile puts around the model -- what these tests are about -- is the same for every backend.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script
from safetensors.torch import load_file, save_file

from mrl.pretrained import MatryoshkaEncoder
from mrl.run_folder.layout import list_checkpoints
from mrl.train.guards import PREEMPTED_MARKER

ACCELERATE = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "-q", "--cpu", "--num_processes",
              "1", "--dynamo_backend", "aot_eager"]
SUPERVISED = ["--dataset", "digits", "--image_size", "8", "--epochs", 1, "--batch_size", 32, "--grad_accum_steps", 2,
              "--lr", "2e-3", "--num_workers", 0, "--max_train_samples", 128, "--max_eval_samples", 64,
              "--report_to", "none"]
SSL = ["--dataset", "digits", "--image_size", 8, "--num_workers", 0, "--knn_every", 0, "--batch_size", 16,
       "--max_train_samples", 64, "--max_eval_samples", 64, "--knn_bank_samples", 64, "--epochs", 2,
       "--checkpointing_steps", 3, "--lr", "2e-3", "--report_to", "none"]


@pytest.fixture(autouse=True)
def compile_cache_in_the_test_folder(tmp_path, monkeypatch):
    # TorchInductor / AOTAutograd caches go to the test's folder, not the user's
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))


def wrapper_keys(keys):
    return [k for k in keys if "_orig_mod." in k or k.startswith("module.")]


def test_a_compiled_run_saves_bare_keys_and_runs_saved_by_earlier_versions_still_load(tmp_path):
    # the command, as a user types it
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    result = subprocess.run([*ACCELERATE, str(ROOT / "train_supervised.py"), *map(str, SUPERVISED), "--output_dir",
                             str(tmp_path / "run")], cwd=tmp_path, env=env, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert weights and not wrapper_keys(weights)
    model = MatryoshkaEncoder.from_pretrained(tmp_path / "run", device="cpu")
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = model.encode(images, dim=16)
    # a run folder that an earlier version wrote with a dynamo backend: every key prefixed by `_orig_mod.`
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "run", old)
    save_file({f"_orig_mod.{k}": v for k, v in weights.items()}, old / "model.safetensors")
    loaded = MatryoshkaEncoder.from_pretrained(old, device="cpu")
    torch.testing.assert_close(loaded.encode(images, dim=16), expected, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")  # and what it saves back is bare
    assert not wrapper_keys(load_file(tmp_path / "again" / "model.safetensors"))


def test_two_compiled_processes_stop_at_a_checkpoint_and_resume_from_it(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", ACCELERATE_DYNAMO_BACKEND="eager")
    out = tmp_path / "out"
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "mrl.train.supervise", sys.executable, "-m",
                                    "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                    str(ROOT / "train_ssl.py"), *map(str, SSL), "--output_dir", str(out)],
                                   cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                                   stderr=stderr, start_new_session=True)
    deadline = time.time() + 300
    while not list_checkpoints(out):
        assert process.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=300) == 75, (tmp_path / "stderr").read_text()[-3000:]
    marker = json.loads((out / PREEMPTED_MARKER).read_text())
    saved = load_file(os.path.join(marker["checkpoint"], "model.safetensors"))
    assert saved and not wrapper_keys(saved)
    result = run_script("train_ssl.py", *SSL, "--output_dir", out, "--resume_from_checkpoint", "latest",
                        tmp_path=tmp_path, processes=2, env={"ACCELERATE_DYNAMO_BACKEND": "eager"})
    assert f"resumed from {marker['checkpoint']}" in result.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 8
    final = load_file(out / "model.safetensors")
    assert final and not wrapper_keys(final)
