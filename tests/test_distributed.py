"""Two processes on the CPU (gloo): metrics gathered from both without duplicates, files written once."""

import json
import re

import numpy as np
import torch

from conftest import DIGITS_FAST, run_script
from mrl.checkpoint import load_model
from mrl.data import Collate, attach_transforms, load_splits
from wandb_history import history, run_dirs


def test_supervised_two_processes_gather_every_sample_once_and_match_one_process(trained, trained_two_processes):
    tmp_path, result = trained_two_processes
    assert "2 process(es)" in result.stdout and result.stdout.count("and metrics.json") == 1
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["val"]["n"] == 179 and metrics["test"]["n"] == 179
    assert len(run_dirs(tmp_path / "wandb")) == 1  # only the main process logs
    rows = history(run_dirs(tmp_path / "wandb")[0])
    assert [r["_step"] for r in rows if "val/accuracy_d8" in r] == [23, 46]

    # The accuracy the two processes reported is exactly that of the saved model evaluated in one process.
    backbone, heads, config = load_model(tmp_path / "out")
    data = config["data"]
    splits = load_splits("digits", seed=data["seed"], max_eval_samples=179)
    attach_transforms(splits, data["augment"], data["image_size"], data["mean"], data["std"], seed=0)
    batch = Collate(keep_shape=True)([splits.test[i] for i in range(len(splits.test))])
    with torch.no_grad():
        accuracy = (heads(backbone(batch["pixel_values"])).argmax(-1) == batch["labels"]).float().mean(1)
    np.testing.assert_allclose(accuracy.numpy(), metrics["test"]["accuracy"], atol=1e-6)

    # Same global batch on one process: the same training up to per-process BatchNorm statistics (each process
    # normalizes over its half of the batch), so the accuracies agree within a few points, not exactly.
    single = json.loads((trained[0] / "out" / "metrics.json").read_text())
    difference = np.abs(np.array(single["val"]["accuracy"]) - np.array(metrics["val"]["accuracy"]))
    assert difference.mean() < 0.06 and difference.max() < 0.12, difference


def test_batch_that_cannot_be_split_over_processes_is_one_clear_line(tmp_path):
    result = run_script("train_supervised.py", *DIGITS_FAST, "--batch_size", 33, "--output_dir", tmp_path / "out",
                        tmp_path=tmp_path, processes=2, check=False)
    assert result.returncode != 0
    assert "error: --batch_size 33 cannot be split evenly over 2 processes" in result.stderr
    assert not re.search(r"Traceback.*\n.*train_supervised", result.stderr)
