"""The dataset presets: for each `--dataset` name, where its data lives, its image size and normalization, its
training augmentation and default backbone. A new dataset is one entry of PRESETS."""

from dataclasses import dataclass

from mrl import UserError
from mrl.data import imagenet

HALF = (0.5, 0.5, 0.5)  # the blog's normalization: [0, 1] -> [-1, 1]
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STL10_STATS = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))


@dataclass(frozen=True)
class Preset:
    """What a dataset needs besides its rows: where it lives, its image size and statistics, and defaults."""

    hub_id: str | None
    image_size: int
    mean: tuple
    std: tuple
    augment: str  # train-time augmentation, see mrl.batches.transforms.build_transform
    model: str  # default backbone
    min_image_size: int = 0  # images smaller than this on either side are dropped
    label_column: str | None = None  # preferred label column where a dataset has several
    # The source's own train and validation splits are the splits, nothing is carved out of train and there is no
    # test split (ImageNet: its validation set is the benchmark the papers report; its test labels are not public).
    source_splits: bool = False


PRESETS = {
    # The blog: microsoft/cats_vs_dogs resized to 256x256, in [-1, 1], flip + 3x3 blur, images < 100 px dropped.
    "cats_vs_dogs": Preset("microsoft/cats_vs_dogs", 256, HALF, HALF, "blog", "cnn4", min_image_size=100),
    "cifar10": Preset("uoft-cs/cifar10", 32, *CIFAR10_STATS, "crop_flip", "resnet18"),
    "cifar100": Preset("uoft-cs/cifar100", 32, *CIFAR100_STATS, "crop_flip", "resnet18", label_column="fine_label"),
    # STL-10 at 96x96: 5k labeled train and 8k test images, plus the 100k-image `unlabeled` split (Splits.unlabeled)
    # that self-supervised pre-training adds to train.
    "stl10": Preset("jxie/stl10", 96, *STL10_STATS, "crop_flip", "resnet18"),
    # scikit-learn's 8x8 handwritten digits, shipped inside the package: offline, for quick runs and tests.
    # Flips would turn digits into other shapes, so only shifts.
    "digits": Preset(None, 16, HALF, HALF, "crop", "resnet18"),
    # ILSVRC-2012 (ImageNet-1k), the MRL paper's experiment: 1,000 classes indexed in synset order whatever the source
    # (mrl/imagenet_classes/imagenet_synsets.txt); evaluation at Resize 256 -> CenterCrop 224 (resized_crop_flip's eval).
    # Sources: the Hub (gated), a local ILSVRC folder (train/ and val/, one subfolder per synset), a copy in the Hub's
    # parquet layout, or webdataset shards (streamed: mrl.data.shards).
    "imagenet": Preset(imagenet.HUB_ID, 224, *IMAGENET_STATS, "resized_crop_flip", "resnet50", source_splits=True),
    # Anything local: a Hub-layout copy, a `save_to_disk` folder or an image folder (one subfolder per class).
    "custom": Preset(None, 224, *IMAGENET_STATS, "resized_crop_flip", "resnet18"),
}


def get_preset(name):
    if name not in PRESETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]
