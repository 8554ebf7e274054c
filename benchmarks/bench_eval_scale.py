#!/usr/bin/env python
"""evaluate.py's feature-side work at ImageNet scale: time and peak memory against the train split's size.

ImageNet-1k's train split is 1,281,167 x 2,048 features (10.5 GB in float32). This runs the pieces of evaluate.py
that grow with it on synthetic features of that width (1,000 classes, each a Gaussian blob around its own mean, so
that kNN and the probe have something to find), at several train sizes, each size in a process of its own:

  write     the features streamed into the float16 cache file (mrl.eval.features.FeatureWriter), then read back
            memory-mapped (read_cache), as load_or_extract does
  knn       neighbor_metrics: kNN top-1 and mAP@10 / P@10 at every dim, the database streamed in chunks
  pca       the PCA baseline: fitted on --pca_fit_samples rows, every set projected in chunks
  probe     torch_probe on a stratified subset of --probe_max_train_samples rows (a cost that does not grow with n)
  adaptive  adaptive_retrieval (exact search), which holds the database at the full dim in float32: the one step
            that keeps a float32 copy of the whole train split (it times searches over a resident index)

For each step the peak resident memory (VmHWM, reset between steps through /proc/self/clear_refs; it counts the
memory-mapped cache pages a step touched) is printed next to the float32 size of the train features, and the last
lines fit time = a + b * n and memory = c + e * n over the sizes and extrapolate them to ImageNet's n. kNN and
adaptive retrieval also grow with the number of queries: they are extrapolated to ImageNet's 50,000 validation
images linearly. Nothing here passes or fails.

  python benchmarks/bench_eval_scale.py                      # 100k, 200k, 400k train x 2048, 200 queries
  python benchmarks/bench_eval_scale.py --sizes 10000,20000  # a smoke test
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mrl.eval.features import FeatureWriter, pca, read_cache
from mrl.eval.probe import torch_probe
from mrl.eval.retrieval import adaptive_retrieval, neighbor_metrics
from mrl.matryoshka import default_dims

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000


def get_args_parser():
    parser = argparse.ArgumentParser("bench_eval_scale.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,200000,400000",
                        help="train sizes, comma-separated; at least 65,536 (the database chunk) for the memory fit: "
                             "below it a chunk is the whole split, and the transient buffers grow with n")
    parser.add_argument("--queries", type=int, default=200, help="evaluation features (the kNN / retrieval queries)")
    parser.add_argument("--dim", type=int, default=2048, help="embedding width (ResNet-50's 2,048)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--pca_fit_samples", type=int, default=20000,
                        help="rows the PCA is fitted on (evaluate.py's default is 100,000: a cost that does not grow "
                             "with n, kept small here to fit the run in a few minutes)")
    parser.add_argument("--probe_max_train_samples", type=int, default=5000,
                        help="the probe's stratified subset (evaluate.py's default: 100,000)")
    parser.add_argument("--probe_dims", default="8,64", help="the probe's dims (a few: it does not grow with n)")
    parser.add_argument("--steps", default="write,knn,pca,adaptive",
                        help="which steps to run (write always runs); probe: its cost does not grow with n, so it is "
                             "left out of the scaling fit by default")
    parser.add_argument("--work_dir", default=None, help="where the cache files go (default: a temporary folder)")
    parser.add_argument("--one_size", type=int, default=None, help=argparse.SUPPRESS)  # the per-size process
    return parser


def peak_rss_reset():
    """Reset the peak-RSS counter (Linux), so that the next read gives the peak of the step that follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss():
    """Peak resident memory in bytes since the last reset (VmHWM), or since the start (getrusage)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic(writer, n, dim, classes, generator, chunk=1 << 15):
    """Class-blob features streamed into `writer` chunk by chunk: never whole in memory. Non-negative, as after a
    ResNet's final ReLU and average pool."""
    means = torch.rand(classes, dim, generator=generator) * 2
    for start in range(0, n, chunk):
        y = torch.randint(0, classes, (min(chunk, n - start),), generator=generator)
        writer.append((means[y] + torch.randn(len(y), dim, generator=generator)).relu(), y)


def one_size(args, n):
    """Every step at train size n, in this process; prints one JSON line per step."""
    g = torch.Generator().manual_seed(0)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_eval_scale_")
    steps = args.steps.split(",")
    dims = default_dims(args.dim)

    def measure(name, fn):
        peak_rss_reset()
        start = time.perf_counter()
        out = fn()
        print(json.dumps({"n": n, "step": name, "seconds": time.perf_counter() - start, "peak_rss": peak_rss()}),
              flush=True)
        return out

    def write():
        train, queries = FeatureWriter(os.path.join(work, f"train-{n}"), n, args.dim), \
            FeatureWriter(os.path.join(work, f"eval-{n}"), args.queries, args.dim)
        synthetic(train, n, args.dim, args.classes, g)
        synthetic(queries, args.queries, args.dim, args.classes, torch.Generator().manual_seed(0))
        train.finish(), queries.finish()
        return read_cache(os.path.join(work, f"train-{n}")), read_cache(os.path.join(work, f"eval-{n}"))

    (train_x, train_y), (eval_x, eval_y) = measure("write", write)
    try:
        if "knn" in steps:
            measure("knn", lambda: neighbor_metrics(train_x, train_y, eval_x, eval_y, dims, args.classes,
                                                    retrieval_ks=(10,), device="cpu"))
        if "pca" in steps:
            measure("pca", lambda: pca(train_x, eval_x, fit_samples=args.pca_fit_samples))
        if "probe" in steps:
            probe_dims = [int(d) for d in args.probe_dims.split(",")]
            measure("probe", lambda: torch_probe(train_x, train_y, eval_x, eval_y, probe_dims, args.classes,
                                                 max_iter=20, device="cpu",
                                                 max_train_samples=args.probe_max_train_samples))
        if "adaptive" in steps:
            measure("adaptive", lambda: adaptive_retrieval(train_x, train_y, eval_x, eval_y, [16, 128], args.dim,
                                                           repeats=1, device="cpu"))
    finally:
        if args.work_dir is None:
            for name in os.listdir(work):
                os.remove(os.path.join(work, name))
            os.rmdir(work)


def fit_line(xs, ys):
    """Least-squares (intercept, slope) of ys against xs."""
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], 1)
    intercept, slope = torch.linalg.lstsq(design, y[:, None]).solution[:, 0].tolist()
    return intercept, slope


def main(args):
    if args.one_size:
        return one_size(args, args.one_size)
    sizes = [int(s) for s in args.sizes.split(",")]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"{time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}; {args.dim} dims, {args.classes} "
          f"classes, {args.queries} queries, dims {default_dims(args.dim)}")
    rows = []
    for n in sizes:
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--one_size", str(n)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    steps = list(dict.fromkeys(r["step"] for r in rows))
    print(f"\n| train n | float32 size | {' | '.join(f'{s} s | {s} peak RSS' for s in steps)} |")
    print("|---:|---:|" + "---:|---:|" * len(steps))
    for n in sizes:
        cells = {r["step"]: r for r in rows if r["n"] == n}
        float32 = n * args.dim * 4
        print(f"| {n:,} | {float32 / 1e9:.2f} GB | " + " | ".join(
            f"{cells[s]['seconds']:.1f} | {cells[s]['peak_rss'] / 1e9:.2f} GB ({cells[s]['peak_rss'] / float32:.2f}x)"
            for s in steps) + " |")
    print(f"\nextrapolated to ImageNet-1k: {IMAGENET_TRAIN:,} train x {args.dim} (float32 "
          f"{IMAGENET_TRAIN * args.dim * 4 / 1e9:.1f} GB), {IMAGENET_VAL:,} queries")
    query_scale = IMAGENET_VAL / args.queries
    for s in steps:
        ns = [r["n"] for r in rows if r["step"] == s]
        if len(ns) < 2 or s == "probe":  # the probe fits a subset of a fixed size: no line in n to extrapolate
            print(f"  {s:9s} not extrapolated ({'a fixed-size subset' if s == 'probe' else 'one size'})")
            continue
        a, b = fit_line(ns, [r["seconds"] for r in rows if r["step"] == s])
        c, e = fit_line(ns, [r["peak_rss"] for r in rows if r["step"] == s])
        seconds = a + b * IMAGENET_TRAIN
        scaled = f", x{query_scale:.0f} for the queries: {seconds * query_scale / 3600:.1f} h" \
            if s in ("knn", "adaptive") else ""
        memory = c + e * IMAGENET_TRAIN
        print(f"  {s:9s} time {a:.2f} + {b * 1e6:.2f} us x n -> {seconds:.0f} s{scaled}; peak RSS "
              f"{c / 1e9:.2f} GB + {e:.0f} B x n -> {memory / 1e9:.1f} GB "
              f"({memory / (IMAGENET_TRAIN * args.dim * 4):.2f}x float32)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
