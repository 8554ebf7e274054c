"""Shared test helpers: run the real scripts in a subprocess, on real tiny data, offline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real CIFAR-10 in the Hub's parquet layout (read-only), beside the checkout: ../shared/data/cifar10, or where
# MRL_CIFAR10 points.
CIFAR10 = Path(os.environ.get("MRL_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10"))

# A fast supervised run on scikit-learn's embedded digits: ResNet-18 with the CIFAR stem at 8x8 px.
DIGITS_FAST = ["--dataset", "digits", "--image_size", "8", "--batch_size", "32", "--grad_accum_steps", "1",
               "--lr", "2e-3", "--num_workers", "0"]


def run_script(script, *args, tmp_path, wandb=False, check=True, timeout=600, env=None, processes=1):
    """Run a top-level script as a user would; W&B offline into tmp_path/wandb when asked, otherwise off.

    `processes` > 1 runs it distributed on the CPU (gloo) with torchrun, which `accelerate launch` uses on GPUs
    too; Accelerate needs ACCELERATE_USE_CPU to pick the multi-CPU backend.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", **(env or {}))
    env.pop("WANDB_MODE", None)
    if wandb:
        env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"), WANDB_SILENT="true")
        os.makedirs(env["WANDB_DIR"], exist_ok=True)
    args = [str(a) for a in args] + ([] if wandb or "--report_to" in args else ["--report_to", "none"])
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    result = subprocess.run([*launcher, str(ROOT / script), *args], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture
def cifar10_path():
    assert CIFAR10.is_dir(), f"the CIFAR-10 copy is expected at {CIFAR10}"
    return str(CIFAR10)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One supervised run shared by the tests that inspect or continue it: digits, two epochs with gradient
    accumulation 2 (23 optimizer steps per epoch), a checkpoint every 7 steps, logged to offline W&B."""
    tmp = tmp_path_factory.mktemp("run")
    result = run_script("train_supervised.py", *DIGITS_FAST, "--epochs", 2, "--grad_accum_steps", 2,
                        "--checkpointing_steps", 7, "--checkpoints_total_limit", 10, "--log_every", 1,
                        "--output_dir", tmp / "out", tmp_path=tmp, wandb=True)
    return tmp, result
