#!/usr/bin/env python
"""Overhead of Accelerate and the Matryoshka heads in train_supervised.py's step, against a plain PyTorch loop.

Both train the blog's 4-conv CNN with 8 heads (8..1024) on the same synthetic batches already on the device, with
the same optimizer (AdamW) and clipping; the plain loop computes the 8 cross-entropies head by head with plain
nn.Linear layers, in fp32 with PyTorch's default memory layout, as the blog. Steps alternate between the two in blocks
so that machine noise hits both alike. Prints images/s of each and the ratio: at the same precision and layout
(the defaults) the overhead (target: ours >= 0.9x the plain loop); with --precision bf16 --memory_format
channels_last what train_supervised.py gains over the blog's loop on a GPU (reference.md E: 570 vs 1,165 img/s).

    python benchmarks/bench_supervised_step.py                  # CPU-sized: 128 px, batch 4
    python benchmarks/bench_supervised_step.py --image_size 256 --batch_size 32 --steps 20   # the blog, on a GPU
    python benchmarks/bench_supervised_step.py --image_size 256 --batch_size 32 --steps 40 --precision bf16 \
        --memory_format channels_last                                                          # ours as a GPU runs it
"""

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mrl.matryoshka import MatryoshkaClassifier, MatryoshkaHeads, per_head_cross_entropy
from mrl.models.backbones import build_backbone
from mrl.train.loop import training_step

DIMS = [8, 16, 32, 64, 128, 256, 512, 1024]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side, after one warm-up step each")
    parser.add_argument("--precision", default="no", choices=("no", "fp16", "bf16"),
                        help="ours: Accelerate's mixed precision (the plain loop stays fp32)")
    parser.add_argument("--memory_format", default="contiguous", choices=("contiguous", "channels_last"),
                        help="ours: train_supervised.py's --memory_format (the plain loop stays contiguous)")
    args = parser.parse_args()

    accelerator = Accelerator(mixed_precision=args.precision)
    device = accelerator.device
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 2, (args.batch_size,), device=device)

    # Plain PyTorch: the same backbone, a Python list of heads, a loop over them.
    plain_backbone = build_backbone("cnn4", args.image_size).to(device)
    plain_heads = nn.ModuleList(nn.Linear(d, 2) for d in DIMS).to(device)
    plain_params = list(plain_backbone.parameters()) + list(plain_heads.parameters())
    plain_opt = torch.optim.AdamW(plain_params, lr=4e-4)

    def plain_step():
        z = plain_backbone(x)
        loss = sum(F.cross_entropy(head(z[:, :d]), y) for d, head in zip(DIMS, plain_heads))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_params, 1.0)
        plain_opt.step()
        plain_opt.zero_grad()

    # Ours: the training scripts' step function with train_supervised.py's loss, through Accelerate.
    model = MatryoshkaClassifier(build_backbone("cnn4", args.image_size), MatryoshkaHeads(DIMS, 2))
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=4e-4))
    weights = torch.ones(len(DIMS), device=device)
    batch = {"pixel_values": x.contiguous(memory_format=memory_format), "labels": y}

    def forward(batch):
        per_dim = per_head_cross_entropy(model(batch["pixel_values"])[1], batch["labels"])
        return (weights * per_dim).sum(), per_dim

    def our_step():
        training_step(accelerator, model, optimizer, forward, batch, 4e-4, 1.0, step=0)

    def timed(step, n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(plain_step, 1), timed(our_step, 1)  # warm-up
    plain = ours = 0.0
    for _ in range(args.steps // 2):  # alternate blocks of two steps
        plain += timed(plain_step, 2)
        ours += timed(our_step, 2)
    n = 2 * (args.steps // 2) * args.batch_size
    name = f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""
    print(f"device {device}{name}, torch {torch.__version__}, cnn4 at {args.image_size} px, batch {args.batch_size}, "
          f"{2 * (args.steps // 2)} steps each")
    print(f"plain PyTorch loop : {n / plain:8.1f} img/s (fp32, contiguous)")
    print(f"train_supervised.py: {n / ours:8.1f} img/s ({args.precision}, {args.memory_format})")
    print(f"ratio ours/plain   : {plain / ours:8.3f}" + ("  (target >= 0.90)" if args.precision == "no" else ""))


if __name__ == "__main__":
    main()
