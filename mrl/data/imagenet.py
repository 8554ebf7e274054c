"""ImageNet-1k (ILSVRC-2012) as map-style datasets, with one class index whatever the source: the position of the
class's synset id (n01440764, ...) in mrl/data/imagenet_classes/imagenet_synsets.txt, the sorted order torchvision, timm
and the Hub's ILSVRC/imagenet-1k all use. The class names are the synset ids.

Two map-style sources (webdataset shards are mrl.data.shards'):
- a local ILSVRC folder: DIR/train/<synset>/*.JPEG and DIR/val/<synset>/*.JPEG. A folder holding only some synsets
  keeps their indices among the 1,000 (datasets' imagefolder would renumber them 0..k-1);
- the Hub's parquet layout (ILSVRC/imagenet-1k itself, or a local copy of it): labels already 0..999 in synset order.
"""

import os
import re
from functools import lru_cache

import datasets
from mrl import UserError

HUB_ID = "ILSVRC/imagenet-1k"
CLASS_LISTS = os.path.join(os.path.dirname(__file__), "imagenet_classes")  # the synset lists, one id per line
SYNSETS_FILE = os.path.join(CLASS_LISTS, "imagenet_synsets.txt")
VAL_FOLDERS = ("val", "validation")
SYNSET_ID = re.compile(r"n\d{8}")


@lru_cache(maxsize=1)
def synsets():
    """The 1,000 ILSVRC synset ids; a class's index is its position here."""
    with open(SYNSETS_FILE) as f:
        return tuple(line.strip() for line in f if line.strip())


def class_label():
    return datasets.ClassLabel(names=list(synsets()))


def is_ilsvrc_folder(path):
    """Whether `path` is an ILSVRC folder (train/ with one subfolder per synset), not a parquet or save_to_disk copy."""
    train = os.path.join(path, "train")
    return os.path.isdir(train) and any(SYNSET_ID.fullmatch(entry.name) and entry.is_dir()
                                        for entry in os.scandir(train))


def folder_splits(path):
    """An ILSVRC folder's train and validation splits: columns image (path only, undecoded) and label (the synset's
    index). A folder name that is not a synset id, an empty class folder, or a val/ that holds files instead of
    synset folders (ILSVRC's own flat layout) is a UserError."""
    val = next((os.path.join(path, name) for name in VAL_FOLDERS if os.path.isdir(os.path.join(path, name))), None)
    if val is None:
        raise UserError(f"--dataset_path {path} has train/ but no val/: ImageNet's validation images are expected in "
                        "val/, one subfolder per synset")
    return {"train": _class_folders(os.path.join(path, "train")), "validation": _class_folders(val)}


def _class_folders(root):
    index = {synset: i for i, synset in enumerate(synsets())}
    images, labels = [], []
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    loose = [e.name for e in entries if e.is_file() and not e.name.startswith(".")]
    if loose:
        raise UserError(f"{root} holds image files ({loose[0]}, ...) instead of one subfolder per synset: sort them "
                        "into synset folders (ILSVRC's validation images come flat; their synsets are in its devkit)")
    for entry in entries:
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        if entry.name not in index:
            raise UserError(f"{entry.path} is not an ImageNet class folder: folder names must be the synset ids of "
                            f"{os.path.relpath(SYNSETS_FILE)} (n01440764, ...)")
        files = sorted(f.path for f in os.scandir(entry.path) if f.is_file() and not f.name.startswith("."))
        if not files:
            raise UserError(f"the class folder {entry.path} is empty: remove it or put its images back")
        images += [{"bytes": None, "path": f} for f in files]
        labels += [index[entry.name]] * len(files)
    if not images:
        raise UserError(f"{root} has no synset folders")
    features = datasets.Features({"image": datasets.Image(decode=False), "label": class_label()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def synset_labels(splits):
    """The Hub layout's splits with labels as synset indices: a ClassLabel whose names are synset ids is mapped by
    name (a subset keeps its indices), other labels must already be indices 0..999 (the Hub's ClassLabel holds the
    classes' English names in synset order). Its test split (labels -1: not public) is left out."""
    splits = {name: ds for name, ds in splits.items() if name != "test"}
    index = {synset: i for i, synset in enumerate(synsets())}
    result = {}
    for name, ds in splits.items():
        label = next((c for c in ("label", "labels") if c in ds.column_names), None)
        if label is None:
            raise UserError(f"the ImageNet {name} split has no label column (columns: {', '.join(ds.column_names)})")
        feature = ds.features[label]
        by_name = isinstance(feature, datasets.ClassLabel) and all(n in index for n in feature.names)
        classes = len(feature.names) if by_name else len(index)
        bad = sorted(v for v in ds.unique(label) if not (isinstance(v, int) and 0 <= v < classes))
        if bad:
            raise UserError(f"the ImageNet {name} split has labels outside the 1,000 classes ({bad[0]!r}"
                            f"{', ...' if len(bad) > 1 else ''}): labels must be class indices 0..999 in synset "
                            "order, or a ClassLabel of synset ids")
        mapping = [index[n] for n in feature.names] if by_name else None
        if mapping is not None and mapping != list(range(len(mapping))):  # a subset of the classes, or reordered
            ds = ds.map(lambda b: {label: [mapping[v] for v in b[label]]}, batched=True,
                        features=datasets.Features({**ds.features, label: datasets.Value("int64")}),
                        desc=f"synset indices of {name}")
        result[name] = ds.cast_column(label, class_label())
    return result


def hub_access_error(error, repo_id=HUB_ID):
    """The one line that says why a gated Hub dataset could not be read, or None when `error` is not about access:
    no token (401) or a token whose account has not accepted the dataset's terms (403). datasets wraps
    huggingface_hub's GatedRepoError in a DatasetNotFoundError, so the whole chain of causes is searched."""
    seen = error
    while seen is not None:
        response = getattr(seen, "response", None)
        status = getattr(response, "status_code", None)
        text = str(seen)
        if status == 401 or "must be authenticated" in text:
            return (f"{repo_id} is gated and no valid Hugging Face token was sent: log in with `hf auth login` (or "
                    f"set HF_TOKEN), after accepting its terms at https://huggingface.co/datasets/{repo_id}")
        if status == 403 or "ask for access" in text:
            return (f"your Hugging Face account has no access to the gated {repo_id}: accept the terms at "
                    f"https://huggingface.co/datasets/{repo_id}")
        seen = seen.__cause__ or seen.__context__
    return None
