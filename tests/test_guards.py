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
from conftest import DIGITS_FAST, ROOT, run_script, session_processes, shared_run
from safetensors.torch import load_file
from wandb_history import history, run_dirs

from mrl.train.guards import PREEMPTED_MARKER
from mrl.utils.script import PREEMPTED_EXIT_CODE

ARGS = [*DIGITS_FAST, "--epochs", 2, "--grad_accum_steps", 2, "--checkpointing_steps", 7, "--log_every", 1]
# The preemption runs: 256 training images, 4 optimizer steps an epoch (8 in all), a checkpoint every 3 steps, so
# the signal arrives mid-epoch.
PREEMPTED = [*DIGITS_FAST, "--epochs", 2, "--grad_accum_steps", 2, "--max_train_samples", 256, "--max_eval_samples", 64,
             "--checkpointing_steps", 3, "--log_every", 1]
FIRST_CHECKPOINT, LAST_STEP = 3, 8


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The preemption runs' reference: the same run, never stopped (shared by pytest-xdist workers)."""
    return shared_run(tmp_path_factory, "uninterrupted", "train_supervised.py", *PREEMPTED, wandb=True)[0]


@pytest.fixture(scope="session")
def uninterrupted_two_processes(tmp_path_factory):
    return shared_run(tmp_path_factory, "uninterrupted_two_processes", "train_supervised.py", *PREEMPTED, wandb=True,
                      processes=2)[0]


ACCELERATE = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "-q", "--config_file",
              str(ROOT / "accelerate_configs" / "cpu.yaml")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SUPERVISE = [sys.executable, "-m", "mrl.train.supervise"]
# The launch forms the README documents for containers and schedulers (the process they wait on comes first), and
# plain `accelerate launch`, whose training process must still follow its launcher's death.
LAUNCHERS = {
    "python": [sys.executable],
    "supervise accelerate": [*SUPERVISE, *ACCELERATE],
    "supervise torchrun": [*SUPERVISE, *TORCHRUN],
    "accelerate": ACCELERATE,
}


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def preempt(launcher, target, signum, out, tmp_path, args=PREEMPTED, let_finish=False):
    """Start a run with 2 DataLoader workers per process in a session of its own, wait for its first checkpoint
    (mid-epoch), deliver `signum` to the `target` ("group": every process of the session's group, as `timeout`,
    `docker stop` through an init, Kubernetes and Slurm job steps do; "launcher": the process the environment waits
    on; "trainer": the training process under the launcher) and wait for the launched process alone, as a container
    runtime or a Slurm step does: whatever it leaves running would be killed now (or, `let_finish`, is waited for,
    as an interactive shell would let it finish). Returns (its exit status, stderr, the processes of the session
    still alive when it exited)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"),
               WANDB_SILENT="true", PYTHONPATH=str(ROOT),
               **({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"} if "torchrun" in launcher else {}))
    (tmp_path / "wandb").mkdir(exist_ok=True)
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen([*LAUNCHERS[launcher], str(ROOT / "train_supervised.py"), *map(str, args),
                                    "--num_workers", "2", "--output_dir", str(out)], cwd=tmp_path, env=env,
                                   stdout=stdout, stderr=stderr, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / f"step_{FIRST_CHECKPOINT:08d}").is_dir():
        assert process.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.05)
    if target == "group":
        os.killpg(process.pid, signum)
    elif target == "launcher":
        os.kill(process.pid, signum)
    else:
        os.kill(children(process.pid)[0], signum)
    code = process.wait(timeout=300)
    left = session_processes(process.pid)
    deadline = time.time() + 300
    while let_finish and session_processes(process.pid) and time.time() < deadline:
        time.sleep(0.1)
    for pid in session_processes(process.pid):  # not to leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    return code, (tmp_path / "stderr").read_text(), left


def check_preempted(out, stderr, left):
    """What the environment finds when the process it waited on has exited: nothing left running, and in the run
    folder the checkpoint at a step boundary and the marker naming it; no traceback from the training process."""
    assert not left, f"processes still running after the launched one exited: {left}\n{stderr[-3000:]}"
    marker = json.loads((out / PREEMPTED_MARKER).read_text())
    assert FIRST_CHECKPOINT <= marker["step"] < LAST_STEP and not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / f"step_{marker['step']:08d}").is_dir()
    assert not re.search(r'File ".*(train_supervised\.py|/mrl/)', stderr) and "DataLoader worker" not in stderr, \
        stderr[-3000:]
    return marker


def check_resumed(out, reference, tmp_path, processes=1, args=PREEMPTED):
    """Relaunched with --resume_from_checkpoint latest, the run ends exactly like the uninterrupted `reference`."""
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


# Every documented form, every way the signal arrives: the launched process exits with status 75 only after the
# checkpoint and the marker are on disk and every process it started has ended. One delivery per process count is
# relaunched and compared with the uninterrupted run (the one-process training is the same under both one-process
# forms); the others check what the environment sees.
FORMS = [("python", 1), ("supervise accelerate", 1), ("supervise torchrun", 2)]


@pytest.mark.parametrize("launcher, processes", FORMS)
def test_sigterm_to_the_process_group_saves_before_the_launched_process_exits_and_resumes_exactly(
        launcher, processes, request, tmp_path):
    # What `timeout`, `docker stop` through an init, Kubernetes and Slurm job steps do. The DataLoader workers get
    # the signal too and must not die of it before the training process has saved.
    code, stderr, left = preempt(launcher, "group", signal.SIGTERM, tmp_path / "out", tmp_path)
    assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert check_preempted(tmp_path / "out", stderr, left)["signal"] == "SIGTERM"
    assert "preempted: saved" in stderr and "--resume_from_checkpoint latest" in stderr
    if launcher == "supervise accelerate":
        return
    reference = request.getfixturevalue("uninterrupted" if processes == 1 else "uninterrupted_two_processes")
    check_resumed(tmp_path / "out", reference, tmp_path, processes)
    if launcher == "python":  # both launches logged into one W&B run, and its steps never go backwards
        runs = run_dirs(tmp_path / "wandb")
        assert len(runs) == 2 and len({d.split("-")[-1] for d in runs}) == 1
        for run_dir in runs:
            steps = [r["_step"] for r in history(run_dir)]
            assert steps == sorted(steps)


@pytest.mark.parametrize("launcher, processes, target, signum",
                         [(launcher, processes, "launcher", signal.SIGTERM) for launcher, processes in FORMS]
                         + [("supervise torchrun", 2, "group", signal.SIGUSR1)])
def test_sigterm_to_the_launched_process_alone_and_sigusr1_save_before_it_exits(launcher, processes, target, signum,
                                                                                tmp_path):
    # SIGTERM to the process alone: `docker stop` without an init, `kill PID`. SIGUSR1: Slurm's early warning
    # (--signal=USR1@120 signals every process of the step). torchrun dies of SIGUSR1, and its training processes
    # then get SIGTERM from the kernel (they follow their launcher): either may be the one they saw first. SIGUSR1 is
    # sent under torchrun only, the form Slurm steps use (examples/slurm.sh, tested below); the training process
    # handles it with the same code as SIGTERM, which every form gets above.
    code, stderr, left = preempt(launcher, target, signum, tmp_path / "out", tmp_path)
    assert code == PREEMPTED_EXIT_CODE, stderr[-3000:]
    seen = check_preempted(tmp_path / "out", stderr, left)["signal"]
    assert seen == signal.Signals(signum).name or ("torchrun" in launcher and seen == "SIGTERM"), seen


def test_plain_accelerate_launch_exits_at_once_and_its_training_process_still_saves(tmp_path):
    # Plain `accelerate launch` dies of SIGTERM at once without passing it on -- why the README runs it under
    # mrl.train.supervise wherever something waits on the launcher. Its training process follows the launcher's death
    # (PR_SET_PDEATHSIG) and still saves, which an interactive shell, tearing nothing down, lets it finish.
    code, stderr, left = preempt("accelerate", "launcher", signal.SIGTERM, tmp_path / "out", tmp_path,
                                 let_finish=True)
    assert code == -signal.SIGTERM and left  # the launcher was gone before its training process
    assert check_preempted(tmp_path / "out", stderr, [])["signal"] == "SIGTERM"


def test_ctrl_c_saves_like_a_preemption(tmp_path):
    code, stderr, left = preempt("python", "group", signal.SIGINT, tmp_path / "out", tmp_path)
    assert code == PREEMPTED_EXIT_CODE and "SIGINT received" in stderr, stderr[-3000:]
    assert check_preempted(tmp_path / "out", stderr, left)["signal"] == "SIGINT"


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    script = ("import time\nfrom mrl.train.guards import Preemption\nPreemption()\nprint('ready', flush=True)\n"
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


FAKE_SRUN = """#!/bin/bash
# stand-in for Slurm's srun on one node: drop srun's own options, run the task in place
while [[ "${1:-}" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
# stand-in for Slurm's scontrol: the node list is this machine; a requeue is written down
case "$1" in
    show) echo 127.0.0.1 ;;
    requeue) echo "requeue $2" >> "$REQUEUED" ;;
esac
"""


def test_the_slurm_script_saves_on_its_early_warning_and_requeues(tmp_path):
    # examples/slurm.sh on one node of 2 "GPUs" (2 gloo processes through Accelerate's multi-GPU launcher and the
    # multi-node config), with stand-ins for srun and scontrol. Slurm's --signal=B:USR1@120 signals the batch shell
    # alone; when the shell exits, Slurm ends the job and kills what is left.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}", SLURM_NNODES="1",
               SLURM_NODEID="0", SLURM_GPUS_ON_NODE="2", SLURM_JOB_NODELIST="node1", SLURM_JOB_ID="4242",
               REQUEUED=str(tmp_path / "requeued"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [*DIGITS_FAST, "--epochs", 1, "--max_train_samples", 256, "--max_eval_samples", 64, "--checkpointing_steps",
            2, "--report_to", "none", "--output_dir", out]
    with open(tmp_path / "log", "w") as log:
        shell = subprocess.Popen(["bash", "examples/slurm.sh", "train_supervised.py", *map(str, args)], cwd=ROOT,
                                 env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step_00000002").is_dir():
        assert shell.poll() is None and time.time() < deadline, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.05)
    os.kill(shell.pid, signal.SIGUSR1)
    assert shell.wait(timeout=300) == 0, (tmp_path / "log").read_text()[-3000:]
    left = session_processes(shell.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left
    marker = json.loads((out / PREEMPTED_MARKER).read_text())
    assert (out / "checkpoints" / f"step_{marker['step']:08d}").is_dir() and marker["step"] < 8
    assert (tmp_path / "requeued").read_text() == "requeue 4242\n"
    assert "requeueing job 4242" in (tmp_path / "log").read_text()
