#!/usr/bin/env python
"""Two-view SSL augmentation throughput: the per-image PIL pipeline in DataLoader workers (train_ssl.py's default)
vs the batched tensor version (`--gpu_augment`, mrl/batches/ssl_augment.BatchAugment) on this machine's device.

Both produce two augmented, normalized views per image of the CIFAR-10 copy. The worker side is timed end to end
(decode + two views + collate) with N workers; the batched side is timed on uint8 batches already on the device
(decode and resize stay in the workers in that mode, and are timed separately as its input cost).

    python benchmarks/bench_augment.py --quick
    python benchmarks/bench_augment.py --workers 8 --batch_size 256 --batches 40      # on a GPU machine
"""

import argparse
import os
import sys
import time

import torch
import torchvision.transforms as T

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mrl.batches.ssl_augment import BatchAugment, ssl_augmentation
from mrl.batches.transforms import Collate, FillUnreadable, ImageTransform
from mrl.data.presets import PRESETS
from mrl.data.sources import load_splits

DEFAULT_CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10")


def images_per_second(loader, batches, on_batch=lambda b: None):
    it = iter(loader)
    on_batch(next(it))  # worker start-up and first batch are not timed
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        on_batch(batch)
        count += len(batch["labels"])
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=DEFAULT_CIFAR)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=10, help="timed batches per side")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="batch 128, 4 batches")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.batches = 128, 4
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS["cifar10"]
    needed = args.batch_size * (args.batches + 2)
    splits = load_splits("cifar10", args.dataset_path, max_train_samples=needed)

    def loader(transform, views):
        splits.train.set_transform(ImageTransform(transform, seed=0, views=views))
        return torch.utils.data.DataLoader(FillUnreadable(splits.train), batch_size=args.batch_size,
                                           num_workers=args.workers,
                                           collate_fn=Collate(), shuffle=False)

    two_views = T.Compose([ssl_augmentation(32), T.ToTensor(), T.Normalize(preset.mean, preset.std)])
    workers = images_per_second(loader(two_views, 2), args.batches)
    decode_only = loader(T.Compose([T.Resize((32, 32)), T.PILToTensor()]), 1)
    decode = images_per_second(decode_only, args.batches)

    augment, generator = BatchAugment(32, preset.mean, preset.std), torch.Generator(device=device).manual_seed(0)
    batch = next(iter(decode_only))["pixel_values"].to(device)

    def both_views():
        augment(batch, generator), augment(batch, generator)
        if device.type == "cuda":
            torch.cuda.synchronize()

    both_views()
    start = time.perf_counter()
    for _ in range(args.batches):
        both_views()
    batched = args.batches * len(batch) / (time.perf_counter() - start)

    print(f"two-view augmentation of CIFAR-10 (32 px), batch {args.batch_size}, {args.batches} timed batches")
    print(f"PIL pipeline, {args.workers} DataLoader workers  : {workers:9.0f} img/s (decode + 2 views + collate)")
    print(f"batched on {device.type:<4} (BatchAugment)       : {batched:9.0f} img/s (2 views, data already on the device)")
    print(f"  its input: decode + resize, {args.workers} workers : {decode:9.0f} img/s")
    print(f"ratio batched / PIL workers: {batched / workers:.2f}x")


if __name__ == "__main__":
    main()
