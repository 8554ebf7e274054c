"""The command-line vocabulary the scripts share: the data, model, run, W&B, Hub and optimization flags.

The number of processes and machines are not flags here: they come from the launcher (`torchrun`, `accelerate
launch` and the files in accelerate_configs/). Mixed precision is both: --mixed_precision, as in Accelerate's own
example scripts, for runs started with `python` or torchrun, and otherwise what `accelerate launch` says.
"""

import os

from mrl.batches.decode import DECODERS
from mrl.data.presets import PRESETS
from mrl.matryoshka import parse_dims
from mrl.models.backbones import BACKBONES, NORMS


def add_data_args(parser, default_dataset):
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=default_dataset, choices=list(PRESETS),
                       help="dataset preset: where the data lives, image size, normalization, augmentation and the "
                            "default model. 'custom' is any local folder given by --dataset_path")
    group.add_argument("--dataset_path", default=None,
                       help="load from this local folder instead of the Hub: a copy in the Hub's parquet layout, a "
                            "save_to_disk folder, or an image folder with one subfolder per class")
    group.add_argument("--image_size", type=int, default=None, help="square input side in px (default: the preset's)")
    group.add_argument("--val_fraction", type=float, default=0.1,
                       help="validation share of the train split, stratified (when the source has no validation split)")
    group.add_argument("--test_fraction", type=float, default=0.1,
                       help="test share carved from train when the source has no test split (cats_vs_dogs, digits). "
                            "The blog had no test set: 0 reproduces its 90/10 train/validation split")
    group.add_argument("--min_image_size", type=int, default=None,
                       help="drop images smaller than this on either side (default: the preset's; 100 for cats_vs_dogs "
                            "as in the blog, 0 elsewhere)")
    group.add_argument("--max_train_samples", type=int, default=None, help="use a random subset of the train split")
    group.add_argument("--max_eval_samples", type=int, default=None, help="cap the validation and test splits")
    group.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="DataLoader worker processes per training process")
    group.add_argument("--decoder", default="torchcodec", choices=DECODERS,
                       help="what decodes the JPEGs in the DataLoader workers: torchcodec (libjpeg-turbo, the decoded "
                            "tensor goes straight to the crop; 1.3-1.6x PIL's images/s per core, benchmarks/README.md) "
                            "or pil. PIL decodes what the fast path leaves to it (PNG, CMYK, EXIF-rotated, truncated "
                            "files) either way")
    group.add_argument("--shuffle_buffer", type=int, default=2000,
                       help="webdataset shards (streamed): samples each DataLoader worker holds to shuffle from, on "
                            "top of the shards' own shuffled order. Shards written class by class need far more")
    return group


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, metavar="{" + ",".join(BACKBONES) + ",timm/NAME,hf-hub:REPO,DIR}",
                       help="backbone (default: the dataset preset's; cnn4 is the blog's 4-conv CNN, which has no "
                            "nonlinearity; cnn4_bn adds BatchNorm + ReLU). Also any timm model: timm/<name> (e.g. "
                            "timm/convnext_tiny.fb_in22k, timm/vit_small_patch14_dinov2.lvd142m), "
                            "hf-hub:<user>/<repo>, or a folder holding one in the Hub's layout; its embedding is its "
                            "pooled feature, its resolution, normalization and eval crop are used unless --image_size "
                            "says otherwise")
    group.add_argument("--pretrained", action="store_true",
                       help="start from the backbone's pretrained weights: the timm model's (from the Hub or its "
                            "folder), or torchvision's ImageNet weights for resnet18/34/50 (DEFAULT, with their "
                            "preprocessing). train_supervised.py then defaults to its fine-tuning recipe")
    group.add_argument("--embed_dim", type=int, default=None, metavar="D",
                       help="a linear layer from the backbone's pooled feature to D dims, the embedding the "
                            "Matryoshka dims are prefixes of (default: none, the pooled feature itself)")
    group.add_argument("--cifar_stem", default="auto", choices=("auto", "on", "off"),
                       help="ResNets: 3x3 stride-1 first conv without max-pool; auto = on for images under 64 px")
    group.add_argument("--norm", default="batch", choices=tuple(NORMS),
                       help="ResNets' normalization: batch = BatchNorm (torchvision, the references); group = "
                            "GroupNorm (32 groups), per image: a run on N processes then computes exactly what it "
                            "computes on one, without --sync_bn")
    group.add_argument("--dims", type=parse_dims, nargs="+", default=None,
                       help="nested prefix sizes, e.g. 8,16,32 (default: powers of two from 8 up to the embedding dim)")
    group.add_argument("--dim_weights", default="uniform",
                       help="the loss weight of each dim: 'uniform' (the blog, mrl-pytorch and the MRL paper) or "
                            "comma-separated numbers, one per --dims entry in the order given")
    return group


def add_run_args(parser, default_epochs):
    group = parser.add_argument_group("run, checkpoints and logging")
    group.add_argument("--epochs", type=int, default=default_epochs, help="training epochs")
    group.add_argument("--output_dir", default=None,
                       help="where the model, metrics, plots and checkpoints go (default: runs/<variant>_<dataset>_<model>, e.g. "
                            "runs/supervised_mrl-e_cifar10_resnet18, runs/ssl_relic_cifar10_resnet18; when that "
                            "holds a run, a new one beside it: ..._2, ..._3; with --resume_from_checkpoint latest, "
                            "the newest of them)")
    group.add_argument("--overwrite", action="store_true",
                       help="allow writing into an --output_dir that already holds a finished run or checkpoints")
    group.add_argument("--resume_from_checkpoint", default=None,
                       help="a checkpoint folder, or 'latest' for the newest in --output_dir/checkpoints (starts "
                            "fresh when there is none, so a preempted job can be relaunched unchanged)")
    group.add_argument("--checkpointing_steps", default="epoch",
                       help="save a resumable checkpoint every N optimizer steps, or 'epoch'")
    group.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep only the newest N checkpoints")
    group.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                       help="autocast precision (default: what `accelerate launch` or ACCELERATE_MIXED_PRECISION "
                            "sets, else no): bf16 on recent GPUs (A100, H100, RTX 30xx+), fp16 on older ones")
    add_wandb_args(group, "the output folder's name and the start time, e.g. "
                          "supervised_mrl_cifar10_resnet18-1127-090512; a resumed run keeps its name")
    group.add_argument("--log_every", type=int, default=10,
                       help="log the train loss, gradient norm and throughput every N optimizer steps")
    group.add_argument("--seed", type=int, default=0, help="seed for splits, initialization, shuffling and augmentation")
    return group


def add_wandb_args(group, default_name):
    """--report_to and the W&B run's project, name, tags, group and job type (the entity: WANDB_ENTITY)."""
    group.add_argument("--report_to", default="auto", choices=("auto", "wandb", "none"),
                       help="where to log; auto = W&B when it is configured (logged in, WANDB_API_KEY or "
                            "WANDB_MODE set)")
    group.add_argument("--wandb_project", default="matryoshka",
                       help="W&B project: put the runs to compare into one (MRL, baseline, MRL-E, their evaluations)")
    group.add_argument("--run_name", default=None, help=f"W&B run name (default: {default_name})")
    group.add_argument("--wandb_tags", nargs="+", default=None, help="W&B run tags, e.g. --wandb_tags cifar10 sweep-3")
    group.add_argument("--wandb_group", default=None,
                       help="W&B run group, e.g. one per experiment: the project's pages show a group's runs together")
    group.add_argument("--wandb_job_type", default=None,
                       help="W&B job type (default: train for the training scripts, eval for evaluate.py)")
    return group


def add_hub_args(parser):
    """--push_to_hub and its companions, named as in the transformers / accelerate example scripts."""
    group = parser.add_argument_group("sharing on the Hugging Face Hub")
    group.add_argument("--push_to_hub", action="store_true",
                       help="at the end of training, upload the model (model.safetensors, config.json), its model card "
                            "(README.md) with metrics and plots to a model repo on the Hub. Needs a token: `hf auth "
                            "login` or HF_TOKEN (there is no token flag: it would be saved in config.json)")
    group.add_argument("--hub_model_id", default=None,
                       help="the repo, 'user/name' or 'org/name'. Default: the --output_dir folder's name, under the "
                            "token's user")
    group.add_argument("--hub_private", action="store_true",
                       help="create the repo private (without it, a new repo gets the account's default visibility)")
    group.add_argument("--hub_push_checkpoints", action="store_true",
                       help="also upload each resumable checkpoint as it is saved, in the background, to checkpoints/ "
                            "in the repo (replacing the previous one), so a preempted run can resume elsewhere")
    return group




# The optimization flags both training scripts take, declared once: each one's type and what it means. A script gives
# its defaults (its reference's recipe), the choices it offers, and what it says beyond the common meaning.
OPTIMIZATION_FLAGS = {
    "batch_size": (int, "images per forward pass, summed over all processes (split evenly among them)"),
    "grad_accum_steps": (int, "forward passes per optimizer step"),
    "optimizer": (str, "the optimizer"),
    "lr": (float, "peak learning rate"),
    "backbone_lr_scale": (float, "the backbone's network learns at this times the learning rate of what is new"),
    "weight_decay": (float, "weight decay"),
    "lr_schedule": (str, "the learning rate per optimizer step"),
    "warmup_epochs": (float, "linear warmup to --lr over this many epochs"),
    "max_grad_norm": (float, "clip the gradient norm at every optimizer step (0: off)"),
    "memory_format": (str, "weight and activation layout: channels_last runs convolutions faster on recent GPUs "
                           "(bf16/fp16) and on CPUs with oneDNN; contiguous is PyTorch's default"),
}


def add_optimization_args(group, defaults, choices, notes):
    """OPTIMIZATION_FLAGS and --sync_bn in `group`; `defaults` gives every flag's default (None: the script fills it
    later, from a recipe), `choices` a flag's accepted values, `notes` what a flag's help adds (its defaults, its
    reference)."""
    choices = {"memory_format": ("contiguous", "channels_last"), **choices}
    for name, (kind, meaning) in OPTIMIZATION_FLAGS.items():
        note = notes.get(name)
        group.add_argument(f"--{name}", type=None if kind is str else kind, default=defaults[name],
                           choices=choices.get(name), help=f"{meaning}{f'. {note}' if note else ''}")
    group.add_argument("--sync_bn", action="store_true",
                       help="multi-GPU: BatchNorm statistics over the global batch (SyncBatchNorm), so that a run on "
                            "N GPUs normalizes like one on a single GPU")
