#!/usr/bin/env python
"""mrl-pytorch 0.1.1 end to end: seconds per CIFAR-10 epoch of its ReLIC + MRL training, data pipeline included.

The yardstick for train_ssl.py's epoch times (printed by train_ssl.py itself as "epoch N: I images in S s"), measured
on the same machine in the same session. The seed's pipeline as its utils.get_dataset builds it: torchvision's CIFAR10
holds the images decoded in memory as uint8 and hands each one to PIL and the wheel's two-view transform
(aug.ViewGenerator(aug.get_training_transforms(32))) in the DataLoader workers; here the same array is decoded from
the CIFAR-10 copy (the Hub's parquet layout), since torchvision's download cannot be reached offline. The step and
the loop are its train.py's, as benchmarks/mrl_pytorch.py restates them (the wheel's ReLIC, fp16 as its
--fp16_precision, BatchNorm in train mode, the gamma schedule over the length train.py computes for --epochs).
Shuffled, batch 256, full batches, as reference.md E measured it (2,844 img/s = 17.6 s per epoch on an H200 with 8
workers).

This process imports the seed's `mrl` package (its wheel first on sys.path), never ours.

    python benchmarks/bench_seed_epoch.py --device cuda --precision fp16 --workers 8
    python benchmarks/bench_seed_epoch.py --max_samples 512 --batch_size 64 --epochs 1 --workers 2   # CPU check
"""

import argparse
import glob
import io
import os
import tempfile
import time

import mrl_pytorch  # benchmarks/, beside this script; imports neither our mrl nor the seed's
import numpy as np
import torch

DEFAULT_CIFAR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cifar10")


def cifar10_train(path, max_samples):
    """The train split's images as torchvision's CIFAR10 holds them: uint8 (N, 32, 32, 3)."""
    import pyarrow.parquet as pq
    from PIL import Image

    files = sorted(glob.glob(os.path.join(path, "**", "train-*.parquet"), recursive=True))
    if not files:
        raise SystemExit(f"no train-*.parquet under {path}")
    table = pq.read_table(files)
    if max_samples:
        table = table.slice(0, max_samples)
    return np.stack([np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"))
                     for cell in table.column("img").to_pylist()])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", default=DEFAULT_CIFAR, help="the CIFAR-10 copy (Hub parquet layout)")
    parser.add_argument("--max_samples", type=int, default=None, help="the first N train images (default: all)")
    parser.add_argument("--batch_size", type=int, default=256, help="mrl-pytorch's default")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers (reference.md E: 8)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed; the last is the steady-state number")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="no", choices=("no", "fp16"), help="fp16: its --fp16_precision")
    parser.add_argument("--seed_wheel_dir", default=os.path.join(tempfile.gettempdir(), "mrl_pytorch_0.1.1"),
                        help="where the seed's wheel is (downloaded there when missing)")
    args = parser.parse_args()

    package = mrl_pytorch.import_wheel(os.path.abspath(args.seed_wheel_dir))
    device = torch.device(args.device)
    start = time.perf_counter()
    images = cifar10_train(args.dataset_path, args.max_samples)
    decode_seconds = time.perf_counter() - start
    loader = torch.utils.data.DataLoader(mrl_pytorch.TwoViews(package, images, 32), batch_size=args.batch_size,
                                         shuffle=True, drop_last=True, num_workers=args.workers)
    trainer = mrl_pytorch.Trainer(package, True, device, args.precision == "fp16",
                                  mrl_pytorch.gamma_steps(len(loader), args.epochs))
    print(f"mrl-pytorch 0.1.1 end to end: CIFAR-10 {len(images)} images (decoded in {decode_seconds:.1f} s, before "
          f"timing), batch {args.batch_size}, {args.workers} workers, {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}, precision {args.precision}, "
          f"torch {torch.__version__}")
    trainer.train(loader, args.epochs)  # prints "seed epoch N: I images in S s (R img/s), ..." per epoch


if __name__ == "__main__":
    main()
