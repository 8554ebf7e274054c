#!/usr/bin/env python
"""The spread of the training outcomes the test suite asserts on, over seeds and thread counts.

A test that asserts on what training reached (an accuracy, a loss) must hold on every machine CI may run on: other
CPUs sum in other orders, so the same seed ends elsewhere. Other seeds stand in for other machines: this script runs
the suite's training runs with several seeds (and one or two threads), prints each asserted quantity's range, and
the thresholds in tests/ sit far outside it (each test's comment names the numbers).

    python benchmarks/outcome_spread.py                  # seeds 0-4, 1 thread; seed 0 with 2 threads (~25 min)
    python benchmarks/outcome_spread.py --seeds 0 1 --parts supervised

Parts:
  supervised  tests/conftest.py's `trained` run (digits at 8 px, ResNet-18, 2 epochs): min head accuracy (val, test),
              the full-dim head's test accuracy (tests/test_train_supervised.py, tests/test_pretrained.py)
  ssl         tests/test_train_ssl.py's ReLIC run: first-step loss minus ln 16, final and untrained kNN accuracy
  evaluate    tests/test_evaluate.py's 4-step supervised run, then evaluate.py: probe accuracy at d = 512
  pixels      the raw-pixel checks of tests/test_probe.py and tests/test_retrieval.py (the seed: of the split, of the
              noise added to the pixels)
  quickstart  the README's quickstart command (not part of the default): its table at d = 8 and 512 and its time,
              which the README quotes as a range (python benchmarks/outcome_spread.py --parts quickstart)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

DIGITS_FAST = ["--dataset", "digits", "--image_size", "8", "--batch_size", "32", "--grad_accum_steps", "1",
               "--lr", "2e-3", "--num_workers", "0"]
SSL = ["--dataset", "digits", "--image_size", "8", "--num_workers", "0", "--knn_every", "1", "--crop_min_scale", "0.6",
       "--jitter_strength", "0.5", "--lr", "2e-3", "--log_every", "1", "--batch_size", "16", "--max_train_samples",
       "64", "--method", "relic", "--epochs", "2"]


def run(script, args, threads, tmp):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
               WANDB_MODE="offline", WANDB_DIR=tmp, WANDB_SILENT="true")
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=tmp, env=env,
                            text=True, capture_output=True)
    if result.returncode:
        raise SystemExit(f"{script} failed:\n{result.stderr[-3000:]}")
    return result


def supervised(seed, threads, tmp):
    out = os.path.join(tmp, "out")
    run("train_supervised.py", [*DIGITS_FAST, "--epochs", 2, "--grad_accum_steps", 2, "--seed", seed, "--output_dir",
                                out, "--report_to", "none"], threads, tmp)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    return {"min val acc": min(metrics["val"]["accuracy"]), "min test acc": min(metrics["test"]["accuracy"]),
            "full-dim test acc": metrics["test"]["accuracy"][-1]}


def ssl(seed, threads, tmp):
    out = os.path.join(tmp, "out")
    run("train_ssl.py", [*SSL, "--seed", seed, "--output_dir", out, "--report_to", "wandb"], threads, tmp)
    import math

    from wandb_history import history, run_dirs

    first = min((r for r in history(run_dirs(tmp)[0]) if "train/loss" in r), key=lambda r: r["_step"])
    knn = json.load(open(os.path.join(out, "metrics.json")))["knn_accuracy"]
    untrained = json.load(open(os.path.join(out, "metrics.json")))["history"][0]["knn_accuracy"]
    return {"max |loss_d - ln 16| at step 1": max(abs(v - math.log(16)) for k, v in first.items()
                                                  if k.startswith("train/loss_d")),
            "kNN acc full dim": knn[-1], "kNN acc full - d8": knn[-1] - knn[0],
            "kNN acc full - untrained full": knn[-1] - untrained[-1]}


def evaluate(seed, threads, tmp):
    out = os.path.join(tmp, "sup")
    run("train_supervised.py", [*DIGITS_FAST, "--epochs", 1, "--max_train_samples", 256, "--batch_size", 64, "--seed",
                                seed, "--output_dir", out, "--report_to", "none"], threads, tmp)
    run("evaluate.py", ["--checkpoint", out, "--dims", "8,24,512", "--shortlist", 50, "--num_workers", 0,
                        "--batch_size", 64, "--output_dir", os.path.join(tmp, "eval"), "--report_to", "none"],
        threads, tmp)
    results = json.load(open(os.path.join(tmp, "eval", "results.json")))
    return {"probe acc d512": results["runs"][0]["per_dim"][-1]["probe"]}


def pixels(seed, threads, tmp):
    import torch

    torch.set_num_threads(threads)
    import faiss

    faiss.omp_set_num_threads(threads)
    from sklearn.datasets import load_digits

    from mrl.eval.features import pca
    from mrl.eval.probe import stratified_split, torch_probe
    from mrl.eval.retrieval import HNSWIndex, exact_search, knn_predict, nearest_neighbors, normalized_prefix

    # tests/test_probe.py's `digits` fixture: a stratified 70/30 split (seed 0 there)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    kept, held = stratified_split(y, 0.3, seed=seed)
    values = {}
    train, y_train, test, y_test = x[kept], y[kept], x[held], y[held]
    accuracy = {r.dim: r.accuracy for r in torch_probe(train, y_train, test, y_test, dims=[8, 16, 32, 64],
                                                       num_classes=10, device="cpu")}
    values.update({"probe acc d64": accuracy[64], "probe acc d8": accuracy[8],
                   "probe d64 - d16": accuracy[64] - accuracy[16], "probe d16 - d8": accuracy[16] - accuracy[8]})
    p_train, p_test = pca(train, test)
    reduced = torch_probe(p_train, y_train, p_test, y_test, dims=[8], num_classes=10, device="cpu")[0].accuracy
    values.update({"PCA probe acc d8": reduced, "PCA d8 - raw d8": reduced - accuracy[8]})
    # tests/test_retrieval.py's `digits` fixture: pixels + noise seeded 0 there; the first 1,200 rows the database
    noisy = x + 0.01 * torch.randn(len(x), 64, generator=torch.Generator().manual_seed(seed))
    train, y_train, test, y_test = noisy[:1200], y[:1200], noisy[1200:], y[1200:]
    similarity, index = nearest_neighbors(normalized_prefix(test, 40), normalized_prefix(train, 40), 20)
    values["kNN acc d40"] = (knn_predict(similarity, y_train[index], 10, 20, 0.07) == y_test).float().mean().item()
    small_db, small_q = normalized_prefix(train, 16), normalized_prefix(test, 16)
    exact, approximate = exact_search(small_q, small_db, 10), HNSWIndex(small_db).search(small_q, 10)
    values["HNSW recall@10 d16"] = sum(len(set(a.tolist()) & set(e.tolist()))
                                       for a, e in zip(approximate, exact)) / exact.numel()
    return values


def quickstart(seed, threads, tmp):
    out = os.path.join(tmp, "out")
    start = time.perf_counter()
    run("train_supervised.py", ["--dataset", "digits", "--epochs", 3, "--batch_size", 32, "--grad_accum_steps", 1,
                                "--lr", "2e-3", "--seed", seed, "--output_dir", out, "--report_to", "none"], threads, tmp)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    return {"val acc d8": metrics["val"]["accuracy"][0], "test acc d8": metrics["test"]["accuracy"][0],
            "val acc d512": metrics["val"]["accuracy"][-1], "test acc d512": metrics["test"]["accuracy"][-1],
            "seconds": time.perf_counter() - start}


PARTS = {"supervised": supervised, "ssl": ssl, "evaluate": evaluate, "pixels": pixels, "quickstart": quickstart}
DEFAULT_PARTS = ["supervised", "ssl", "evaluate", "pixels"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=DEFAULT_PARTS, choices=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--two_thread_seeds", type=int, nargs="*", default=[0],
                        help="seeds also run with 2 threads (another summation order on the same CPU)")
    args = parser.parse_args()
    for part in args.parts:
        runs = [(s, 1) for s in args.seeds] + [(s, 2) for s in args.two_thread_seeds]
        rows = []
        for seed, threads in runs:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                values = PARTS[part](seed, threads, tmp)
            rows.append(values)
            print(f"{part} seed {seed} threads {threads} ({time.perf_counter() - start:.0f} s): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in values.items()), flush=True)
        print(f"== {part}: range over {len(rows)} runs")
        for key in rows[0]:
            column = [r[key] for r in rows]
            print(f"   {key:<32} min {min(column):.4f}  max {max(column):.4f}  spread {max(column) - min(column):.4f}")


if __name__ == "__main__":
    main()
