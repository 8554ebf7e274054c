#!/usr/bin/env python
"""ReLIC + MRL training step: ours (mrl.train.loop.training_step under Accelerate) vs mrl-pytorch 0.1.1's own code.

Both sides train ResNet-18 with the CIFAR stem, projector 512 -> 512 -> 64, nested dims 8..512, Adam lr 3e-4
wd 1e-5, an EMA target updated every step, on the same random batch of two views (the data pipeline is not timed:
this is the step alone), at the same batch size and precision. Both move the target on the seed's gamma schedule,
over the length its train.py computes for its default run at this batch size (100 epochs of CIFAR-10's 50,000
images; a timed round uses only its first steps). mrl-pytorch's import package is also called `mrl`, so each side
runs in its own subprocess: the seed's as benchmarks/mrl_pytorch.py runs it (its wheel first on sys.path, its
train.py's loop body around the wheel's ReLIC, relic_loss and ResNet-18), ours with this repository.

mrl-pytorch's ReLIC puts the encoder in eval mode when it measures the feature size and nothing puts it back, so as
shipped it trains with frozen BatchNorm statistics (a bug; see the README). `seed` runs it in train mode, the same
work as ours; `seed-as-shipped` keeps the eval-mode bug, for reference. The rounds alternate the sides so that drift
in machine load hits both alike; the table shows the median of the rounds.

  python benchmarks/bench_ssl_step.py                                  # CPU: batch 64, 32x32, fp32
  python benchmarks/bench_ssl_step.py --device cuda --batch_size 256 --precision fp16 --steps 50
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import mrl_pytorch  # benchmarks/, beside this script; imports neither our mrl nor the seed's

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_TRAIN = 50_000  # training images


def get_args_parser():
    parser = argparse.ArgumentParser("bench_ssl_step.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64, help="images per step (each seen as two views)")
    parser.add_argument("--image_size", type=int, default=32, help="square input side in px")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, kernel selection)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per side (median reported)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="no", choices=("no", "fp16", "bf16"),
                        help="mixed precision; mrl-pytorch supports fp16 only (its --fp16_precision)")
    parser.add_argument("--memory_format", default="channels_last", choices=("channels_last", "contiguous"),
                        help="ours: train_ssl.py's --memory_format (its default: channels_last)")
    parser.add_argument("--sides", default="seed,ours,ours-contiguous",
                        help="comma-separated: seed, seed-as-shipped (its BatchNorm eval-mode bug), ours, "
                             "ours-contiguous (--memory_format contiguous, as the seed), ours-nest-projector")
    parser.add_argument("--seed_wheel_dir", default=os.path.join(tempfile.gettempdir(), "mrl_pytorch_0.1.1"),
                        help="where the seed's wheel is downloaded and unzipped")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one side and print JSON
    return parser


def gamma_steps(args):
    """The length of the seed's gamma schedule (mrl_pytorch.gamma_steps) in its default run at this batch size."""
    return mrl_pytorch.gamma_steps(CIFAR10_TRAIN // args.batch_size, mrl_pytorch.EPOCHS)


def batches(args, torch, device):
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    return torch.rand(shape, generator=g).to(device), torch.rand(shape, generator=g).to(device)


def time_steps(args, torch, step, device):
    x1, x2 = batches(args, torch, device)
    for k in range(args.warmup):
        step(x1, x2, k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for k in range(args.warmup, args.warmup + args.steps):
        step(x1, x2, k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


def run_seed(args, as_shipped):
    """mrl-pytorch 0.1.1: the loop body of its train.py around the wheel's ReLIC (nesting on the projector)."""
    if args.precision == "bf16":
        raise SystemExit("mrl-pytorch has no bf16 mode")
    import torch

    package = mrl_pytorch.import_wheel(args.seed_wheel_dir)
    trainer = mrl_pytorch.Trainer(package, args.image_size < 64, torch.device(args.device), args.precision == "fp16",
                                  gamma_steps(args), bn_train=not as_shipped)
    return time_steps(args, torch, lambda x1, x2, k: trainer.step(x1, x2), trainer.device)


def run_ours(args, nest, memory_format):
    """train_ssl.py's step: SSLModel (ReLIC, nested on the backbone by default) prepared by Accelerate."""
    sys.path.insert(0, ROOT)
    import torch
    from accelerate import Accelerator

    import mrl
    from mrl.matryoshka import default_dims
    from mrl.models.backbones import build_backbone
    from mrl.ssl.model import SSLModel
    from mrl.ssl.projectors import Projector
    from mrl.train.loop import training_step
    from mrl.train.optim import cosine_schedule
    from mrl.utils.distributed import unwrap

    assert os.path.dirname(mrl.__file__) == os.path.join(ROOT, "mrl"), mrl.__file__
    accelerator = Accelerator(mixed_precision=args.precision, cpu=args.device == "cpu")
    backbone = build_backbone("resnet18", args.image_size)
    projector = Projector(backbone.embed_dim, 512, 64, nest=nest)
    dims = default_dims(projector.nested_width)
    model = SSLModel("relic", backbone, projector, dims, [1.0] * len(dims),
                     cosine_schedule(mrl_pytorch.GAMMA, 1.0, 1, gamma_steps(args)))
    channels_last = memory_format == "channels_last"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    after_step = unwrap(accelerator, model).after_optimizer_step  # the EMA target's move

    def step(x1, x2, k):  # what train_ssl.py's epoch does per batch, minus logging
        if channels_last:
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        training_step(accelerator, model, optimizer, lambda views: model(*views), (x1, x2), 3e-4, 0.0, k,
                      after_step=after_step)

    return time_steps(args, torch, step, accelerator.device)


def worker(args):
    side = args.worker
    seconds, cpu_seconds = (
        run_seed(args, as_shipped=side == "seed-as-shipped") if side.startswith("seed")
        else run_ours(args, nest="projector" if side == "ours-nest-projector" else "backbone",
                      memory_format="contiguous" if side == "ours-contiguous" else args.memory_format))
    images = args.batch_size * args.steps
    print(json.dumps({"side": side, "seconds": seconds, "images_per_s": images / seconds,
                      "images_per_cpu_s": images / cpu_seconds}))


def main(args):
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if any(s.startswith("seed") for s in sides):
        mrl_pytorch.wheel(args.seed_wheel_dir)  # download once, before any timing
    results = {side: [] for side in sides}
    per_cpu_s = {side: [] for side in sides}
    passthrough = [a for a in sys.argv[1:] if not a.startswith("--worker")] + ["--seed_wheel_dir", args.seed_wheel_dir]
    for _ in range(args.rounds):
        for side in sides:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, "--worker", side],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            results[side].append(measured["images_per_s"])
            per_cpu_s[side].append(measured["images_per_cpu_s"])
    import torch

    print(f"ReLIC + MRL training step, ResNet-18 (CIFAR stem), batch {args.batch_size} x 2 views, "
          f"{args.image_size}x{args.image_size}, precision {args.precision}, {args.device}"
          f"{' (' + str(torch.get_num_threads()) + ' threads)' if args.device == 'cpu' else ''}, "
          f"{args.steps} steps x {args.rounds} rounds")
    # Images per CPU-second (process time, all threads) is what to compare on a CPU shared with other jobs: wall
    # time then depends on the neighbours' load, process time much less.
    print(f"{'side':<22} {'images/s':>9} {'images/CPU-s':>13}   rounds (images/s)")
    medians = {side: statistics.median(v) for side, v in results.items()}
    cpu_medians = {side: statistics.median(v) for side, v in per_cpu_s.items()}
    for side, values in results.items():
        print(f"{side:<22} {medians[side]:>9.1f} {cpu_medians[side]:>13.2f}   {', '.join(f'{v:.1f}' for v in values)}")
    if "seed" in medians:
        for side in medians:
            if side.startswith("ours"):
                print(f"ratio {side} / seed: {medians[side] / medians['seed']:.2f}x images/s, "
                      f"{cpu_medians[side] / cpu_medians['seed']:.2f}x images per CPU-second")


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    parsed.seed_wheel_dir = os.path.abspath(parsed.seed_wheel_dir)  # main passes it on, absolute, to the workers
    worker(parsed) if parsed.worker else main(parsed)
