"""Preemption and divergence: a run stops at a step boundary with a usable checkpoint, never a broken one."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import DIGITS_FAST, ROOT, run_script
from mrl.guards import PREEMPTED_EXIT_CODE
from wandb_history import history, run_dirs

ARGS = [*DIGITS_FAST, "--epochs", 2, "--grad_accum_steps", 2, "--checkpointing_steps", 7, "--log_every", 1]


def test_sigterm_saves_a_checkpoint_and_the_relaunched_run_ends_like_an_uninterrupted_one(trained, tmp_path):
    reference, _ = trained
    out = tmp_path / "out"
    (tmp_path / "wandb").mkdir()  # where run_script(wandb=True) logs the relaunch too
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"),
               WANDB_SILENT="true")
    process = subprocess.Popen([sys.executable, str(ROOT / "train_supervised.py"), *map(str, ARGS), "--output_dir",
                                str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    for line in process.stdout:  # the summary line is printed just before the first step
        if "optimizer steps" in line:
            break
    time.sleep(4)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "preempted: saved" in stderr and "--resume_from_checkpoint latest" in stderr and "Traceback" not in stderr
    stopped_at = int(stderr.split(" at step ")[1].split(";")[0])
    assert 0 < stopped_at < 46 and not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()

    run_script("train_supervised.py", *ARGS, "--output_dir", out, "--resume_from_checkpoint", "latest",
               tmp_path=tmp_path, wandb=True)
    original = json.loads((reference / "out" / "metrics.json").read_text())
    continued = json.loads((out / "metrics.json").read_text())
    assert continued["history"] == original["history"] and continued["test"] == original["test"]
    a, b = load_file(reference / "out" / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # Both launches logged into one W&B run, and its steps never go backwards.
    runs = run_dirs(tmp_path / "wandb")
    assert len(runs) == 2 and len({d.split("-")[-1] for d in runs}) == 1
    for run_dir in runs:
        steps = [r["_step"] for r in history(run_dir)]
        assert steps == sorted(steps)


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    result = run_script("train_supervised.py", *DIGITS_FAST, "--lr", "1e30", "--epochs", 1, "--checkpointing_steps",
                        1, "--checkpoints_total_limit", 5, "--output_dir", tmp_path / "out", tmp_path=tmp_path,
                        check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: the loss became NaN or infinite at optimizer step" in result.stderr
    bad_step = int(result.stderr.split("optimizer step ")[1].split(";")[0])
    saved = sorted(os.listdir(tmp_path / "out" / "checkpoints"))
    assert saved and saved[-1] == f"step_{bad_step - 1:08d}"
    weights = load_file(tmp_path / "out" / "checkpoints" / saved[-1] / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path):
    reference, _ = trained
    out = tmp_path / "out"
    for step in (35, 42):
        src = reference / "out" / "checkpoints" / f"step_{step:08d}"
        dst = out / "checkpoints" / src.name
        dst.mkdir(parents=True)
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
    newest = out / "checkpoints" / "step_00000042" / "optimizer.bin"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a kill during a copy
    result = run_script("train_supervised.py", *ARGS, "--output_dir", out, "--resume_from_checkpoint", "latest",
                        tmp_path=tmp_path)
    assert "step_00000042 cannot be loaded" in result.stdout and "resumed from" in result.stdout
    assert "step_00000035" in result.stdout.split("resumed from")[1].splitlines()[0]
    original = json.loads((reference / "out" / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["test"] == original["test"]
