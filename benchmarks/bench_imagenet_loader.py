#!/usr/bin/env python
"""ImageNet-style loading per CPU core: JPEG decode + RandomResizedCrop + flip to a tensor at the progressive-resizing
resolutions 160, 192 and 224 px -- PIL, TorchCodec, --reduced_decode (mrl.batches.reduced_decode), the same on prepared
shards' images (mrl.data.prepare_imagenet: longer side <= 500 px, JPEG quality 90), and the --decode_on_device path
(mrl.batches.device_decode) -- and what the prepare step itself costs per image and saves in bytes.

Real photos: scikit-learn's two, as shipped (640x427, quality ~100 with 4:4:4 chroma: 0.5-0.7 bytes per pixel, roughly
ImageNet's own), resized to 500x375 (ImageNet's typical size) and re-encoded by PIL at quality 90, and scaled up to 1,280x854 at
quality 92 (the large images of ImageNet's long tail; smoother than a photo taken at that size, so they decode a little
faster than one would). Each set is cycled. One process, one thread, timed in CPU time (so that other jobs on the
machine do not count): images/s per core. Then the cores an 8-GPU node needs to feed FFCV's ResNet-50 rate (~3,300
img/s per A100, reference.md I) on each path. With CUDA, the device side of --decode_on_device (nvJPEG batch decode +
crops + normalize) is timed too, and its pixels are compared with the CPU's.

    python benchmarks/bench_imagenet_loader.py                 # ~8-10 min on a 2-core machine
    python benchmarks/bench_imagenet_loader.py --images 100 --rounds 1     # quick
"""

import argparse
import io
import math
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
from mrl.batches.transforms import ImageTransform, build_transform
from mrl.data.prepare_imagenet import MAX_SIDE, QUALITY, prepared_bytes

PHOTOS = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
PER_GPU = 3300  # FFCV's ResNet-50 on 8 A100s: ~26k img/s (reference.md I)
GPUS = 8
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo_sets():
    originals = []
    for name in ("china.jpg", "flower.jpg"):
        with open(os.path.join(PHOTOS, name), "rb") as f:
            originals.append(f.read())

    def scaled(size, resample, quality):
        out = []
        for data in originals:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).convert("RGB").resize(size, resample).save(buffer, "JPEG", quality=quality)
            out.append(buffer.getvalue())
        return out

    return {"640x427": originals, "500x375 q90": scaled((500, 375), Image.BICUBIC, 90),
            "1280x854 q92": scaled((1280, 854), Image.LANCZOS, 92)}


def prepare_rate(images, count):
    """mrl.data.prepare_imagenet's per-image work (check or decode, scale, encode) per CPU-second, and the bytes it
    keeps per source byte."""
    rate_ = rate(lambda data: prepared_bytes(data, MAX_SIDE, QUALITY), images, count)
    return rate_, sum(len(prepared_bytes(d, MAX_SIDE, QUALITY)[0]) for d in images) / sum(map(len, images))


def reduced_vs_full(images, size, samples=40):
    """Not a speed: PSNR (dB) of --reduced_decode's training crops against a full decode's with the same seeds, over
    the samples it decodes at a reduced scale (min, median), and how many of `samples` those are."""
    cells = [{"bytes": images[i % len(images)], "path": None} for i in range(samples)]
    out, taken = {}, []
    for reduced in (False, True):
        transform = ImageTransform(build_transform("resized_crop_flip", size, (0,) * 3, (1,) * 3, train=True),
                                   seed=0, reduced_decode=reduced)
        if reduced:
            transform.reduced = lambda image, data, decode=transform.reduced: taken.append(decode(image, data)) or \
                taken[-1]
        out[reduced] = transform({"image": cells, "label": [0] * samples, "index": list(range(samples))})
    psnr = sorted(-10 * math.log10(max(((a - b) ** 2).mean().item(), 1e-12))
                  for a, b, t in zip(out[False]["pixel_values"], out[True]["pixel_values"], taken) if t is not None)
    return (psnr[0], psnr[len(psnr) // 2], len(psnr)) if psnr else (None, None, 0)


def cpu_pipelines(size):
    """Each: name -> (encoded bytes -> an augmented (3, size, size) tensor, as the workers make it (the --decoder
    paths as ImageTransform runs them, without Normalize), and whether it reads the prepared shards' images)."""
    augment = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()])
    tensor_augment = tensor_transform(T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()]))
    encode = EncodeTransform("torchcodec")

    def reduced(decoder):  # ImageTransform itself: the reduced scale where the crop allows, the --decoder path else
        transform = ImageTransform(T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()]),
                                   decoder=decoder, reduced_decode=True)
        return lambda data: transform({"image": [{"bytes": data}], "label": [0], "index": [0]})

    def pil(data):
        return augment(open_image({"bytes": data}, "pil"))

    def torchcodec(data):  # what ImageTransform does with --decoder torchcodec: the tensor straight to the same steps
        return tensor_augment(open_image({"bytes": data}, "torchcodec", True))

    pipelines = {
        "--decoder pil": (pil, False),
        "--decoder torchcodec": (torchcodec, False),
        # not a path of the repo: TorchCodec's pixels handed to PIL's steps (decoding alone is not faster)
        "TorchCodec decode, PIL crop": (lambda data: augment(open_image({"bytes": data}, "torchcodec")), False),
        "--reduced_decode --decoder pil": (reduced("pil"), False),
        "--reduced_decode --decoder torchcodec": (reduced("torchcodec"), False),
        "prepared: --decoder pil": (pil, True),
        "prepared: --decoder torchcodec": (torchcodec, True),
        "prepared: --reduced_decode --decoder torchcodec": (reduced("torchcodec"), True),
        # --decode_on_device, the workers' share: read the bytes, check the header
        "--decode_on_device, worker side": (lambda data: encode({"image": [{"bytes": data}], "label": [0],
                                                                 "index": [0]}), False),
    }
    if torchcodec_decode_jpeg() is None:
        return {name: p for name, p in pipelines.items() if "torchcodec" not in name and "device" not in name}
    return pipelines


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
    prepared = {name: [prepared_bytes(d, MAX_SIDE, QUALITY)[0] for d in images] for name, images in sets.items()}
    results = {}
    for set_name, images in sets.items():
        for size in args.sizes:
            pipelines = cpu_pipelines(size)
            for _ in range(args.rounds):
                for name, (function, on_prepared) in pipelines.items():
                    key = (name, set_name, size)
                    source = prepared[set_name] if on_prepared else images
                    results[key] = max(results.get(key, 0), rate(function, source, args.images))
            if torchcodec_decode_jpeg() is not None:
                key = ("--decode_on_device, CPU as the device", set_name, size)
                for _ in range(args.rounds):
                    count = max(1, args.images // 64)
                    results[key] = max(results.get(key, 0), batch_rate(images, size, torch.device("cpu"), 64, count))
    names = list(dict.fromkeys(k[0] for k in results))
    columns = [(s, size) for s in sets for size in args.sizes]
    print("\nimages per CPU-second, one thread (cores for 8 GPUs x 3,300 img/s in brackets); 'prepared': the same "
          f"photos as the prepare step stores them (longer side <= {MAX_SIDE} px, quality {QUALITY})")
    print(f"{'pipeline':48s}" + "".join(f"{f'{s} @{size}':>22s}" for s, size in columns))
    for name in names:
        cells = []
        for s, size in columns:
            r = results[(name, s, size)]
            cells.append(f"{r:8.0f} [{GPUS * PER_GPU / r:5.0f} cores]")
        print(f"{name:48s}" + "".join(f"{c:>22s}" for c in cells))
    print("\nagainst --decoder pil on the source photos (the goal: >= 2.5x at 160-192 px for reduced-scale decoding "
          "on prepared shards):")
    print(f"  {'':48s}" + "".join(f"{f'{s} @{size}':>21s}" for s, size in columns))
    for name in [n for n in names if n.startswith("prepared")] + ["--reduced_decode --decoder torchcodec"]:
        if (name, *columns[0]) in results:
            print(f"  {name:48s}" + "".join(f"{results[(name, s, size)] / results[('--decoder pil', s, size)]:>20.2f}x"
                                            for s, size in columns))
    print("\nthe prepare step (mrl.data.prepare_imagenet's per-image work, one thread) and what it stores:")
    for set_name, images in sets.items():
        r, size_ratio = prepare_rate(images, args.images)
        kept = Image.open(io.BytesIO(prepared[set_name][0])).size
        print(f"  {set_name}: {r:6.0f} images/s, stored as {kept[0]}x{kept[1]}, "
              f"{'copied' if prepared[set_name] == images else 're-encoded'}: {size_ratio:.2f}x the source's bytes")
    print("\n--reduced_decode's training crops against a full decode's with the same seeds (PSNR over the crops it "
          "reduces, of 40):")
    for set_name, images in list(sets.items()) + [(f"prepared {n}", prepared[n]) for n in sets]:
        for size in args.sizes:
            low, median, n = reduced_vs_full(images, size)
            print(f"  {set_name} @{size}: " + (f"{n} reduced, min {low:.1f} dB, median {median:.1f} dB" if n else
                                                "none reduced"))
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
