"""Two machines, for real, on one host: the multi-node Accelerate config (accelerate_configs/multi_node.yaml) launched
twice, `--num_machines 2 --machine_rank 0|1` against 127.0.0.1, one training process per machine, gloo -- each machine
its own launcher in its own session, as two nodes of a Slurm job are. On the ImageNet recipe's code path (a tiny
ILSVRC folder): every sample once per step over both machines, one writer, the same step checkpointed on both when
one machine alone gets SIGTERM, and a resume equal to the uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script, session_processes
from safetensors.torch import load_file
from wandb_history import history, run_dirs

from mrl.train.guards import PREEMPTED_MARKER
from mrl.utils.script import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.xdist_group("two_machines")

# The recipe (SGD, warmup + linear decay, label smoothing, BlurPool, progressive resizing from 16 px) on 20 training
# images, batch 4 (2 per machine): 5 steps an epoch, 10 in all, a checkpoint every 3. ResNet-18 with GroupNorm, whose
# statistics are per image, so the two machines compute what one process computes (up to the order of float sums).
ARGS = ["--dataset", "imagenet", "--model", "resnet18", "--norm", "group", "--image_size", "16", "--min_res", "16",
        "--max_res", "32", "--epochs", "2", "--batch_size", "4", "--num_workers", "0", "--checkpointing_steps", "3",
        "--log_every", "1"]
ACCELERATE = os.path.join(os.path.dirname(sys.executable), "accelerate")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_machines(args, out, tmp_path, resume=False):
    """Start machine 0 and machine 1, each `python -m mrl.train.supervise accelerate launch` with the multi-node config,
    as examples/slurm.sh starts each node's task. ACCELERATE_USE_CPU: the config's multi-GPU launch on CPUs (gloo);
    `--cpu` would instead start each machine as a separate single-process run."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"),
               WANDB_SILENT="true", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    (tmp_path / "wandb").mkdir(exist_ok=True)
    machines = []
    for rank in (0, 1):
        command = [sys.executable, "-m", "mrl.train.supervise", ACCELERATE, "launch", "-q",
                   "--config_file", str(ROOT / "accelerate_configs" / "multi_node.yaml"), "--mixed_precision", "no",
                   "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                   "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   str(ROOT / "train_supervised.py"), *map(str, args), "--output_dir", str(out),
                   *(["--resume_from_checkpoint", "latest"] if resume else [])]
        log = open(tmp_path / f"machine{rank}.log", "w")
        machines.append(subprocess.Popen(command, cwd=tmp_path, env=dict(env, PYTHONPATH=str(ROOT)), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True))
    return machines


def wait_all(machines, tmp_path, timeout=600):
    codes = [m.wait(timeout=timeout) for m in machines]
    logs = [(tmp_path / f"machine{r}.log").read_text() for r in (0, 1)]
    return codes, logs


@pytest.fixture(scope="module", params=["folder", "shards"])
def uninterrupted(request, tiny_imagenet, tmp_path_factory):
    """The uninterrupted two-machine run on a source: the ILSVRC folder (map-style: Accelerate's sampler splits each
    global batch) or the webdataset shards (streamed: 4 shards of 5, two per machine)."""
    tmp = tmp_path_factory.mktemp(f"two_machines_{request.param}")
    args = [*ARGS, "--dataset_path", getattr(tiny_imagenet, request.param)]
    codes, logs = wait_all(launch_two_machines(args, tmp / "out", tmp), tmp)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    return tmp, args, logs, request.param


def test_two_machines_train_every_sample_once_and_write_once(uninterrupted, tmp_path):
    tmp, args, logs, source = uninterrupted
    assert "2 process(es)" in logs[0]
    assert sum(log.count("and metrics.json") for log in logs) == 1  # one writer: the main process, on machine 0
    assert len(run_dirs(tmp / "wandb")) == 1  # one W&B run
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    # 20 images, 4 a step: 5 steps an epoch use every image (the stream's machines read 2 shards each, disjoint:
    # tests/test_imagenet_data.py checks which samples each process reads)
    assert metrics["steps"] == 10 and [row["train_resolution"] for row in metrics["history"]] == [16, 16]
    assert metrics["val"]["n"] == 8  # every validation image once, over both machines
    if source == "shards":  # one process reads the shards in another order: its batches are not comparable
        return

    # The same run in one process: the same samples in every global batch, so (GroupNorm) the same training up to
    # the order of floating-point sums. Tolerances: as tests/test_distributed.py measured for 2 processes vs 1
    # (1e-7 relative after a step, 5e-5 after 8); a machine that trained on its own share only, or read samples
    # twice, is off by orders of magnitude more.
    run_script("train_supervised.py", *args, "--output_dir", tmp_path / "one", tmp_path=tmp_path, wandb=True)
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for a, b in zip(one["history"], metrics["history"]):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    loss_two = {r["_step"]: r["train/loss"] for r in history(run_dirs(tmp / "wandb")[0]) if "train/loss" in r}
    loss_one = {r["_step"]: r["train/loss"] for r in history(run_dirs(tmp_path / "wandb")[0]) if "train/loss" in r}
    assert sorted(loss_two) == sorted(loss_one) == list(range(1, 11))
    for step in loss_one:
        assert loss_two[step] == pytest.approx(loss_one[step], rel=1e-3), step


def test_sigterm_to_one_machine_checkpoints_the_same_step_on_both_and_resumes_exactly(uninterrupted, tmp_path):
    reference, args, _, _ = uninterrupted
    args = [*args, "--report_to", "none"]  # what W&B gets from two machines is the other test's
    out = tmp_path / "out"
    machines = launch_two_machines(args, out, tmp_path)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step_00000003").is_dir():
        assert all(m.poll() is None for m in machines) and time.time() < deadline, \
            (tmp_path / "machine0.log").read_text()[-3000:] + (tmp_path / "machine1.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(machines[1].pid, signal.SIGTERM)  # machine 1's whole session, as Slurm signals one node's step
    codes, logs = wait_all(machines, tmp_path)
    for m in machines:
        assert not session_processes(m.pid), "a process outlived its machine's launcher"
    assert codes == [PREEMPTED_EXIT_CODE] * 2, "\n".join(log[-3000:] for log in logs)
    step = json.loads((out / PREEMPTED_MARKER).read_text())["step"]
    checkpoint = out / "checkpoints" / f"step_{step:08d}"
    assert 3 < step < 10 and checkpoint.is_dir() and not (out / "model.safetensors").exists()
    # both processes saved at that step: each writes its own random state into the checkpoint
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]

    codes, logs = wait_all(launch_two_machines(args, out, tmp_path, resume=True), tmp_path)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert f"resumed from {checkpoint}" in logs[0]
    original = json.loads((reference / "out" / "metrics.json").read_text())
    continued = json.loads((out / "metrics.json").read_text())
    assert continued["history"] == original["history"] and continued["steps"] == 10
    a, b = load_file(reference / "out" / "model.safetensors"), load_file(out / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
