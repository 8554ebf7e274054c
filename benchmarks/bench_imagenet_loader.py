#!/usr/bin/env python
"""ImageNet-style loading per CPU core: JPEG decode + RandomResizedCrop + flip to a uint8 tensor, PIL vs TorchCodec,
and the --decode_on_device path (mrl.batches.device_decode), at the progressive-resizing resolutions 160, 192 and 224 px.

Real photos: scikit-learn's two (640x427, as shipped), and the same two resized to 500x375 (ImageNet's typical size)
and re-encoded by PIL at quality 90; each set is cycled. One process, one thread, timed in CPU time (so that other
jobs on the machine do not count): images/s per core. Then the cores an 8-GPU node needs to feed FFCV's ResNet-50 rate
(~3,300 img/s per A100, reference.md I) on each path. With CUDA, the device side of --decode_on_device (nvJPEG batch
decode + crops + normalize) is timed too, and its pixels are compared with the CPU's.

    python benchmarks/bench_imagenet_loader.py                 # ~2-3 min on a 2-core machine
    python benchmarks/bench_imagenet_loader.py --images 100 --rounds 1     # quick
"""

import argparse
import io
import os
import sys
import time

import sklearn.datasets
import torch
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mrl.batches.decode import open_image, tensor_transform, torchcodec_decode_jpeg
from mrl.batches.device_decode import EncodedCollate, EncodeTransform, decode_batch

PHOTOS = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
PER_GPU = 3300  # FFCV's ResNet-50 on 8 A100s: ~26k img/s (reference.md I)
GPUS = 8
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo_sets():
    originals = []
    for name in ("china.jpg", "flower.jpg"):
        with open(os.path.join(PHOTOS, name), "rb") as f:
            originals.append(f.read())
    resized = []
    for data in originals:
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize((500, 375), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        resized.append(buffer.getvalue())
    return {"640x427": originals, "500x375 q90": resized}


def cpu_pipelines(size):
    """Each: encoded bytes -> an augmented (3, size, size) tensor, as the workers make it (the --decoder paths as
    ImageTransform runs them, without Normalize)."""
    augment = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])
    tensor_augment = tensor_transform(T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()]))
    encode = EncodeTransform("torchcodec")
    pipelines = {
        "--decoder pil": lambda data: augment(open_image({"bytes": data}, "pil")),
        # what ImageTransform does with --decoder torchcodec: the decoded tensor straight to the same steps
        "--decoder torchcodec": lambda data: tensor_augment(open_image({"bytes": data}, "torchcodec", True)),
        # not a path of the repo: TorchCodec's pixels handed to PIL's steps (decoding alone is not faster)
        "TorchCodec decode, PIL crop": lambda data: augment(open_image({"bytes": data}, "torchcodec")),
        # --decode_on_device, the workers' share: read the bytes, check the header
        "--decode_on_device, worker side": lambda data: encode({"image": [{"bytes": data}], "label": [0],
                                                                "index": [0]}),
    }
    return pipelines if torchcodec_decode_jpeg() is not None else {"--decoder pil": pipelines["--decoder pil"]}


def rate(function, images, count):
    """Images per CPU-second of this process (one thread): a core's rate, whatever else runs on the machine."""
    for data in images:  # warm-up
        function(data)
    start = time.process_time()
    for i in range(count):
        function(images[i % len(images)])
    return count / (time.process_time() - start)


def batch_rate(images, size, device, batch_size, batches):
    """decode_batch on `device`: EncodeTransform + EncodedCollate built once (the workers' share, timed above),
    then decode + crop + flip + normalize per batch."""
    cells = [{"bytes": images[i % len(images)], "path": None} for i in range(batch_size)]
    samples = EncodeTransform("torchcodec")({"image": cells, "label": [0] * batch_size,
                                             "index": list(range(batch_size))})
    batch = EncodedCollate()([{k: v[i] for k, v in samples.items()} for i in range(batch_size)])
    batch = {**batch, "pixel_values": batch["pixel_values"].to(device)}

    def step(epoch):
        return decode_batch(batch, size, epoch, True, MEAN, STD, seed=0, channels_last=True)

    # on a GPU, wall time; on the CPU, this process's CPU time (a core's rate, as `rate`)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step(0)
    sync()
    start = clock()
    for epoch in range(batches):
        step(epoch + 1)
    sync()
    return batch_size * batches / (clock() - start)


def device_vs_cpu(sets, device):
    """Not a speed: the device's pixels (nvJPEG) against the CPU's, per image, evaluation crops (deterministic)."""
    gray, progressive = io.BytesIO(), io.BytesIO()
    Image.open(io.BytesIO(sets["640x427"][0])).convert("L").save(gray, "JPEG", quality=90)
    Image.open(io.BytesIO(sets["640x427"][1])).save(progressive, "JPEG", quality=90, progressive=True)
    cells = [{"bytes": data, "path": None}
             for data in sets["640x427"] + sets["500x375 q90"] + [gray.getvalue(), progressive.getvalue()]]
    samples = EncodeTransform("torchcodec")({"image": cells, "label": [0] * len(cells),
                                             "index": list(range(len(cells)))})
    batch = EncodedCollate()([{k: v[i] for k, v in samples.items()} for i in range(len(cells))])
    on_cpu = decode_batch(batch, 224, 0, False, (0, 0, 0), (1, 1, 1))
    moved = {**batch, "pixel_values": batch["pixel_values"].to(device)}
    on_device = decode_batch(moved, 224, 0, False, (0, 0, 0), (1, 1, 1))
    return ((on_device.cpu() - on_cpu).abs().mean(dim=(1, 2, 3)) * 255).tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300, help="images timed per pipeline, size and photo set")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (pipelines alternate); the best is reported")
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224])
    parser.add_argument("--batch_size", type=int, default=256, help="for the device path's batches")
    parser.add_argument("--gpu_batches", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core
    cpu = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t") \
        if os.path.exists("/proc/cpuinfo") else "?"
    print(f"{time.strftime('%Y-%m-%d')}, CPU {cpu} ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}), "
          f"torch {torch.__version__}, one thread; {args.images} images x best of {args.rounds} rounds")
    if torchcodec_decode_jpeg() is None:
        print("TorchCodec cannot decode here: its pipelines are left out")
    sets = photo_sets()
    results = {}
    for set_name, images in sets.items():
        for size in args.sizes:
            pipelines = cpu_pipelines(size)
            for _ in range(args.rounds):
                for name, function in pipelines.items():
                    key = (name, set_name, size)
                    results[key] = max(results.get(key, 0), rate(function, images, args.images))
            if torchcodec_decode_jpeg() is not None:
                key = ("--decode_on_device, CPU as the device", set_name, size)
                for _ in range(args.rounds):
                    count = max(1, args.images // 64)
                    results[key] = max(results.get(key, 0), batch_rate(images, size, torch.device("cpu"), 64, count))
    names = list(dict.fromkeys(k[0] for k in results))
    columns = [(s, size) for s in sets for size in args.sizes]
    print("\nimages per CPU-second, one thread (cores for 8 GPUs x 3,300 img/s in brackets)")
    print(f"{'pipeline':40s}" + "".join(f"{f'{s} @{size}':>22s}" for s, size in columns))
    for name in names:
        cells = []
        for s, size in columns:
            r = results[(name, s, size)]
            cells.append(f"{r:8.0f} [{GPUS * PER_GPU / r:5.0f} cores]")
        print(f"{name:40s}" + "".join(f"{c:>22s}" for c in cells))
    if not torch.cuda.is_available() or torchcodec_decode_jpeg() is None:
        print("\nGPU path: skipped (no CUDA device here)" if not torch.cuda.is_available()
              else "\nGPU path: skipped (TorchCodec cannot decode here)")
        return
    device = torch.device("cuda")
    print(f"\nGPU path ({torch.cuda.get_device_name()}): decode_batch, batch {args.batch_size}, nvJPEG decode + "
          "crop + flip + normalize, channels_last; images/s on one GPU")
    for set_name, images in sets.items():
        for size in args.sizes:
            r = batch_rate(images, size, device, args.batch_size, args.gpu_batches)
            print(f"  {set_name} @{size}: {r:8.0f} img/s ({r / PER_GPU:.1f}x FFCV's per-A100 rate)")
    print("GPU vs CPU pixels, evaluation crops at 224, mean abs diff in levels (4 photos, grayscale, "
          "progressive): " + ", ".join(f"{d:.2f}" for d in device_vs_cpu(sets, device)))


if __name__ == "__main__":
    main()
