"""The W&B run pages, read back from the offline run files: what a training run's and an evaluation's page hold
(names, config, summary, native charts, artifacts), and that a SIGKILLed run's resumed page still has every epoch's
validation row exactly once."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState
from conftest import DIGITS_FAST, ROOT, run_script
from wandb_history import artifacts, config, history, records, run_dirs, run_record, summary

import evaluate

DIMS = [8, 16, 32, 64, 128, 256, 512]
STAMP = r"\d{4}-\d{6}"  # the start time in default run names, MMDD-HHMMSS


def media_table(run_dir, row, key):
    """The table a history row logged under `key`, as {column: [values]}."""
    table = json.loads((Path(run_dir) / "files" / row[f"{key}/path"]).read_text())
    return {c: [r[i] for r in table["data"]] for i, c in enumerate(table["columns"])}


def chart_lines(run_dir, rows, key):
    """A native line chart's series, {name: [(x, y)]}, and its panel config."""
    (row,) = [r for r in rows if f"{key}_table/path" in r]
    table = media_table(run_dir, row, f"{key}_table")
    lines = {}
    for name, x, y in zip(table["lineKey"], table["step"], table["lineVal"]):
        lines.setdefault(name, []).append((x, y))
    return lines, config(run_dir)["_wandb"]["visualize"][key]


def test_training_page_names_configures_summarizes_and_charts_the_run(trained):
    tmp, result = trained
    (run_dir,) = run_dirs(tmp / "wandb")
    run = run_record(run_dir)
    assert re.fullmatch(f"out-{STAMP}", run.display_name) and run.job_type == "train"
    saved = json.loads((tmp / "out" / "config.json").read_text())["wandb"]
    assert saved["run_id"] == run.run_id and saved["run_name"] == run.display_name

    # config: the flags and what the code derived from them
    cfg = config(run_dir)
    assert cfg["dims"] == DIMS and cfg["embed_dim"] == 512 and cfg["num_classes"] == 10
    sizes = re.search(r"digits: (\d+) train / (\d+) val / (\d+) test images", result.stdout).groups()
    assert [cfg["split_sizes"][name] for name in ("train", "val", "test")] == [int(n) for n in sizes]
    assert cfg["steps_per_epoch"] == 22 and cfg["processes"] == 1 and cfg["mixed_precision"] == "no"
    assert f"{cfg['parameters']:,} parameters" in result.stdout and cfg["accuracy_at_chance"] == 0.1

    # history: the objective, its mean over dims, the gradient norm and throughput at every logged step
    rows = history(run_dir)
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 44
    for r in train:
        losses = [r[f"train/loss_d{d}"] for d in DIMS]
        assert r["train/loss"] == pytest.approx(sum(losses), rel=1e-5)  # uniform weights: the sum over 7 heads
        assert r["train/loss_mean_over_dims"] == pytest.approx(sum(losses) / 7, rel=1e-5)
        assert r["train/grad_norm"] > 0 and 0 <= r["perf/data_wait_fraction"] < 1
        # 2 whole batches of 32 per step (accumulation 2)
        assert r["perf/images_per_second"] * r["perf/seconds_per_step"] == pytest.approx(64)

    # summary: the final test accuracy, and each dim's best and last validation accuracy
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    page = summary(run_dir)
    for i, d in enumerate(DIMS):
        assert page[f"test/accuracy_d{d}"] == pytest.approx(metrics["test"]["accuracy"][i])
        epochs = [h["val_accuracy"][i] for h in metrics["history"]]
        assert page[f"val/accuracy_d{d}"] == {"max": pytest.approx(max(epochs)), "last": pytest.approx(epochs[-1])}

    # one native chart: val and test accuracy against log2(dim)
    lines, panel = chart_lines(run_dir, rows, "charts/accuracy_vs_dim")
    assert panel["panel_config"]["panelDefId"] == "wandb/lineseries/v0"
    expected = {f"{split}_accuracy": [(math.log2(d), pytest.approx(a))
                                      for d, a in zip(DIMS, metrics[split]["accuracy"])] for split in ("val", "test")}
    assert lines == expected

    # the model as an artifact: a reference to the run folder's files
    (model,) = [a for a in artifacts(run_dir) if a.type == "model"]
    assert model.name == f"model-{run.run_id}"
    assert {e.path: e.ref for e in model.manifest.contents} == {
        name: f"file://{tmp / 'out' / name}" for name in ("model.safetensors", "config.json")}
    assert json.loads((tmp / "out" / "wandb_flushed.json").read_text()) == {"run_id": run.run_id, "step": 44}


def test_evaluation_page_compares_runs_on_one_chart_per_metric(trained, tmp_path, monkeypatch):
    """Two checkpoints of the trained run in one evaluation: every metric is one chart with a line per run, its PCA
    baseline and its heads; tables, summary numbers under one naming scheme, resolved config, and the training
    run named as the input."""
    tmp, _ = trained
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    argv = ["--checkpoint", tmp / "out", tmp / "out" / "checkpoints" / "step_00000028", "--labels", "final",
            "step28", "--dims", "8", "16", "64", "--max_train_samples", 400, "--max_eval_samples", 100,
            "--num_workers", 0, "--feature_cache", "none", "--output_dir",
            tmp_path / "eval", "--report_to", "wandb", "--wandb_tags", "digits", "--wandb_group", "cmp"]
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        evaluate.main(evaluate.get_args_parser().parse_args([str(a) for a in argv]))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    import wandb

    wandb.teardown()  # W&B has written the run file when this returns
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    (run_dir,) = run_dirs(tmp_path)
    run = run_record(run_dir)
    assert re.fullmatch(f"eval_final-{STAMP}", run.display_name) and run.job_type == "eval"
    assert run.run_group == "cmp" and list(run.tags) == ["digits"]

    cfg = config(run_dir)  # the values used, not the flags' None
    assert cfg["dims"] == {"final": [8, 16, 64], "step28": [8, 16, 64]}
    assert cfg["image_size"] == {"final": 8, "step28": 8}
    assert cfg["val_fraction"] == 0.1 and cfg["test_fraction"] == 0.1 and cfg["eval_split"] == "test"
    trained_id = run_record(run_dirs(tmp / "wandb")[0]).run_id
    assert [(t["label"], t["run_id"], t["model_artifact"]) for t in cfg["trained_runs"]] == [
        ("final", trained_id, f"model-{trained_id}"), ("step28", trained_id, f"model-{trained_id}")]
    assert set(cfg["protocols"]) >= {"probe", "knn", "retrieval", "pca", "adaptive_classification"}

    rows = history(run_dir)
    by_label = {r["label"]: r for r in results["runs"]}
    for metric, pca in (("probe", "pca_probe"), ("knn", "pca_knn"), ("map@10", "pca_map@10")):
        key = "charts/" + metric.replace("@", "_at_") + "_vs_dim"
        lines, _ = chart_lines(run_dir, rows, key)
        expected = {}
        for label, r in by_label.items():
            expected[label] = [(math.log2(p["dim"]), pytest.approx(p[metric])) for p in r["per_dim"]]
            expected[f"{label} PCA"] = [(math.log2(p["dim"]), pytest.approx(p[pca])) for p in r["per_dim"]]
            if metric == "probe":
                expected[f"{label} heads"] = [(math.log2(p["dim"]), pytest.approx(p["head"])) for p in r["per_dim"]]
        assert lines == expected, key

    (row,) = [r for r in rows if "per_dim/path" in r]
    table = media_table(run_dir, row, "per_dim")
    assert table["run"] == ["final"] * 3 + ["step28"] * 3 and table["log2_dim"] == [3, 4, 6] * 2
    assert table["map_at_10"] == pytest.approx([p["map@10"] for r in results["runs"] for p in r["per_dim"]])
    retrieval = media_table(run_dir, row, "adaptive_retrieval")
    assert len(retrieval["run"]) == sum(len(r["adaptive_retrieval"]) for r in results["runs"])

    page = summary(run_dir)
    for label, r in by_label.items():
        for p in r["per_dim"]:
            for key in ("probe", "knn", "map@10", "precision@10", "pca_probe", "pca_knn", "pca_map@10", "head"):
                assert page[f"{label}/{key.replace('@', '_at_')}_d{p['dim']}"] == pytest.approx(p[key])
        # adaptive classification: the cheapest cascade point within 0.01 of the largest dim's accuracy
        points = r["adaptive_classification"]["heads"]
        full = points[-1]["accuracy"]
        chosen = page[f"{label}/adaptive_heads_expected_dim"]
        assert page[f"{label}/adaptive_heads_accuracy"] >= full - 0.01
        assert all(p["expected_dim"] >= chosen for p in points if p["accuracy"] >= full - 0.01)
        speedups = [pytest.approx(x["speedup"]) for x in r["adaptive_retrieval"]]
        assert page[f"{label}/adaptive_retrieval_speedup"] in speedups
    assert all(re.fullmatch(r"[\w./-]+", key) for key in page), [k for k in page if not re.fullmatch(r"[\w./-]+", k)]

    files = Path(run_dir) / "files"
    assert (files / "results.md").read_text() == (tmp_path / "eval" / "results.md").read_text()
    assert "final: features ready" in (files / "output.log").read_text()  # the console, from the start


# Three epochs of 2 optimizer steps (64 images, batch 32), a checkpoint at every epoch's end
SHORT = [*DIGITS_FAST, "--epochs", 3, "--max_train_samples", 64, "--max_eval_samples", 32, "--log_every", 1]


def start(tmp_path, out, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"),
               WANDB_SILENT="true")
    return subprocess.Popen([sys.executable, str(ROOT / "train_supervised.py"), *map(str, SHORT), "--output_dir",
                             str(out), *extra], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def signal_at_checkpoint(process, checkpoint, signum):
    deadline = time.time() + 600
    while not checkpoint.is_dir():
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.01)
    process.send_signal(signum)
    return process.communicate(timeout=300)


def test_killed_then_preempted_run_ends_with_every_validation_row_once(tmp_path):
    """SIGKILL right after epoch 1's checkpoint (W&B had not written its validation row), resume; SIGTERM after
    epoch 2's (a clean preemption), resume to the end: the page -- the three segments' files -- has the validation
    row of every epoch exactly once, the lost one logged again by the first resume and the preempted one not."""
    (tmp_path / "wandb").mkdir()
    out = tmp_path / "out"
    killed = start(tmp_path, out)
    signal_at_checkpoint(killed, out / "checkpoints" / "step_00000002", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    preempted = start(tmp_path, out, "--resume_from_checkpoint", "latest")
    stdout, stderr = signal_at_checkpoint(preempted, out / "checkpoints" / "step_00000004", signal.SIGTERM)
    assert preempted.returncode == 75, stderr[-3000:]
    assert "logged again the evaluation rows of steps [2]" in stdout
    result = run_script("train_supervised.py", *SHORT, "--output_dir", out, "--resume_from_checkpoint", "latest",
                        tmp_path=tmp_path, wandb=True)
    assert "logged again" not in result.stdout  # the preempted segment finished its page

    segments = run_dirs(tmp_path / "wandb")
    # one run id (the killed segment's file may hold no record at all: W&B had written nothing yet)
    assert len(segments) == 3 and len({d.split("-")[-1] for d in segments}) == 1
    val = [[r for r in history(d) if "val/accuracy_d8" in r] for d in segments]
    assert [[r["_step"] for r in rows] for rows in val] == [[], [2, 4], [6]]
    metrics = json.loads((out / "metrics.json").read_text())
    for row, epoch in zip(val[1] + val[2], metrics["history"]):  # the values the checkpoints hold
        assert [row[f"val/accuracy_d{d}"] for d in DIMS] == pytest.approx(epoch["val_accuracy"])
        assert row["epoch"] == epoch["epoch"]
    (path,) = Path(segments[1]).glob("run-*.wandb")
    assert any(r.WhichOneof("record_type") == "preempting" for r in records(path))
