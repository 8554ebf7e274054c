"""The command-line vocabulary shared by train_supervised.py, train_ssl.py and evaluate.py.

The number of processes and machines are not flags here: they come from the launcher (`torchrun`, `accelerate
launch` and the files in accelerate_configs/). Mixed precision is both: --mixed_precision, as in Accelerate's own
example scripts, for runs started with `python` or torchrun, and otherwise what `accelerate launch` says.
"""

import argparse
import netrc
import os
import shutil
import sys
from urllib.parse import urlparse

from mrl import UserError
from mrl.data import PRESETS
from mrl.decode import DECODERS
from mrl.guards import PREEMPTED_EXIT_CODE, PREEMPTED_MARKER, Preempted
from mrl.models import BACKBONES, NORMS
from mrl.tracking import FLUSHED_FILE


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default, except where the help text already says what it is or there is none."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def parse_dims(text):
    """`--dims 8,16,32` or `--dims 8 16 32`."""
    try:
        return [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"dims must be integers, got {text!r}") from None


def flat_dims(dims):
    return None if dims is None else [d for group in dims for d in group]


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
    return group


def add_run_args(parser, default_epochs):
    group = parser.add_argument_group("run, checkpoints and logging")
    group.add_argument("--epochs", type=int, default=default_epochs, help="training epochs")
    group.add_argument("--output_dir", default=None,
                       help="where the model, metrics, plots and checkpoints go (default: runs/<variant>_<dataset>_<model>, e.g. "
                            "runs/supervised_mrl-e_cifar10_resnet18, runs/ssl_relic_cifar10_resnet18)")
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


def resolve_hub_args(args):
    """Check the Hub flags at the start, not after hours of training."""
    if not args.push_to_hub:
        given = [f"--{name}" for name in ("hub_model_id", "hub_private", "hub_push_checkpoints") if getattr(args, name)]
        if given:
            raise UserError(f"{', '.join(given)} need --push_to_hub")
        return
    from huggingface_hub import get_token

    if not get_token():
        raise UserError("--push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


def resolve_run_args(args, variant):
    """Fill defaults that depend on other flags, and check what argparse cannot. `variant` names what is trained
    (supervised_mrl, ssl_relic, ...): the default --output_dir differs for every variant, dataset (and folder) and
    model, and is the same for the same command, so a relaunch finds its checkpoints."""
    resolve_report_to(args)
    if args.output_dir is None:
        dataset = args.dataset
        if args.dataset == "custom" and args.dataset_path:
            dataset += "-" + os.path.basename(os.path.normpath(args.dataset_path))
        args.output_dir = os.path.join("runs", f"{variant}_{dataset}_{model_slug(args)}")
    if args.checkpointing_steps != "epoch" and not args.checkpointing_steps.isdigit():
        raise UserError(f"--checkpointing_steps must be 'epoch' or a number, got {args.checkpointing_steps!r}")
    if not 0 <= args.seed < 2**32:  # numpy's generators (splits, shuffles) take 32-bit seeds
        raise UserError(f"--seed must be in 0..{2**32 - 1}, got {args.seed}")
    for name in ("epochs", "batch_size"):
        value = getattr(args, name, None)  # None: not set yet (a recipe fills it)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1")
    if not 0 <= args.test_fraction < 1 or not 0 < args.val_fraction < 1 or args.val_fraction + args.test_fraction >= 1:
        raise UserError("--val_fraction must be in (0, 1), --test_fraction in [0, 1), and their sum below 1")
    if hasattr(args, "push_to_hub"):
        resolve_hub_args(args)


def model_slug(args):
    """--model as part of a folder name: timm/<name> and hf-hub:<user>/<repo> without their slashes, a folder by its
    name; `-pretrained` for a pretrained start (a fine-tuned run and one from scratch do not share a folder)."""
    name = args.model.rstrip("/")
    name = os.path.basename(name) if os.path.isdir(name) else name.replace("hf-hub:", "").replace("/", "-")
    return name + ("-pretrained" if getattr(args, "pretrained", False) else "")


def resolve_report_to(args):
    """--report_to auto -> wandb when W&B can log without asking anything, else none. An explicit --report_to wandb
    that W&B would answer with its interactive login prompt (which waits forever, or fails without a terminal)
    is refused here, before any work is done."""
    if args.report_to == "auto":
        args.report_to = "wandb" if wandb_configured() else "none"
    elif args.report_to == "wandb" and not wandb_configured():
        raise UserError("--report_to wandb, but W&B is not logged in on this machine: run `wandb login` (or set "
                        "WANDB_API_KEY), or set WANDB_MODE=offline to log locally and `wandb sync` later")


def wandb_configured():
    """Whether W&B can start a run without prompting: offline or disabled mode, an API key in the environment, or
    a login saved in the netrc file (what `wandb login` writes)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# What a run writes into its --output_dir: all of it goes when --overwrite replaces the run (and nothing else there).
RUN_OUTPUTS = ("checkpoints", "eval", "features", "model.safetensors", "config.json", "metrics.json", "README.md",
               PREEMPTED_MARKER, FLUSHED_FILE, "accuracy_vs_dim.png", "pca_val.png", "knn_accuracy_vs_dim.png")


def check_output_dir(args, resuming, is_main):
    """Refuse to write a new run over a finished one or over checkpoints, unless asked to (--overwrite then
    removes everything the old run wrote, so that neither a later 'latest' nor a reader of eval/ picks up a part
    of it). A preemption marker left by the previous start is removed: this start decides anew."""
    taken = [p for p in ("config.json", "checkpoints") if os.path.exists(os.path.join(args.output_dir, p))]
    # a relaunch with 'latest' of a run that stopped before its first checkpoint (only config.json): start it anew
    never_saved = taken == ["config.json"] and not os.path.exists(os.path.join(args.output_dir, "model.safetensors"))
    if taken and not resuming and not (never_saved and args.resume_from_checkpoint == "latest"):
        if not args.overwrite:
            raise UserError(f"--output_dir {args.output_dir} already holds a run ({', '.join(taken)}); pass "
                            "--resume_from_checkpoint latest to continue it, --overwrite to replace it, or another "
                            "--output_dir")
        if is_main:
            for name in RUN_OUTPUTS:
                path = os.path.join(args.output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --output_dir {args.output_dir}: {e.strerror}") from None
    if not os.access(args.output_dir, os.W_OK):
        raise UserError(f"--output_dir {args.output_dir} is not writable")
    marker = os.path.join(args.output_dir, PREEMPTED_MARKER)
    if is_main and os.path.exists(marker):
        os.remove(marker)


def run(main, args):
    """Call main(args); a UserError becomes one line on stderr and exit status 1, not a traceback, a preempted run
    exits with PREEMPTED_EXIT_CODE after its checkpoint is saved, and a Ctrl-C before training starts (when the
    training scripts begin to handle it themselves) exits with 130, also without a traceback."""
    try:
        main(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":  # once per run, not once per process
            print(f"\npreempted: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
