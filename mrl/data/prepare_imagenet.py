"""Prepared ImageNet: webdataset shards written once with every image at a capped size, which
`--dataset imagenet --dataset_path DIR` then streams (mrl.data.shards) at a lower cost per image.

    python -m mrl.data.prepare_imagenet --source /data/ILSVRC2012 --output /data/imagenet-500

FFCV's loader is fast largely because of what it stores: each image re-encoded once at a capped size. The defaults
are the settings of FFCV's ResNet-50 dataset (libffcv/ffcv-imagenet, README "ResNet-50 training: 50% JPEG 500px side
length"; write_imagenet.py's `--jpeg_quality` default 90, `--write_mode proportion`): the longer side at most 500 px,
JPEG quality 90. FFCV keeps the other half of the images as raw pixels (`--compress_probability 0.5`); here every
image is a JPEG, since raw pixels would make the shards about 5x larger than the source.

Per image (prepared_bytes): a plain JPEG within the cap (RGB or grayscale, complete, not EXIF-rotated:
mrl.batches.decode.is_plain_jpeg) is copied byte for byte -- no second generation of JPEG loss -- after a check that
it decodes; anything else is decoded (EXIF rotation applied, as the loader does), scaled down to the cap when larger
and encoded at the quality, so that every image of the shards takes the decoders' fast path. A file that cannot be
read is left out, counted and named once.

What DIR holds:
- imagenet-train-NNNN.tar, imagenet-validation-NNNN.tar: `<key>.jpg` + `<key>.cls` (the synset's class index, as
  mrl.data.imagenet numbers them). Training samples in a seeded random order, so that every shard mixes the classes
  (the loader's shuffle buffer holds only a few thousand); validation in the source's order. At most --shard_size
  samples a shard, and as many shards as a power of two up to 64, or a multiple of 64 beyond, so that they divide over
  8 to 64 processes (1,024 + 64 for ImageNet-1k, timm/imagenet-1k-wds's numbers);
- _info.json: timm's layout (each split's file names and sample counts), which the loader reads instead of counting,
  with the class list, the settings and what was copied, re-encoded and left out;
- _prepare/: the plan and one record per finished shard. A shard is written as `.partial` and renamed when complete
  (after its record), so a killed run leaves no half-written shard that looks done, and the same command finishes the
  shards it has not written; the result is byte for byte that of an uninterrupted run.
"""

import hashlib
import io
import json
import math
import multiprocessing
import os
import tarfile
import time

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from mrl import UserError
from mrl.batches.decode import EXIF_ORIENTATION, is_plain_jpeg, open_header, read_bytes
from mrl.data import imagenet, shards
from mrl.data.sources import load_splits
from mrl.utils import script

MAX_SIDE, QUALITY = 500, 90  # FFCV's ResNet-50 dataset (see above)
SHARD_SIZE = 1252  # ImageNet-1k's 1,281,167 training images in 1,024 shards, its 50,000 validation images in 64
ORDER_SEED = 0  # the training samples' order across the shards
SPLITS = {"train": "train", "validation": "val"}  # shard name -> Splits attribute
STATE_FOLDER, PLAN_FILE = "_prepare", "plan.json"
PARTIAL = ".partial"


def get_args_parser():
    parser = script.ArgumentParser("python -m mrl.data.prepare_imagenet", description=__doc__)
    parser.add_argument("--source", required=True,
                        help="an ILSVRC folder (train/ and val/, one subfolder per synset) or a local copy of the "
                             "Hub's parquet layout (`hf download ILSVRC/imagenet-1k --repo-type dataset`)")
    parser.add_argument("--output", required=True,
                        help="the folder to write the shards into: new, empty, or an interrupted preparation with the "
                             "same source and settings (which is then finished)")
    parser.add_argument("--max_side", type=int, default=MAX_SIDE,
                        help="longer side cap in px: larger images are scaled down to it (FFCV's ResNet-50 setting)")
    parser.add_argument("--quality", type=int, default=QUALITY,
                        help="JPEG quality of the re-encoded images (FFCV's write_imagenet.py default)")
    parser.add_argument("--shard_size", type=int, default=SHARD_SIZE,
                        help="at most this many samples per shard")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                        help="processes writing shards in parallel (1: in this process)")
    return parser


def prepared_bytes(data, max_side, quality):
    """(the bytes to store, "copied" | "reencoded"), or (None, "unreadable")."""
    image = open_header(data) if data else None
    if image is None:
        return None, "unreadable"
    try:
        if max(image.size) <= max_side and is_plain_jpeg(image, data):
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))  # still reads it all
            image.load()
            return data, "copied"
        turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)  # a quarter turn swaps the sides
        target = capped(image.size, max_side)
        image.draft(image.mode, target)  # a JPEG decodes at the largest 1/2, 1/4, 1/8 scale still >= the target
        image = ImageOps.exif_transpose(image)
        image = image if image.mode in ("RGB", "L") else image.convert("RGB")
        target = target[::-1] if turned else target
        if image.size != target:
            image = image.resize(target, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        return buffer.getvalue(), "reencoded"
    except Exception:  # OSError (truncated), SyntaxError, ValueError... for bad files, as in mrl.batches.decode
        return None, "unreadable"


def capped(size, max_side):
    """(width, height) scaled so that the longer side is at most `max_side`."""
    width, height = size
    if max(width, height) <= max_side:
        return size
    ratio = max_side / max(width, height)
    return max(1, round(width * ratio)), max(1, round(height * ratio))


def shard_sizes(samples, max_size):
    """Samples per shard: at most `max_size` each, spread evenly over a power-of-two number of shards up to 64, or a
    multiple of 64 beyond (never more shards than samples)."""
    count = max(1, math.ceil(samples / max_size))
    count = 1 << (count - 1).bit_length() if count <= 64 else math.ceil(count / 64) * 64
    count = max(1, min(count, samples))
    return [samples // count + (i < samples % count) for i in range(count)]


def sample_keys(split):
    """A key per row of a split: its file name without the extension (a `.` would end a webdataset key), or its row
    number where the source names none; a repeated name gets its row number appended. The names are read from the
    Arrow column, without the images' bytes (the parquet layout holds them all)."""
    paths = [path for chunk in split.data.column("image").chunks for path in chunk.field("path").to_pylist()]
    keys, seen = [], set()
    for row, path in enumerate(paths):
        key = os.path.basename(path or "").split(".")[0] or f"row{row:07d}"
        key = f"{key}_{row}" if key in seen else key
        seen.add(key)
        keys.append(key)
    return keys


def make_plan(splits, max_side, quality, shard_size):
    """Every shard to write: {"name", "split", "rows" (positions in the split), "keys", "labels"}, and the plan's
    digest, which names the source's rows and the settings (a resumed run must find the same)."""
    plan, digest = [], hashlib.sha256(json.dumps([max_side, quality, shard_size]).encode())
    for split, attribute in SPLITS.items():
        data = getattr(splits, attribute)
        keys, labels = sample_keys(data), list(data["label"])
        order = np.random.default_rng(ORDER_SEED).permutation(len(data)) if split == "train" else np.arange(len(data))
        sizes = shard_sizes(len(data), shard_size)
        width, start = max(4, len(str(len(sizes) - 1))), 0
        for n, size in enumerate(sizes):
            rows = [int(i) for i in order[start:start + size]]
            plan.append({"name": f"imagenet-{split}-{n:0{width}d}.tar", "split": split, "rows": rows,
                         "keys": [keys[i] for i in rows], "labels": [int(labels[i]) for i in rows]})
            start += size
        digest.update(json.dumps([split, keys, labels]).encode())
    return plan, digest.hexdigest()


_SPLITS = {}  # in a worker process: the source's splits (set once by _init_worker)


def _init_worker(splits):
    _SPLITS.update(splits)


def write_shard(job):
    """Write one shard: `.partial` first, then its record, then the rename that marks it done. Returns the record."""
    shard, output, max_side, quality = job["shard"], job["output"], job["max_side"], job["quality"]
    cells = _SPLITS[shard["split"]][shard["rows"]]["image"]
    path = os.path.join(output, shard["name"])
    record = {"samples": 0, "copied": 0, "reencoded": 0, "unreadable": [], "source_bytes": 0}
    with open(path + PARTIAL, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, label, cell in zip(shard["keys"], shard["labels"], cells):
                data = read_bytes(cell)
                stored, how = prepared_bytes(data, max_side, quality)
                if stored is None:
                    record["unreadable"].append((cell or {}).get("path") or key)
                    continue
                record["samples"] += 1
                record[how] += 1
                record["source_bytes"] += len(data)
                for suffix, payload in (("jpg", stored), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")  # owner, mode and time fixed: the same bytes every run
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))
        f.flush()
        os.fsync(f.fileno())
    record["bytes"] = os.path.getsize(path + PARTIAL)
    _write_json(os.path.join(output, STATE_FOLDER, shard["name"] + ".json"), record)
    os.replace(path + PARTIAL, path)
    return shard["name"], record


def _write_json(path, value):
    with open(path + PARTIAL, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + PARTIAL, path)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_output(output, plan, digest, settings):
    """The shards already written (name -> record) by an earlier run of the same plan; UserError for a folder that
    holds anything else. Half-written shards (`.partial`) are removed."""
    state = os.path.join(output, STATE_FOLDER)
    os.makedirs(output, exist_ok=True)
    earlier = _read_json(os.path.join(state, PLAN_FILE))
    ours = {s["name"] for s in plan} | {shards.INFO_FILE, STATE_FOLDER}
    others = sorted(e for e in os.listdir(output) if e.removesuffix(PARTIAL) not in ours)
    if others:
        named = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UserError(f"--output {output} holds other files ({named}): prepare into a new or empty folder")
    if earlier is None and set(os.listdir(output)) - {STATE_FOLDER}:
        raise UserError(f"--output {output} holds shards without the plan that wrote them "
                        f"({STATE_FOLDER}/{PLAN_FILE}): prepare into a new or empty folder")
    if earlier is not None and earlier.get("digest") != digest:
        differs = [k for k, v in settings.items() if earlier.get("settings", {}).get(k) != v] or ["the source's images"]
        raise UserError(f"--output {output} holds a preparation with another {', '.join(differs)}: finish it with "
                        "its own command, or prepare into a new folder")
    os.makedirs(state, exist_ok=True)
    _write_json(os.path.join(state, PLAN_FILE), {"digest": digest, "settings": settings})
    done = {}
    for entry in os.listdir(output):
        if entry.endswith(PARTIAL):
            os.remove(os.path.join(output, entry))
        elif entry.endswith(".tar"):
            record = _read_json(os.path.join(state, entry + ".json"))
            if record is not None:
                done[entry] = record
    return done


def prepare(source, output, max_side=MAX_SIDE, quality=QUALITY, shard_size=SHARD_SIZE, num_workers=1, log=print):
    """Write (or finish) the prepared shards of `source` into `output`; returns _info.json's content."""
    if max_side < 1 or not 1 <= quality <= 100 or shard_size < 1:
        raise UserError(f"--max_side {max_side}, --quality {quality}, --shard_size {shard_size}: need a side of at "
                        "least 1 px, a JPEG quality between 1 and 100 and at least one sample per shard")
    if os.path.isdir(source) and shards.is_webdataset(source):
        raise UserError(f"--source {source} holds webdataset shards: prepare from the ILSVRC folder or the parquet "
                        "layout they were made from")
    splits = load_splits("imagenet", source)
    settings = {"source": os.path.abspath(source), "max_side": max_side, "quality": quality, "shard_size": shard_size}
    plan, digest = make_plan(splits, max_side, quality, shard_size)
    done = check_output(output, plan, digest, settings)
    todo = [{"shard": s, "output": output, "max_side": max_side, "quality": quality} for s in plan
            if s["name"] not in done]
    log(f"{source}: {len(splits.train):,} training and {len(splits.val):,} validation images -> {len(plan)} shards "
        f"in {output}, longer side <= {max_side} px, JPEG quality {quality}"
        + (f" ({len(done)} shards written by an earlier run)" if done else ""))
    start, records = time.time(), dict(done)
    progress = tqdm(total=sum(len(s["rows"]) for s in plan), initial=sum(len(s["rows"]) for s in plan
                                                                          if s["name"] in done),
                    unit="img", desc="preparing", dynamic_ncols=True)
    splits_by_name = {split: getattr(splits, attribute) for split, attribute in SPLITS.items()}
    if num_workers <= 1 or len(todo) <= 1:
        _init_worker(splits_by_name)
        finished = map(write_shard, todo)
        pool = None
    else:
        pool = multiprocessing.get_context().Pool(min(num_workers, len(todo)), _init_worker, (splits_by_name,))
        finished = pool.imap_unordered(write_shard, todo)
    try:
        for name, record in finished:
            for path in record["unreadable"]:
                progress.write(f"warning: cannot read {path}: left out")
            records[name] = record
            progress.update(record["samples"] + len(record["unreadable"]))
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    info = summary(plan, records, settings)
    _write_json(os.path.join(output, shards.INFO_FILE), info)
    counts, seconds = info["counts"], time.time() - start
    written = sum(len(job["shard"]["rows"]) for job in todo)
    log(f"{counts['copied']:,} images copied, {counts['reencoded']:,} re-encoded, {counts['unreadable']:,} unreadable "
        f"left out; {_size(counts['bytes'])} of shards from {_size(counts['source_bytes'])} of images "
        f"({counts['bytes'] / max(counts['source_bytes'], 1):.2f}x)"
        + (f"; {written:,} images in {seconds:.0f} s ({written / max(seconds, 1e-9):,.0f} images/s)" if todo else
           "; nothing was left to write"))
    return info


def _size(n):
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.2f} MB"


def summary(plan, records, settings):
    """_info.json: timm's layout of the splits (the loader's counts), the class list and what was done."""
    splits = {}
    for shard in plan:
        split = splits.setdefault(shard["split"], {"name": shard["split"], "filenames": [], "shard_lengths": []})
        split["filenames"].append(shard["name"])
        split["shard_lengths"].append(records[shard["name"]]["samples"])
    for split in splits.values():
        split["num_samples"] = sum(split["shard_lengths"])
    totals = {key: sum(r[key] for r in records.values()) for key in ("copied", "reencoded", "source_bytes", "bytes")}
    unreadable = sorted(path for r in records.values() for path in r["unreadable"])
    return {"splits": splits, "classes": list(imagenet.synsets()), "settings": {**settings, "order_seed": ORDER_SEED},
            "counts": {**totals, "unreadable": len(unreadable)}, "unreadable": unreadable}


def main(args):
    prepare(args.source, args.output, args.max_side, args.quality, args.shard_size, args.num_workers)


if __name__ == "__main__":
    script.run(main, get_args_parser().parse_args())
