#!/usr/bin/env python
"""Linear-probe sweep over nested dims: our default probe (mrl/eval/probe.py, torch) vs the seed's scikit-learn protocol.

The workload of reference.md section E: 7 dims (8..512) of 512-dim features, 50k train / 10k test, 10 classes.
The features are a fixed random projection of CIFAR-10's pixels (3072 -> 512, seed 0): real data, no trained model
needed, and hard enough that lbfgs does not converge in 100 iterations at the large dims. Both probes run in the same
process on the same features; the table shows each dim's accuracy and time and the last lines the speed ratio.
Target: >= 10x faster at <= 0.5 point accuracy difference.

  python benchmarks/bench_probe.py                 # the full sweep: the seed's side alone takes ~100 s on an idle
                                                   # 2-core machine (several times longer on a busy one)
  python benchmarks/bench_probe.py --threads 1     # both sides on one thread: least disturbed by other load
  python benchmarks/bench_probe.py --quick         # 10k train / 2k test, dims 8..128
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mrl.eval.probe import L2_GRID, sklearn_probe, torch_probe

DEFAULT_CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10")


def get_args_parser():
    parser = argparse.ArgumentParser("bench_probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=DEFAULT_CIFAR,
                        help="a local CIFAR-10 copy that datasets.load_dataset reads (columns img, label)")
    parser.add_argument("--dim", type=int, default=512, help="width of the random projection (the full embedding dim)")
    parser.add_argument("--train_samples", type=int, default=50000, help="train features (the first N of train)")
    parser.add_argument("--test_samples", type=int, default=10000, help="test features (the first N of test)")
    parser.add_argument("--quick", action="store_true",
                        help="a small setting for a smoke test: 10k train, 2k test, dims 8..128")
    parser.add_argument("--skip_sklearn", action="store_true", help="time only our probe")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for both sides (torch and scikit-learn's BLAS/OpenMP pools; default: all). "
                             "1 is the comparison least disturbed by other load on the machine")
    return parser


def random_projection_features(path, dim, train_samples, test_samples, seed=0):
    """CIFAR-10 pixels in [0, 1], flattened and multiplied by a fixed Gaussian matrix (3072 x dim)."""
    import datasets

    ds = datasets.load_dataset(path)
    projection = torch.randn(3072, dim, generator=torch.Generator().manual_seed(seed)) / 3072 ** 0.5
    out = []
    for split, n in (("train", train_samples), ("test", test_samples)):
        rows = ds[split].select(range(min(n, len(ds[split])))).with_format("numpy")[:]
        pixels = torch.from_numpy(np.asarray(rows["img"], dtype=np.float32).reshape(len(rows["label"]), -1) / 255)
        out += [pixels @ projection, torch.as_tensor(np.asarray(rows["label"]), dtype=torch.long)]
    return out


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(args):
    if args.quick:
        args.train_samples, args.test_samples, args.dim = 10000, 2000, 128
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = [d for d in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) if d <= args.dim]
    start = time.perf_counter()
    train_x, train_y, test_x, test_y = random_projection_features(args.dataset_path, args.dim, args.train_samples,
                                                                  args.test_samples)
    print(f"features: {len(train_x)} train / {len(test_x)} test x {args.dim} (random projection of CIFAR-10 pixels), "
          f"10 classes, built in {time.perf_counter() - start:.1f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"ours: torch L-BFGS, standardized, L2 grid {list(L2_GRID)} picked on a 10% stratified split of train, "
          "then refitted on all of train; warm-started across dims")
    print("seed: StandardScaler + CalibratedClassifierCV(LogisticRegression(max_iter=100)), fitted on all of train")

    ours, ours_wall, ours_cpu = timed(lambda: torch_probe(train_x, train_y, test_x, test_y, dims, 10, device="cpu"))
    if args.skip_sklearn:
        seed, seed_wall, seed_cpu = [None] * len(dims), float("nan"), float("nan")
    else:
        with threadpool_limits(args.threads):
            seed, seed_wall, seed_cpu = timed(lambda: sklearn_probe(train_x, train_y, test_x, test_y, dims))

    print(f"\n{'dim':>5} {'ours acc':>9} {'seed acc':>9} {'diff (pt)':>10} {'ours s':>8} {'seed s':>8} "
          f"{'l2':>7} {'iters':>6}")
    worst = 0.0
    for o, s in zip(ours, seed):
        diff = 100 * (o.accuracy - s.accuracy) if s else float("nan")
        worst = min(worst, diff) if s else worst
        print(f"{o.dim:>5} {o.accuracy:>9.4f} {s.accuracy if s else float('nan'):>9.4f} {diff:>+10.2f} "
              f"{o.seconds:>8.2f} {s.seconds if s else float('nan'):>8.2f} {o.l2:>7.0e} {o.iterations:>6}")
    print(f"\nsweep time, wall clock: ours {ours_wall:.2f} s, seed {seed_wall:.2f} s -> "
          f"{seed_wall / ours_wall:.1f}x faster")
    print(f"sweep time, CPU (this process): ours {ours_cpu:.2f} s, seed {seed_cpu:.2f} s -> "
          f"{seed_cpu / ours_cpu:.1f}x less")
    mean = np.mean([100 * (o.accuracy - s.accuracy) for o, s in zip(ours, seed)]) if seed[0] else float("nan")
    worst = worst if seed[0] else float("nan")
    print(f"accuracy: ours - seed, worst dim {worst:+.2f} pt, mean {mean:+.2f} pt "
          "(target: >= 10x faster, no dim more than 0.5 pt below)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes slow both sides, OpenMP pools most)")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
