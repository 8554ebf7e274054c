#!/usr/bin/env python
"""Data loading per epoch of train_ssl.py: --data_on_device against the DataLoader worker paths.

Each side delivers every batch of an epoch of CIFAR-10 as train_ssl.py's training step receives it -- two augmented,
normalized views on the device -- with no training step, so what is timed is the data path alone:

  workers-pil   the default: decode + the PIL two-view recipe per image in N DataLoader workers, then to the device
  workers-gpu   --gpu_augment: decode + resize (uint8) in N workers, to the device, batched augmentation there
  device        --data_on_device: the uint8 array already on the device, batches gathered by index there, the same
                batched augmentation; no workers (its one-time decode, and the cached copy's load, are timed apart)

Batches come in train_ssl.py's order and sizes (Accelerate's seedable sampler, --batch_size global, full batches). An
epoch of the worker paths includes starting its workers, as every epoch of train_ssl.py does. Prints seconds per epoch
(the last of --epochs) and the ratios to the device mode.

    python benchmarks/bench_loader.py --max_samples 5000 --workers 2          # CPU-sized
    python benchmarks/bench_loader.py --workers 12                             # the 50,000 images, on a GPU machine
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
import torchvision.transforms as T
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mrl.batches.device_data import DeviceLoader, cached_decode, decode_transform
from mrl.batches.ssl_augment import BatchAugment, batch_seed, ssl_augmentation
from mrl.batches.transforms import Collate, FillUnreadable, ImageTransform
from mrl.data.presets import PRESETS
from mrl.data.sources import load_splits

DEFAULT_CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10")
SIDES = ("workers-pil", "workers-gpu", "device")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=DEFAULT_CIFAR, help="the CIFAR-10 copy (Hub parquet layout)")
    parser.add_argument("--max_samples", type=int, default=None, help="a random subset of the train split (default: all)")
    parser.add_argument("--batch_size", type=int, default=256, help="global batch, as train_ssl.py's --batch_size")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per side; the last one is reported")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of: {', '.join(SIDES)}")
    args = parser.parse_args()
    sides = [s for s in args.sides.split(",") if s]

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True,
                                                                        data_seed=0))
    device, preset, size = accelerator.device, PRESETS["cifar10"], 32
    train = load_splits("cifar10", args.dataset_path, max_train_samples=args.max_samples).train
    augment = BatchAugment(size, preset.mean, preset.std)
    generator = torch.Generator(device=device)

    def loader(transform, views):
        dataset = train.with_transform(ImageTransform(transform, seed=0, views=views))
        return accelerator.prepare(torch.utils.data.DataLoader(
            FillUnreadable(dataset), batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
            collate_fn=Collate(), pin_memory=device.type == "cuda"))

    def batched_views(batch, epoch, index):  # what train_one_epoch does with --gpu_augment / --data_on_device
        generator.manual_seed(batch_seed(0, epoch, index, accelerator.process_index))
        return augment(batch["pixel_values"], generator), augment(batch["pixel_values"], generator)

    def epoch_seconds(batches_of, on_batch):
        times = []
        for epoch in range(args.epochs):
            sync()
            start, images = time.perf_counter(), 0
            for index, batch in enumerate(batches_of(epoch)):
                views = on_batch(batch, epoch, index)
                images += len(views[0])
            sync()
            times.append(time.perf_counter() - start)
        return times[-1], images

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # the batched augmentation's first call pays one-time set-up (kernels, allocator): not part of any epoch
    batched_views({"pixel_values": torch.zeros(args.batch_size, 3, size, size, dtype=torch.uint8, device=device)}, 0, 0)
    sync()
    results, extra = {}, []
    if "workers-pil" in sides:
        pil = loader(T.Compose([ssl_augmentation(size), T.ToTensor(), T.Normalize(preset.mean, preset.std)]), 2)
        results["workers-pil"] = epoch_seconds(lambda e: pil.set_epoch(e) or pil, lambda b, e, i: b["pixel_values"])
    if "workers-gpu" in sides:
        uint8 = loader(decode_transform(size), 1)
        results["workers-gpu"] = epoch_seconds(lambda e: uint8.set_epoch(e) or uint8, batched_views)
    if "device" in sides:
        cache = tempfile.mkdtemp(prefix="bench_loader_")
        try:
            start = time.perf_counter()
            cached_decode(train, size, args.workers, cache_dir=cache, log=lambda m: None)
            cold = time.perf_counter() - start
            start = time.perf_counter()
            source = DeviceLoader(*cached_decode(train, size, args.workers, cache_dir=cache, log=lambda m: None),
                                  args.batch_size, 0, device, accelerator.num_processes, accelerator.process_index)
            sync()
            warm = time.perf_counter() - start
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        results["device"] = epoch_seconds(source.batches, batched_views)
        extra.append(f"  device mode, once per run: decode {len(train)} images with {args.workers} workers {cold:.2f} s "
                     f"(first run), later runs read the cache and copy it to {device.type} in {warm:.2f} s")

    print(f"data path of train_ssl.py per epoch: CIFAR-10, {len(train)} images at {size} px, batch {args.batch_size}, "
          f"{args.workers} workers, device {device.type}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}; epoch {args.epochs} of {args.epochs}")
    print(f"{'side':<12} {'s/epoch':>9} {'images/s':>10}")
    for side, (seconds, images) in results.items():
        print(f"{side:<12} {seconds:>9.2f} {images / seconds:>10.0f}")
    print("\n".join(extra))
    if "device" in results:
        for side in results:
            if side != "device":
                print(f"ratio {side} / device (time per epoch): {results[side][0] / results['device'][0]:.2f}x")


if __name__ == "__main__":
    main()
