"""ImageNet's distribution-shift test sets (ImageNetV2, ImageNet-A, -R, -Sketch) and each Matryoshka head's top-1 on
them: the MRL paper's robustness table.

A set comes from a local folder as it is distributed -- one subfolder per class, named by the synset's WordNet id
(n01440764) or, as ImageNetV2 ships, by the class index 0..999 -- or from the Hub. Labels always come out as indices
into the 1,000 ILSVRC-2012 synsets in sorted order (mrl/data/imagenet_classes/imagenet_synsets.txt), the order an ImageNet
run's heads predict in. ImageNet-A and -R hold 200 of the 1,000 classes: as their authors' evaluation code does, a
head's logits are restricted to those 200 before the argmax, so that a prediction can only name a class that occurs.
"""

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

import datasets
from mrl import UserError
from mrl.data.imagenet import CLASS_LISTS
from mrl.utils import hub_access

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ShiftedSet:
    """Where a test set lives on the Hub and how its copy there writes the labels."""

    title: str
    hub_id: str
    split: str
    label_column: str
    # the Hub copy's labels: "index" (0..999, ILSVRC order), "subset" (0..199, the order of classes_file) or "wnid"
    label_kind: str
    classes_file: str | None = None  # the classes the set covers, when not all 1,000
    revision: str | None = None


# Hub copies with labels (the originals are tar files). Read from their dataset cards, not downloaded here: the
# clip-benchmark ImageNet-A copy is taken to number its 200 classes in WordNet-id order, the order of
# imagenet_a_synsets.txt -- a folder copy (--robustness_path) needs no such assumption.
SHIFTED_SETS = {
    "imagenet_v2": ShiftedSet("ImageNetV2", "clip-benchmark/wds_imagenetv2", "test", "cls", "index"),
    "imagenet_a": ShiftedSet("ImageNet-A", "clip-benchmark/wds_imagenet-a", "test", "cls", "subset",
                             "imagenet_a_synsets.txt"),
    "imagenet_r": ShiftedSet("ImageNet-R", "axiong/imagenet-r", "test", "wnid", "wnid", "imagenet_r_synsets.txt"),
    # the dataset's loading script no longer runs in `datasets` >= 4: its Parquet conversion does
    "imagenet_sketch": ShiftedSet("ImageNet-Sketch", "songweig/imagenet_sketch", "train", "label", "index",
                                  revision="refs/convert/parquet"),
}
NUM_CLASSES = 1000


def read_synsets(name="imagenet_synsets.txt"):
    with open(os.path.join(CLASS_LISTS, name)) as f:
        return [line.strip() for line in f if line.strip()]


def class_subset(name):
    """The ImageNet-1k indices (ascending) of the classes set `name` covers, or None when it covers all 1,000."""
    shifted = SHIFTED_SETS[name]
    if shifted.classes_file is None:
        return None
    index = {wnid: i for i, wnid in enumerate(read_synsets())}
    return torch.tensor(sorted(index[wnid] for wnid in read_synsets(shifted.classes_file)))


def parse_paths(specs):
    """--robustness_path's NAME=DIR items as {name: dir}."""
    paths = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or name not in SHIFTED_SETS or not path:
            raise UserError(f"--robustness_path {spec!r}: expected NAME=DIR with NAME one of {', '.join(SHIFTED_SETS)}")
        paths[name] = path
    return paths


def load_shifted(name, path=None):
    """(dataset, source, version) of set `name`: a Dataset with columns image (undecoded), label (ImageNet-1k index)
    and index, read from the class-folder tree at `path` or from the Hub; where it came from; and a key that changes
    with its contents (for the feature cache)."""
    if path is not None:
        ds, version = _from_folder(name, path)
        return ds, path, version
    shifted = SHIFTED_SETS[name]
    source = shifted.hub_id + (f"@{shifted.revision}" if shifted.revision else "")
    local = f"pass --robustness_path {name}=DIR (one subfolder per class), or set HF_HUB_OFFLINE=1 to use a copy " \
            "already in the Hugging Face cache"
    hub_access.require_hub(f"download {shifted.title} ({source})", hint=local)
    try:
        ds = datasets.load_dataset(shifted.hub_id, split=shifted.split, revision=shifted.revision)
    except Exception as e:  # datasets raises many types for a missing, gated or unreachable repository
        raise UserError(f"could not load {shifted.title} from {source}: {hub_access.one_line(e)}; {local}") from None
    image = next((c for c, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if image is None or shifted.label_column not in ds.column_names:
        raise UserError(f"{source} has no image column or no {shifted.label_column!r} column (columns: "
                        f"{', '.join(ds.column_names)}): pass --robustness_path {name}=DIR")
    labels = _hub_labels(list(ds[shifted.label_column]), name)
    ds = ds.select_columns([image]).rename_columns({image: "image"} if image != "image" else {})
    ds = ds.cast_column("image", datasets.Image(decode=False))
    return ds.add_column("label", labels).add_column("index", np.arange(len(ds))), source, ds._fingerprint


def _hub_labels(values, name):
    """A Hub copy's labels as ImageNet-1k indices."""
    shifted, synsets = SHIFTED_SETS[name], read_synsets()
    if shifted.label_kind == "wnid":
        index = {wnid: i for i, wnid in enumerate(synsets)}
        unknown = sorted({v for v in values if v not in index})
        if unknown:
            raise UserError(f"{shifted.hub_id}: labels that are no ImageNet-1k synset: {', '.join(unknown[:5])}")
        return [index[v] for v in values]
    values = np.asarray(values, dtype=np.int64)
    if shifted.label_kind == "subset":
        subset = class_subset(name)
        if values.min() < 0 or values.max() >= len(subset):
            raise UserError(f"{shifted.hub_id}: labels outside 0..{len(subset) - 1}")
        return subset.numpy()[values].tolist()
    if values.min() < 0 or values.max() >= NUM_CLASSES:
        raise UserError(f"{shifted.hub_id}: labels outside 0..{NUM_CLASSES - 1}")
    return values.tolist()


def _from_folder(name, path):
    """A class-folder tree: subfolders named by WordNet id, or by class index 0..999 (ImageNetV2's layout)."""
    if not os.path.isdir(path):
        raise UserError(f"--robustness_path {name}={path}: no such folder")
    index = {wnid: i for i, wnid in enumerate(read_synsets())}
    index.update({str(i): i for i in range(NUM_CLASSES)})
    folders = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    unknown = [d for d in folders if d not in index]
    if unknown or not folders:
        raise UserError(f"--robustness_path {name}={path}: expected one subfolder per class named by its WordNet id "
                        f"(n01440764) or ImageNet index (0..999), found {', '.join(unknown[:3]) or 'none'}")
    covered = class_subset(name)
    files, labels = [], []
    for folder in folders:
        label = index[folder]
        if covered is not None and label not in covered:
            raise UserError(f"--robustness_path {name}={path}: class {folder} is not one of the 200 classes of "
                            f"{SHIFTED_SETS[name].title}")
        for entry in sorted(os.listdir(os.path.join(path, folder))):
            if entry.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(path, folder, entry))
                labels.append(label)
    if not files:
        raise UserError(f"--robustness_path {name}={path}: no images in its class subfolders")
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64"),
                                  "index": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"image": [{"path": f, "bytes": None} for f in files], "label": labels,
                                     "index": list(range(len(files)))}, features=features)
    return ds, _files_digest(files)


def _files_digest(files):
    """Paths, sizes and modification times of a folder's images: a cache key that changes when a file does."""
    digest = hashlib.sha256()
    for path in files:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def predictions(logits, classes=None):
    """The predicted ImageNet-1k class of each head and image, logits (heads, n, 1000). With `classes` (the indices a
    set covers), the argmax runs over those classes only and is mapped back to its ImageNet-1k index."""
    if classes is None:
        return logits.argmax(-1)
    return classes[logits[..., classes].argmax(-1)]


def restricted_top1(logits, labels, classes=None):
    """Top-1 accuracy of each head, logits (heads, n, 1000) and labels (n,) ImageNet-1k indices, over `classes`."""
    return (predictions(logits, classes) == labels).float().mean(-1).tolist()


def heads_top1(heads, features, labels, name, chunk=4096):
    """Each head's top-1 on set `name` from the backbone's features (n, D). The heads are linear maps of the
    embedding, so they run on the features, in float32 on the CPU, `chunk` rows at a time (all logits of ImageNet-Sketch
    at once would be 9 heads x 50,889 x 1,000 floats, 1.8 GB)."""
    if heads.num_classes != NUM_CLASSES:
        raise UserError(f"the robustness sets need heads over ImageNet-1k's {NUM_CLASSES} classes, got "
                        f"{heads.num_classes}")
    heads, classes, labels = heads.to("cpu").float(), class_subset(name), torch.as_tensor(labels)
    correct = torch.zeros(len(heads.dims), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(labels), chunk):
            logits = heads(torch.as_tensor(features[start:start + chunk]).float())
            correct += (predictions(logits, classes) == labels[start:start + chunk]).sum(-1)
    return (correct / len(labels)).tolist()
