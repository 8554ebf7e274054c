"""Preemption and divergence: a run stops at a step boundary with a usable checkpoint, never a broken one."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import DIGITS_FAST, ROOT, run_script, shared_run
from mrl.guards import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER
from wandb_history import history, run_dirs

ARGS = [*DIGITS_FAST, "--epochs", 2, "--grad_accum_steps", 2, "--checkpointing_steps", 7, "--log_every", 1]
# The preemption runs: 448 training images, 7 optimizer steps an epoch (14 in all), a checkpoint every 3 steps, so
# the signal arrives mid-epoch and every delivery path costs two short runs.
PREEMPTED = [*DIGITS_FAST, "--epochs", 2, "--grad_accum_steps", 2, "--max_train_samples", 448, "--max_eval_samples", 64,
             "--checkpointing_steps", 3, "--log_every", 1]
FIRST_CHECKPOINT, LAST_STEP = 3, 14


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The preemption runs' reference: the same run, never stopped (shared by pytest-xdist workers)."""
    return shared_run(tmp_path_factory, "uninterrupted", "train_supervised.py", *PREEMPTED, wandb=True)[0]


@pytest.fixture(scope="session")
def uninterrupted_two_processes(tmp_path_factory):
    return shared_run(tmp_path_factory, "uninterrupted_two_processes", "train_supervised.py", *PREEMPTED, wandb=True,
                      processes=2)[0]
LAUNCHERS = {
    "python": [sys.executable],
    "accelerate": [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "-q", "--config_file",
                   str(ROOT / "accelerate_configs" / "cpu.yaml")],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
}


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def preempt(launcher, target, signum, out, tmp_path, args=PREEMPTED):
    """Start a run with 2 DataLoader workers per process in a session of its own, wait for its first checkpoint
    (mid-epoch), deliver `signum` to the `target` ("group": every process, as `timeout`, `docker stop`,
    Kubernetes and Slurm job steps do; "launcher"; "trainer": the training process under the launcher), and wait
    until every process has ended. Returns (launcher exit status, stderr)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"),
               WANDB_SILENT="true", **({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"} if launcher == "torchrun"
                                       else {}))
    (tmp_path / "wandb").mkdir(exist_ok=True)
    process = subprocess.Popen([*LAUNCHERS[launcher], str(ROOT / "train_supervised.py"), *map(str, args),
                                "--num_workers", "2", "--output_dir", str(out)], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / f"step_{FIRST_CHECKPOINT:08d}").is_dir():
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    if target == "group":
        os.killpg(process.pid, signum)
    elif target == "launcher":
        os.kill(process.pid, signum)
    else:
        os.kill(children(process.pid)[0], signum)
    _, stderr = process.communicate(timeout=300)  # the pipes close when the last process holding them ends
    return process.returncode, stderr


def check_preempted_and_resumed(out, stderr, reference, tmp_path, processes=1, args=PREEMPTED):
    """The run saved a checkpoint at a step boundary, left the marker, printed no traceback; relaunched with
    --resume_from_checkpoint latest it ends exactly like the uninterrupted `reference` run."""
    marker = json.loads((out / PREEMPTED_MARKER).read_text())
    assert FIRST_CHECKPOINT <= marker["step"] < LAST_STEP and not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / f"step_{marker['step']:08d}").is_dir()
    # no traceback from the training process (torchrun prints one of its own for the signal it got)
    assert not re.search(r'File ".*(train_supervised\.py|/mrl/)', stderr) and "DataLoader worker" not in stderr, \
        stderr[-3000:]
    run_script("train_supervised.py", *args, "--output_dir", out, "--resume_from_checkpoint", "latest",
               tmp_path=tmp_path, wandb=True, processes=processes)
    assert not (out / PREEMPTED_MARKER).exists()  # the relaunch removed it
    original = json.loads((reference / "out" / "metrics.json").read_text())
    continued = json.loads((out / "metrics.json").read_text())
    assert original["steps"] == LAST_STEP
    assert continued["history"] == original["history"] and continued["test"] == original["test"]
    a, b = load_file(reference / "out" / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    return marker


def test_sigterm_to_the_process_group_saves_and_the_relaunch_ends_like_an_uninterrupted_run(uninterrupted, tmp_path):
    # What `timeout`, `docker stop`, Kubernetes and Slurm do. The DataLoader workers get the signal too and must
    # not die of it before the training process has saved.
    reference = uninterrupted
    code, stderr = preempt("python", "group", signal.SIGTERM, tmp_path / "out", tmp_path)
    assert code == PREEMPTED_EXIT_CODE and "Traceback" not in stderr, stderr[-3000:]
    assert "preempted: saved" in stderr and "--resume_from_checkpoint latest" in stderr
    marker = check_preempted_and_resumed(tmp_path / "out", stderr, reference, tmp_path)
    assert marker["signal"] == "SIGTERM"
    # Both launches logged into one W&B run, and its steps never go backwards.
    runs = run_dirs(tmp_path / "wandb")
    assert len(runs) == 2 and len({d.split("-")[-1] for d in runs}) == 1
    for run_dir in runs:
        steps = [r["_step"] for r in history(run_dir)]
        assert steps == sorted(steps)


def test_sigterm_to_accelerate_launch_alone_reaches_the_training_process(uninterrupted, tmp_path):
    # accelerate launch dies of SIGTERM without passing it on; the training process follows its launcher.
    reference = uninterrupted
    code, stderr = preempt("accelerate", "launcher", signal.SIGTERM, tmp_path / "out", tmp_path)
    assert code == -signal.SIGTERM
    assert check_preempted_and_resumed(tmp_path / "out", stderr, reference, tmp_path)["signal"] == "SIGTERM"


def test_sigusr1_to_the_training_process_under_accelerate_launch_leaves_the_marker(uninterrupted, tmp_path):
    # the launcher turns exit status 75 into 1: the marker is what tells a job script to requeue
    reference = uninterrupted
    code, stderr = preempt("accelerate", "trainer", signal.SIGUSR1, tmp_path / "out", tmp_path)
    assert code == 1 and "preempted: saved" in stderr
    assert check_preempted_and_resumed(tmp_path / "out", stderr, reference, tmp_path)["signal"] == "SIGUSR1"


def test_ctrl_c_saves_like_a_preemption(uninterrupted, tmp_path):
    reference = uninterrupted
    code, stderr = preempt("python", "group", signal.SIGINT, tmp_path / "out", tmp_path)
    assert code == PREEMPTED_EXIT_CODE and "SIGINT received" in stderr, stderr[-3000:]
    assert check_preempted_and_resumed(tmp_path / "out", stderr, reference, tmp_path)["signal"] == "SIGINT"


def test_sigterm_to_torchrun_stops_both_processes_at_one_step(uninterrupted_two_processes, tmp_path):
    code, stderr = preempt("torchrun", "launcher", signal.SIGTERM, tmp_path / "out", tmp_path)
    assert code != 0  # torchrun reports its own failure: the marker says "preempted"
    check_preempted_and_resumed(tmp_path / "out", stderr, uninterrupted_two_processes, tmp_path, processes=2)


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    script = ("import time\nfrom mrl.guards import Preemption\nPreemption()\nprint('ready', flush=True)\n"
              "time.sleep(60)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)  # the same Ctrl-C forwarded by a launcher: not a second one
    time.sleep(1.2)
    assert process.poll() is None
    started = time.time()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130 and time.time() - started < 5
    assert "SIGINT received" in stderr and "aborted by a second Ctrl-C" in stderr and "Traceback" not in stderr


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
