"""Shared test helpers: run the real scripts in a subprocess, on real tiny data, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

# The suite runs on the CPU, on a GPU machine too (its processes and every script it launches inherit this): CUDA's
# kernels are not deterministic, and the tests compare runs bit for bit (resumes, 2 processes against 1).
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["ACCELERATE_USE_CPU"] = "1"  # and not Apple's MPS either

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist's workers (pytest.ini) share the cores: one thread each, for the torch code they run in-process
    # (set before torch is imported) and the scripts they launch; more would oversubscribe the cores many times over
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from filelock import FileLock
from imagenet_fixture import tiny_imagenet  # noqa: F401 (a fixture for every test: the tiny ILSVRC folder and copies)

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
    too; Accelerate needs ACCELERATE_USE_CPU (set for the whole suite above) to pick the multi-CPU backend.
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
        env.update(OMP_NUM_THREADS="1")
    result = subprocess.run([*launcher, str(ROOT / script), *args], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


@pytest.fixture
def cifar10_path():
    assert CIFAR10.is_dir(), f"the CIFAR-10 copy is expected at {CIFAR10}"
    return str(CIFAR10)


def shared_run(tmp_path_factory, name, script, *args, **kwargs):
    """Run a script once per test session and share its folder: under pytest-xdist every worker has its own session,
    so the first worker to ask runs it under a file lock and the others wait and read its output."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder the workers' own temp folders share
    tmp, saved = root / name, root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not saved.exists():
            tmp.mkdir(exist_ok=True)
            result = run_script(script, *args, "--output_dir", tmp / "out", tmp_path=tmp, **kwargs)
            saved.write_text(json.dumps({"args": result.args, "returncode": result.returncode,
                                         "stdout": result.stdout, "stderr": result.stderr}))
    return tmp, subprocess.CompletedProcess(**json.loads(saved.read_text()))


def three_steps_on_tiny_imagenet(folder, tmp_path, variants):
    """ResNet-18 (GroupNorm: no batch statistics) trained 3 steps at 16 px on 12 images of the tiny ImageNet `folder`,
    once per (name, extra flags) of `variants`: {name: (the script's result, its metrics.json)}."""
    common = ["--dataset", "imagenet", "--dataset_path", folder, "--model", "resnet18", "--norm", "group",
              "--image_size", 16, "--min_res", 16, "--max_res", 16, "--epochs", 1, "--batch_size", 4,
              "--max_train_samples", 12, "--num_workers", 0]
    runs = {}
    for name, flags in variants:
        result = run_script("train_supervised.py", *common, *flags, "--output_dir", tmp_path / name, tmp_path=tmp_path)
        runs[name] = result, json.loads((tmp_path / name / "metrics.json").read_text())
    return runs


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One supervised run shared by the tests that inspect or continue it: digits, two epochs with gradient
    accumulation 2 (22 optimizer steps per epoch), a checkpoint every 7 steps, logged to offline W&B. Tests write
    only into new subfolders of its folder."""
    return shared_run(tmp_path_factory, "trained", "train_supervised.py", *DIGITS_FAST, "--epochs", 2,
                      "--grad_accum_steps", 2, "--checkpointing_steps", 7, "--checkpoints_total_limit", 10,
                      "--log_every", 1, wandb=True)


def folder_with_unreadable_images(root, count=96, every=5):
    """An image folder of real digits in 2 classes, one file in `every` corrupt."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for name, digit in (("zero", 0), ("one", 1)):
        (root / name).mkdir(parents=True)
        for i, pixels in enumerate(digits.images[digits.target == digit][:count // 2]):
            path = root / name / f"{i}.png"
            if i % every == 2:
                path.write_bytes(b"\x89PNG truncated")
            else:
                Image.fromarray(np.uint8(pixels * 15), mode="L").resize((16, 16)).save(path)
    return root


def session_processes(sid):
    """The processes still alive in session `sid` (whatever process group they moved to)."""
    alive = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # not a process, or it just ended
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(entry))
    return alive


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """--dist loadgroup (pytest.ini) sends the tests of an xdist_group to one worker, so that its module fixtures are
    built once. pytest-xdist 3.8 names a test's group by appending "@group" to `item._nodeid`, which pytest 9 no
    longer reads (a node's id is `item._id`): the groups were lost and every worker built the fixtures again. This
    appends it where pytest 9 reads it, on the workers (where xdist sets `loadgroup`), once."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodeid import NodeId

    for item in items:
        groups = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
                         for mark in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")
