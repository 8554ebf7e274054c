"""A training run's bookkeeping, the same in both training scripts: the preamble (the dataset preset's defaults, the
Accelerator, the output folder), the data loaders, the state a checkpoint saves and a resume restores, the epochs
and their checkpoints, the W&B run and config.json at the start, and the end (artifact, tracking, Hub).

Each script's main calls these in order and keeps what is its own: the model, the loss and the evaluation.
"""

import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from accelerate import PartialState
from accelerate.utils import DataLoaderConfiguration, set_seed

from mrl import UserError
from mrl.batches.streams import StreamLoader
from mrl.batches.transforms import Collate, FillUnreadable
from mrl.data.presets import get_preset
from mrl.data.shards import ShardedStream
from mrl.data.sources import load_splits
from mrl.models.backbones import BACKBONES
from mrl.models.pretrained_backbones import is_external, resolve_backbone, with_preprocessing
from mrl.report.tracking import finish_tracking, init_tracking, log_model_artifact, resolve_report_to, wandb_info
from mrl.run_folder.config import write_config
from mrl.run_folder.layout import CHECKPOINTS, CONFIG_FILE, MODEL_FILE, PREEMPTED_MARKER, RUN_OUTPUTS
from mrl.train.checkpoint import TrainState, load_checkpoint, resolve_checkpoint, save_checkpoint
from mrl.train.guards import Preemption
from mrl.train.publish import publish_run, resolve_hub_args
from mrl.utils.distributed import make_accelerator
from mrl.utils.script import ignore_signals_in_worker


@dataclass
class Run:
    """What the training loop needs beyond the model: the flags, the Accelerator, where the run is (`state`, saved
    in every checkpoint), the preemption watch, and what runs after each saved checkpoint (`after_save`: the Hub
    upload of --hub_push_checkpoints, or None)."""
    args: object
    accelerator: object
    preemption: Preemption
    state: TrainState
    after_save: Optional[Callable[[str], None]] = None

    def save_checkpoint(self):
        return save_checkpoint(self.accelerator, self.args.output_dir, self.state.step,
                               self.args.checkpoints_total_limit, self.after_save)

    def epochs(self):
        """The epochs still to train; after each (the loop body: training and evaluation) the position moves to
        the next epoch's start and, with --checkpointing_steps epoch, a checkpoint is saved."""
        for epoch in range(self.state.epoch, self.args.epochs):
            yield epoch
            self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
            if self.args.checkpointing_steps == "epoch":
                self.save_checkpoint()

    def resume(self):
        """Register the state with the Accelerator (after `accelerator.prepare`) and restore the checkpoint
        --resume_from_checkpoint names, if any."""
        self.accelerator.register_for_checkpointing(self.state)
        resumed = load_checkpoint(self.accelerator, self.args.output_dir, self.args.resume_from_checkpoint)
        if resumed:
            self.accelerator.print(f"resumed from {resumed}: epoch {self.state.epoch}, step {self.state.step}, "
                                   f"batch {self.state.batch_in_epoch}")
        elif self.args.resume_from_checkpoint == "latest":
            self.accelerator.print(f"no checkpoint in {os.path.join(self.args.output_dir, CHECKPOINTS)}: starting "
                                   "from step 0")


def resolve_preset(args, variant, augment=None):
    """(preset, source): the dataset preset, with its model and image size filled in where the flags leave them, and
    the flags that depend on others resolved (`variant` names the run's default --output_dir; see
    resolve_run_args). A timm model, or a ResNet with --pretrained, brings its own resolution and normalization:
    the preset then carries its mean/std (and `augment`, the training augmentation for it), and `source` its timm
    spec and preprocessing (mrl.models.pretrained_backbones.resolve_backbone)."""
    preset = get_preset(args.dataset)
    args.model = args.model or preset.model
    if not is_external(args.model) and args.model not in BACKBONES:
        raise UserError(f"unknown --model {args.model!r}; choose one of: {', '.join(BACKBONES)}, timm/<name>, "
                        "hf-hub:<user>/<repo> (a timm model on the Hub) or a folder holding a timm model")
    source = resolve_backbone(args.model, args.pretrained, args.image_size)
    if source.preprocessing is not None:
        preset = with_preprocessing(preset, source.preprocessing, augment)
        args.image_size = source.preprocessing["image_size"]
    args.image_size = args.image_size or preset.image_size
    resolve_run_args(args, variant)
    return preset, source


def start_run(args, after_save=None, mixed_precision=None):
    """The Accelerator, the preemption watch and the output folder checked (a new run, or one to resume)."""
    accelerator = build_accelerator(args, mixed_precision)
    preemption = Preemption(accelerator)
    resuming = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint) is not None
    check_output_dir(args, resuming=resuming, is_main=accelerator.is_main_process)
    return Run(args, accelerator, preemption, TrainState(), after_save)


def build_accelerator(args, mixed_precision=None):
    """The Accelerator both training scripts run under, after checking that --batch_size splits evenly over the
    processes; seeds every RNG with --seed. Mixed precision: `mixed_precision` if given, else --mixed_precision, else
    what `accelerate launch` (its flags or config file) or ACCELERATE_MIXED_PRECISION says (default: none).

    split_batches: --batch_size is the global batch, so a run means the same thing on 1 or 8 processes. The seedable
    sampler makes each epoch's order a function of (seed, epoch), which exact resume relies on. non_blocking: batches
    are copied from pinned memory without making the host wait for the copy (and for the steps queued before it).
    """
    try:
        accelerator = make_accelerator(
            find_unused_parameters=bool(getattr(args, "freeze_backbone_epochs", 0)),  # frozen epochs: no gradients
            gradient_accumulation_steps=args.grad_accum_steps,
            mixed_precision=mixed_precision or getattr(args, "mixed_precision", None),
            log_with="wandb" if args.report_to == "wandb" else None,
            dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True,
                                                      data_seed=args.seed, non_blocking=True))
    except ValueError as e:  # what Accelerate refuses, e.g. fp16 on a CPU: one line, not its traceback
        raise UserError(f"Accelerate: {e}") from None
    if args.batch_size % accelerator.num_processes:
        raise UserError(f"--batch_size {args.batch_size} cannot be split evenly over {accelerator.num_processes} processes")
    set_seed(args.seed)
    return accelerator


def load_data(run, streams=False):
    """The run's splits (train / validation / test, and STL-10's unlabeled), prepared by the main process first so
    that the others read its cache. `streams`: whether the script can train on webdataset shards (streamed)."""
    args, start = run.args, time.perf_counter()
    with run.accelerator.main_process_first():
        splits = load_splits(args.dataset, args.dataset_path, seed=args.seed, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction, max_train_samples=args.max_train_samples,
                             max_eval_samples=args.max_eval_samples, min_image_size=args.min_image_size)
    run.accelerator.print(f"{args.dataset}: splits ready in {time.perf_counter() - start:.1f} s")
    if isinstance(splits.train, ShardedStream) and not streams:
        raise UserError(f"--dataset_path {args.dataset_path} holds webdataset shards, which only train_supervised.py "
                        "streams; give this script a map-style copy (an ILSVRC folder or the Hub's parquet layout)")
    return splits


def data_loader(args, dataset, batch_size, train, collate_fn=None):
    """A DataLoader over `dataset` with unreadable images filled in (training) or masked (evaluation).

    Training batches are whole: on N processes Accelerate would pad an epoch's last, incomplete batch with images
    repeated from its start, so that step would not be the one a single process takes (an epoch leaves out fewer
    than --batch_size images, others each epoch); a contrastive loss also compares within a batch. `collate_fn`:
    instead of transforms.Collate (--decode_on_device's EncodedCollate).

    Webdataset shards (mrl.data.shards.ShardedStream) get a StreamLoader instead: it splits the shards over the processes
    itself, so `accelerator.prepare` passes it through untouched."""
    if isinstance(dataset, ShardedStream):
        state = PartialState()
        loader = StreamLoader(dataset, batch_size, train=train, seed=args.seed, num_workers=args.num_workers,
                              num_processes=state.num_processes, process_index=state.process_index,
                              device=state.device, shuffle_buffer=args.shuffle_buffer, log=state.print)
        state.print(f"{'training' if train else 'evaluation'} stream: {loader.describe()}")
        if train:
            check_one_batch(loader, len(dataset), batch_size)
        return loader
    loader = torch.utils.data.DataLoader(
        FillUnreadable(dataset, evaluation=not train), batch_size=batch_size, shuffle=train, drop_last=train,
        num_workers=args.num_workers, collate_fn=collate_fn or Collate(), pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_signals_in_worker)
    if train:
        check_one_batch(loader, len(dataset), batch_size)
    return loader


def check_one_batch(loader, images, batch_size):
    """A training loader of whole batches must hold one at least."""
    if len(loader) == 0:
        raise UserError(f"{images} training images are fewer than one batch of --batch_size {batch_size}")


def steps_per_epoch(args, train_loader):
    """Optimizer steps per epoch: an epoch ends with a step even when its last accumulation group is incomplete."""
    return math.ceil(len(train_loader) / args.grad_accum_steps)


def start_tracking(run, derived, config, relog):
    """Start the W&B run (or continue its page on resume) with the flags and what the code `derived` from them, and
    write config.json now, not only at the end: the run's checkpoints can be evaluated with it. Returns the config
    with the W&B run's coordinates. `relog`: what a history row logs, for a resumed run to log again."""
    accelerator = run.accelerator
    init_tracking(accelerator, run.args, run.state, {
        **vars(run.args), **derived, "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision}, relog=relog)
    config = {**config, "wandb": wandb_info(run.state, run.args)}
    if accelerator.is_main_process:
        write_config(run.args.output_dir, config)
    return config


def end_run(run, artifact_metadata, script):
    """After the model and reports are saved: the W&B model artifact, the end of tracking and of the Accelerator,
    then the model card (and with --push_to_hub the upload, waiting for --hub_push_checkpoints' uploads)."""
    log_model_artifact(run.accelerator, run.args, run.state, artifact_metadata)
    finish_tracking(run.accelerator)
    run.accelerator.end_training()
    publish_run(run.args, run.accelerator, script, run.after_save)


def resolve_run_args(args, variant):
    """Fill defaults that depend on other flags, and check what argparse cannot. `variant` names what is trained
    (supervised_mrl, ssl_relic, ...): the default --output_dir differs for every variant, dataset (and folder) and
    model, and is the same for the same command, so a relaunch finds its checkpoints."""
    resolve_report_to(args)
    if args.output_dir is None:
        dataset = args.dataset
        if args.dataset == "custom" and args.dataset_path:
            dataset += "-" + os.path.basename(os.path.normpath(args.dataset_path))
        args.output_dir = default_output_dir(os.path.join("runs", f"{variant}_{dataset}_{model_slug(args)}"),
                                             resume=args.resume_from_checkpoint == "latest")
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


def default_output_dir(base, resume):
    """The folder a run writes to when --output_dir is not given: `base`, or beside it `base_2`, `base_3`, ... (as
    Lightning's versions and YOLO's runs/train2) when the ones before hold a run, so that running a command again
    starts a new run instead of failing. With --resume_from_checkpoint latest: the last of them that exists, so that
    a relaunch of the same command continues the newest run.

    Every process of a launch picks the same folder: each picks before the process group's rendezvous, and nothing
    is written into the folder before it."""
    candidates = (base if i == 1 else f"{base}_{i}" for i in range(1, 10**6))
    chosen, previous = None, None
    for folder in candidates:
        exists = os.path.isdir(folder)
        if resume:
            if not exists:
                chosen = previous or folder
                break
            previous = folder
        elif not holds_run(folder):
            chosen = folder
            break
    if chosen != base and os.environ.get("RANK", "0") == "0":
        print(f"--output_dir not given: {base} {'is older' if resume else 'holds a run'}, so this run "
              f"{'continues' if resume else 'writes to'} {chosen}")
    return chosen


def holds_run(folder):
    """Whether a run was started in `folder` (its config.json or checkpoints exist)."""
    return any(os.path.exists(os.path.join(folder, name)) for name in (CONFIG_FILE, CHECKPOINTS))


def model_slug(args):
    """--model as part of a folder name: timm/<name> and hf-hub:<user>/<repo> without their slashes, a folder by its
    name; `-pretrained` for a pretrained start (a fine-tuned run and one from scratch do not share a folder)."""
    name = args.model.rstrip("/")
    name = os.path.basename(name) if os.path.isdir(name) else name.replace("hf-hub:", "").replace("/", "-")
    return name + ("-pretrained" if getattr(args, "pretrained", False) else "")


def check_output_dir(args, resuming, is_main):
    """Refuse to write a new run over a finished one or over checkpoints, unless asked to (--overwrite then
    removes everything the old run wrote, so that neither a later 'latest' nor a reader of eval/ picks up a part
    of it). A preemption marker left by the previous start is removed: this start decides anew."""
    taken = [p for p in (CONFIG_FILE, CHECKPOINTS) if os.path.exists(os.path.join(args.output_dir, p))]
    # a relaunch with 'latest' of a run that stopped before its first checkpoint (only config.json): start it anew
    never_saved = taken == [CONFIG_FILE] and not os.path.exists(os.path.join(args.output_dir, MODEL_FILE))
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
