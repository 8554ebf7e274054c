#!/usr/bin/env python
"""Not a speed test: does `train_supervised.py --reduced_decode` train like the default? Short runs with and without it
on the same data and seeds, against the spread between seeds.

The data: an ILSVRC-layout folder of real photos (scikit-learn's two and matplotlib's grace_hopper.jpg, one class
each), every image a random crop of its photo scaled to a longer side of 400-1,200 px and saved at JPEG quality 85-95:
ImageNet's sizes and its long tail, so that most 64 px training crops and the 1,200 px images' evaluation crops decode
at a reduced scale. ResNet-18 with GroupNorm at 64 px, the imagenet recipe's schedule and label smoothing with AdamW
(SGD at the recipe's rate does not leave chance in so few steps), one thread per run.
Prints each run's validation loss per epoch (the mean over the heads) and the final full-width top-1, then the largest
difference between the two decodings at the same seed beside the largest difference between two seeds.

    python benchmarks/fidelity_reduced_decode.py                  # 3 seeds x 2, ~5 min on 2 cores
    python benchmarks/fidelity_reduced_decode.py --seeds 0 1 --epochs 3
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

import matplotlib
import numpy as np
import sklearn.datasets
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from mrl.data.imagenet import synsets  # noqa: E402

PHOTOS = [os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", name)
          for name in ("china.jpg", "flower.jpg")]
PHOTOS.append(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
SYNSET_INDICES = (7, 207, 530)  # as tests/imagenet_fixture.py: not the first classes


def build_folder(root, train_per_class, val_per_class, seed=0):
    """DIR/train/<synset>/*.JPEG and DIR/val/<synset>/*.JPEG: random crops of each class's photo at 400-1,200 px."""
    rng = np.random.default_rng(seed)
    for path, index in zip(PHOTOS, SYNSET_INDICES):
        photo = Image.open(path).convert("RGB")
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = os.path.join(root, split, synsets()[index])
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                area, aspect = rng.uniform(0.25, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
                w = min(photo.width, round(np.sqrt(area * photo.width * photo.height * aspect)))
                h = min(photo.height, round(np.sqrt(area * photo.width * photo.height / aspect)))
                x, y = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
                side = int(rng.integers(400, 1201))
                size = (side, max(1, round(side * h / w))) if w >= h else (max(1, round(side * w / h)), side)
                buffer = io.BytesIO()
                photo.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.LANCZOS).save(
                    buffer, "JPEG", quality=int(rng.integers(85, 96)))
                with open(os.path.join(folder, f"{synsets()[index]}_{split}_{i:03d}.JPEG"), "wb") as f:
                    f.write(buffer.getvalue())


def train(data, output, seed, reduced, args):
    command = [sys.executable, os.path.join(ROOT, "train_supervised.py"), "--dataset", "imagenet", "--dataset_path",
               data, "--model", "resnet18", "--norm", "group", "--image_size", "64", "--min_res", "64",
               "--max_res", "64", "--epochs", str(args.epochs), "--warmup_epochs", "1", "--batch_size", "32",
               "--optimizer", "adamw", "--lr", "2e-3", "--weight_decay", "0.05", "--num_workers", "0",
               "--seed", str(seed), "--report_to", "none", "--output_dir", output]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    subprocess.run(command + (["--reduced_decode"] if reduced else []), check=True, env=env, capture_output=True)
    with open(os.path.join(output, "metrics.json")) as f:
        metrics = json.load(f)
    curve = [float(np.mean(row["val_loss"])) for row in metrics["history"]]
    return curve, metrics["val"]["accuracy"][-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train_per_class", type=int, default=80)
    parser.add_argument("--val_per_class", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "photos")
        build_folder(data, args.train_per_class, args.val_per_class)
        runs = {}
        for seed in args.seeds:
            for reduced in (False, True):
                runs[seed, reduced] = train(data, os.path.join(tmp, f"run_{seed}_{reduced}"), seed, reduced, args)
                curve, top1 = runs[seed, reduced]
                print(f"seed {seed} {'--reduced_decode' if reduced else 'default         '}: val loss per epoch "
                      + " ".join(f"{v:.4f}" for v in curve) + f"; top-1 {top1:.3f}", flush=True)
    curves = {k: np.array(v[0]) for k, v in runs.items()}
    same_seed = max(np.abs(curves[s, True] - curves[s, False]).max() for s in args.seeds)
    across = max(np.abs(curves[a, False] - curves[b, False]).max() for a in args.seeds for b in args.seeds if a < b) \
        if len(args.seeds) > 1 else float("nan")
    print(f"\nlargest validation-loss difference at one epoch: --reduced_decode vs default at the same seed "
          f"{same_seed:.4f}; between two seeds (default) {across:.4f}")
    top1 = {k: v[1] for k, v in runs.items()}
    print("full-width top-1, default: " + ", ".join(f"{top1[s, False]:.3f}" for s in args.seeds)
          + "; --reduced_decode: " + ", ".join(f"{top1[s, True]:.3f}" for s in args.seeds))


if __name__ == "__main__":
    main()
