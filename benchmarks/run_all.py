#!/usr/bin/env python
"""Run every CPU benchmark and print one table of their ratios.

    python benchmarks/run_all.py --quick     # a few minutes on 2 CPU cores
    python benchmarks/run_all.py             # the full settings (the probe sweep alone takes ~2 minutes)

Each benchmark is its own script (run it alone for details and options); this one runs them one after another,
shows their output, and collects the lines that state a ratio or a difference against the reference.
"""

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHMARKS = [  # (script, what it compares, --quick arguments)
    ("bench_supervised_step.py", "train_supervised.py step vs a plain PyTorch loop (cnn4, 8 heads)",
     ["--image_size", "128", "--batch_size", "4", "--steps", "4"]),
    ("bench_ssl_step.py", "train_ssl.py ReLIC+MRL step vs mrl-pytorch 0.1.1 (ResNet-18)",
     ["--batch_size", "32", "--steps", "2", "--warmup", "1", "--rounds", "1", "--sides", "seed,ours"]),
    ("bench_probe.py", "evaluate.py probe sweep vs the seed's sklearn protocol", ["--quick"]),
    ("bench_augment.py", "two-view augmentation: batched (GPU path) vs PIL in workers", ["--quick"]),
    ("bench_loader.py", "train_ssl.py data path per epoch: --data_on_device vs DataLoader workers",
     ["--max_samples", "1024", "--workers", "2", "--epochs", "1"]),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small settings: minutes, not tens of minutes")
    args = parser.parse_args()
    summary = []
    for script, what, quick in BENCHMARKS:
        print(f"\n=== {script}: {what}", flush=True)
        start = time.perf_counter()
        result = subprocess.run([sys.executable, os.path.join(HERE, script), *(quick if args.quick else [])],
                                text=True, capture_output=True)
        print(result.stdout.rstrip())
        ratios = [line.strip() for line in result.stdout.splitlines() if re.search(r"ratio|x faster|ours - seed", line)]
        if result.returncode != 0:
            print(result.stderr[-2000:])
            ratios = [f"FAILED (exit {result.returncode})"]
        summary.append((script, what, ratios, time.perf_counter() - start))
    print("\n=== summary" + (" (--quick)" if args.quick else ""))
    for script, what, ratios, seconds in summary:
        print(f"{script} ({seconds:.0f} s): {what}")
        for line in ratios:
            print(f"    {line}")


if __name__ == "__main__":
    main()
