#!/usr/bin/env python
"""ReLIC + MRL training step: ours (train_ssl.training_step under Accelerate) vs mrl-pytorch 0.1.1's own code.

Both sides train ResNet-18 with the CIFAR stem, projector 512 -> 512 -> 64, nested dims 8..512, Adam lr 3e-4
wd 1e-5, an EMA target updated every step, on the same random batch of two views (the data pipeline is not timed:
this is the step alone), at the same batch size and precision. mrl-pytorch's import package is also called `mrl`,
so each side runs in its own subprocess: the seed's with its wheel (downloaded with `pip download --no-deps
mrl-pytorch==0.1.1`, unzipped) first on sys.path, ours with this repository. Its training loop lives in its git repo's
train.py, not in the wheel, so the seed's step below is train.py's loop body, calling the wheel's ReLIC, relic_loss
and ResNet-18.

mrl-pytorch's ReLIC puts the encoder in eval mode when it measures the feature size and nothing puts it back, so as
shipped it trains with frozen BatchNorm statistics (a bug; see the README). `seed` runs it in train mode, the same
work as ours; `seed-as-shipped` keeps the eval-mode bug, for reference. The rounds alternate the sides so that drift
in machine load hits both alike; the table shows the median of the rounds.

  python benchmarks/bench_ssl_step.py                                  # CPU: batch 64, 32x32, fp32
  python benchmarks/bench_ssl_step.py --device cuda --batch_size 256 --precision fp16 --steps 50
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_PACKAGE = "mrl-pytorch==0.1.1"


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


def seed_wheel(folder):
    """The unzipped mrl-pytorch 0.1.1 wheel (downloaded on first use), to put first on sys.path."""
    unpacked = os.path.join(folder, "unpacked")
    if not os.path.isfile(os.path.join(unpacked, "mrl", "mrl.py")):
        os.makedirs(folder, exist_ok=True)
        wheels = glob.glob(os.path.join(folder, "mrl_pytorch-0.1.1-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SEED_PACKAGE, "-d", folder],
                           check=True, stdout=subprocess.DEVNULL)
            wheels = glob.glob(os.path.join(folder, "mrl_pytorch-0.1.1-*.whl"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(unpacked)
    return unpacked


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
    import torch

    step, device = seed_step(args, as_shipped)
    return time_steps(args, torch, step, device)


def seed_step(args, as_shipped=False):
    """(step(x1, x2, global_step), device): mrl-pytorch 0.1.1's training step, from its wheel (put first on sys.path
    here: call it in a process that has not imported our mrl)."""
    sys.path.insert(0, seed_wheel(args.seed_wheel_dir))
    import torch

    import mrl
    from mrl import ReLIC, relic_loss
    from mrl.encoders import resnet18

    assert os.path.dirname(mrl.__file__).startswith(args.seed_wheel_dir), mrl.__file__  # not our mrl/
    device = torch.device(args.device)
    model = ReLIC(resnet18(modify_model=args.image_size < 64), proj_out_dim=64).to(device)
    if not as_shipped:
        model.train()
    params = list(model.online_encoder.parameters()) + [model.t_prime]
    optimizer = torch.optim.Adam(params, lr=3e-4, weight_decay=1e-5)
    fp16 = args.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    gamma, base, total_steps = [0.995], 0.995, 100_000  # train.py: update_gamma(k, K, tau_base), cosine to 1

    def step(x1, x2, global_step):
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            o1, o2, t1, t2 = model(x1, x2)
            loss1 = torch.stack([relic_loss(o, t, model.t_prime, 1.0, max_tau=5.0) for o, t in zip(o1, t2)]).sum()
            loss2 = torch.stack([relic_loss(o, t, model.t_prime, 1.0, max_tau=5.0) for o, t in zip(o2, t1)]).sum()
            loss = (loss1 + loss2) / 2
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if global_step > 1:
            model.update_params(gamma[0])
            k = torch.tensor(float(global_step))
            gamma[0] = (1 - (1 - base) * (torch.cos(torch.pi * k / total_steps) + 1) / 2).item()
        else:
            model.copy_params()
        loss.item()  # train.py accumulates the loss on the host every step

    if args.precision == "bf16":
        raise SystemExit("mrl-pytorch has no bf16 mode")
    return step, device


def run_ours(args, nest, memory_format):
    """train_ssl.py's step: SSLModel (ReLIC, nested on the backbone by default) prepared by Accelerate."""
    sys.path.insert(0, ROOT)
    import torch
    from accelerate import Accelerator

    import mrl
    from mrl.models import build_backbone, default_dims
    from mrl.projectors import Projector
    from mrl.schedules import cosine_schedule
    from train_ssl import SSLModel, training_step

    assert os.path.dirname(mrl.__file__) == os.path.join(ROOT, "mrl"), mrl.__file__
    accelerator = Accelerator(mixed_precision=args.precision, cpu=args.device == "cpu")
    backbone = build_backbone("resnet18", args.image_size)
    projector = Projector(backbone.embed_dim, 512, 64, nest=nest)
    dims = default_dims(projector.nested_width)
    model = SSLModel("relic", backbone, projector, dims, [1.0] * len(dims), cosine_schedule(0.995, 1.0, 1, 100_000))
    channels_last = memory_format == "channels_last"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4, weight_decay=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)

    def step(x1, x2, k):  # what train_ssl.train_one_epoch does per batch, minus logging
        if channels_last:
            x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))
        training_step(accelerator, model, optimizer, (x1, x2), 3e-4, 0.0, k)

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
        seed_wheel(args.seed_wheel_dir)  # download once, before any timing
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
