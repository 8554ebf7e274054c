#!/usr/bin/env python
"""Self-supervised Matryoshka Representation Learning (ReLIC, SimCLR, BYOL) with Hugging Face Accelerate.

Every image is augmented twice; a backbone maps each view to an embedding z, and a self-supervised loss pulls the two
views of an image together -- on every prefix z[:, :d], d in --dims, at once (the Matryoshka loss), so that each
prefix is a representation on its own: evaluate.py truncates z to d dims and probes it.

  relic   ReLIC (mrl-pytorch's method): online vs EMA-target projections, learnable temperature, KL invariance term
  simclr  SimCLR: NT-Xent between the two views' projections, no target network
  byol    BYOL: online predictor regresses the EMA target's projection (normalized MSE)

The defaults reproduce mrl-pytorch's CIFAR-10 run (ResNet-18, batch 256, Adam lr 3e-4 wd 1e-5, 100 epochs, projector
to 64, dims 8..512, EMA gamma 0.995 raised to 1 on a cosine schedule, no LR schedule), with its bugs fixed (see the
README: the loss is nested on the backbone output that evaluation truncates, BatchNorm trains in train mode, resume is
exact). mrl-pytorch's flag names are accepted too (--dataset_name, --num_epochs, --gamma, ...).

examples:
  python train_ssl.py --method relic                      # mrl-pytorch's CIFAR-10 ResNet-18 run
  python train_ssl.py --method relic --nest projector     # its released wheel's nesting
  python train_ssl.py --mixed_precision bf16 --gpu_augment
  python train_ssl.py --dataset stl10 --model resnet50    # 100k unlabeled + 5k train images
  python train_ssl.py --dataset digits --image_size 8 --batch_size 64 --epochs 2 --num_workers 0   # a quick CPU run
  python -m mrl.supervise torchrun --nproc_per_node 8 train_ssl.py --mixed_precision bf16 --sync_bn
"""

import argparse
import json
import math
import os
import time

import datasets
import torch
import torch.nn as nn
import torchvision.transforms as T

from mrl import UserError, cli, plots
from mrl.augment import BatchAugment, batch_seed, ssl_augmentation
from mrl.checkpoint import (TrainState, load_checkpoint, resolve_checkpoint, save_checkpoint, save_model,
                            write_config)
from mrl.data import (Collate, FillUnreadable, ImageTransform, attach_transforms, build_transform, get_preset,
                      load_splits)
from mrl.device_data import DeviceLoader
from mrl.distributed import unwrap
from mrl.ema import EMA
from mrl.features import embed
from mrl.guards import LossGuard, Preemption, ignore_signals_in_worker
from mrl.loop import (StepMeter, accumulation_scale, after_optimizer_step, build_accelerator, check_readable,
                      count_batch, end_epoch, epoch_batches, log_train_losses)
from mrl.losses import MatryoshkaLoss, byol_loss, dim_weights, nt_xent_loss, relic_loss
from mrl.models import build_backbone, check_dims, default_dims
from mrl.pretrained import publish_run
from mrl.projectors import NEST, Projector, predictor
from mrl.retrieval import knn_predict, nearest_neighbors, normalized_prefix
from mrl.schedules import constant_schedule, cosine_schedule
from mrl.tracking import (finish_tracking, init_tracking, log_history_row, log_image_files, log_model_artifact,
                          log_per_dim_table, wandb_info)

METHODS = ("relic", "simclr", "byol")


def get_args_parser():
    parser = argparse.ArgumentParser("train_ssl.py", description=__doc__, formatter_class=cli.HelpFormatter)
    cli.add_data_args(parser, default_dataset="cifar10")
    cli.add_model_args(parser)
    group = parser.add_argument_group("self-supervised method")
    group.add_argument("--method", default="relic", choices=METHODS, help="the self-supervised loss (see above)")
    group.add_argument("--nest", default="backbone", choices=NEST,
                       help="where the Matryoshka prefixes are taken: 'backbone' = of the backbone output, which is "
                            "what evaluation truncates (each prefix goes through the projector on its own); "
                            "'projector' = of the projector's hidden layer, as mrl-pytorch 0.1.1 did (then --dims are "
                            "prefixes of --proj_hidden_dim and the backbone output itself is not nested)")
    group.add_argument("--dim_weights", default="uniform",
                       help="loss weight per dim: 'uniform' (mrl-pytorch and the paper) or comma-separated numbers")
    group.add_argument("--proj_hidden_dim", type=int, default=512, help="projector (and BYOL predictor) hidden width")
    group.add_argument("--proj_out_dim", type=int, default=64, help="projector output width (mrl-pytorch: 64)")
    group.add_argument("--proj_batchnorm", default="auto", choices=("auto", "on", "off"),
                       help="BatchNorm in the projector's hidden layer; auto = off for relic (mrl-pytorch's head has "
                            "none), on for simclr and byol (their papers)")
    group.add_argument("--alpha", type=float, default=1.0, help="relic: weight of the KL invariance term")
    group.add_argument("--max_temperature", type=float, default=5.0,
                       help="relic: clamp of the learnable logit scale exp(t), which starts at 1 (mrl-pytorch: 5)")
    group.add_argument("--temperature", type=float, default=0.5, help="simclr: NT-Xent temperature")
    group.add_argument("--ema_momentum", type=float, default=0.995,
                       help="relic, byol: target EMA momentum gamma at the start, raised to 1 on a cosine schedule "
                            "(mrl-pytorch: --gamma 0.995, its run_training.py default)")
    group.add_argument("--ema_copy_until", type=int, default=1,
                       help="relic, byol: the target is a copy of the online network up to this optimizer step")
    group.add_argument("--ema_every", type=int, default=1, help="relic, byol: move the target every N optimizer steps")
    group.add_argument("--export_encoder", default="auto", choices=("auto", "online", "target"),
                       help="which backbone is saved (and monitored): auto = the EMA target where there is one (as "
                            "mrl-pytorch saves and evaluates it), else the online backbone")

    group = parser.add_argument_group("augmentation (mrl-pytorch's two-view recipe, see mrl/augment.py)")
    group.add_argument("--gpu_augment", action="store_true",
                       help="augment on the accelerator, batched with per-sample random parameters, instead of per "
                            "image in the DataLoader workers (for when the CPU cannot feed the GPU)")
    group.add_argument("--data_on_device", action="store_true",
                       help="decode every training image once (cached on disk beside the datasets cache), keep them "
                            "on the accelerator as uint8 and draw the batches and their augmentation (--gpu_augment's) "
                            "there, with no DataLoader workers: for datasets that fit in its memory (CIFAR-10/100: "
                            "150 MB; STL-10 with the unlabeled split at 96 px: 2.8 GB) when even --gpu_augment's "
                            "workers cannot feed a fast GPU. The same batches, views and exact resume as --gpu_augment")
    group.add_argument("--crop_min_scale", type=float, default=0.08, help="RandomResizedCrop's smallest area fraction")
    group.add_argument("--jitter_strength", type=float, default=1.0,
                       help="colour jitter strength s: brightness, contrast, saturation 0.8 s, hue 0.2 s")
    group.add_argument("--blur_prob", type=float, default=1.0, help="Gaussian blur probability (mrl-pytorch: always)")
    group.add_argument("--solarize_prob", type=float, default=0.5, help="solarize probability")
    group.add_argument("--normalize", default="dataset", choices=("dataset", "none"),
                       help="normalize inputs with the dataset preset's mean/std (saved in config.json, so evaluation "
                            "matches), or feed [0, 1] pixels as mrl-pytorch did")

    group = parser.add_argument_group("optimization (defaults: mrl-pytorch's)")
    group.add_argument("--batch_size", type=int, default=256,
                       help="images per forward pass, summed over all processes (split evenly among them)")
    group.add_argument("--grad_accum_steps", type=int, default=1, help="forward passes per optimizer step")
    group.add_argument("--optimizer", default="adam", choices=("adam", "adamw"),
                       help="adam: weight decay as L2 in the gradient (mrl-pytorch); adamw: decoupled")
    group.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    group.add_argument("--weight_decay", type=float, default=1e-5, help="weight decay")
    group.add_argument("--no_decay_norm_bias", action="store_true",
                       help="exempt norm weights, biases and the ReLIC temperature from weight decay (mrl-pytorch "
                            "decays everything)")
    group.add_argument("--lr_schedule", default="none", choices=("none", "cosine"),
                       help="none: constant (mrl-pytorch); cosine: linear warmup, then cosine decay to --min_lr")
    group.add_argument("--warmup_epochs", type=float, default=0.0, help="cosine schedule: warmup length")
    group.add_argument("--min_lr", type=float, default=0.0, help="cosine schedule: final learning rate")
    group.add_argument("--max_grad_norm", type=float, default=0.0, help="clip the gradient norm per optimizer step (0: off)")
    group.add_argument("--sync_bn", action="store_true",
                       help="multi-GPU: BatchNorm statistics over the global batch (SyncBatchNorm)")
    group.add_argument("--memory_format", default="channels_last", choices=("channels_last", "contiguous"),
                       help="activation and weight layout: channels_last runs convolutions faster on recent GPUs "
                            "(bf16/fp16) and on CPUs with oneDNN (ResNet-18 step 1.3x on 2 cores); contiguous is "
                            "PyTorch's default, as mrl-pytorch")
    group.add_argument("--fp16_precision", action="store_true",
                       help="mrl-pytorch's flag: fp16 mixed precision, the same as --mixed_precision fp16 (bf16 is "
                            "preferred where the GPU has it); overrides --mixed_precision and `accelerate launch`")

    group = parser.add_argument_group("online monitoring (a cheap per-dim kNN accuracy on labeled data)")
    group.add_argument("--knn_every", type=int, default=5,
                       help="every N epochs, at the start (the untrained network, for reference) and after the last "
                            "(0: only after the last)")
    group.add_argument("--knn_k", type=int, default=20, help="neighbours (DINO: 20)")
    group.add_argument("--knn_temperature", type=float, default=0.07, help="vote weight exp(similarity / T) (DINO: 0.07)")
    group.add_argument("--knn_bank_samples", type=int, default=10000,
                       help="labeled train images in the kNN memory bank (a seeded random subset); the queries are "
                            "the validation split")
    cli.add_run_args(parser, default_epochs=100)
    cli.add_hub_args(parser)
    add_seed_aliases(parser)
    return parser


# mrl-pytorch's flag names -> ours (README table). Same-named flags (--batch_size, --dataset_path, --proj_out_dim,
# --proj_hidden_dim, --alpha, --fp16_precision) need no alias.
SEED_ALIASES = [
    (("--dataset_name",), "dataset", str), (("-m", "--encoder_model_name"), "model", str),
    (("-save_model_dir", "--save_model_dir"), "output_dir", str), (("--num_epochs",), "epochs", int),
    (("-b",), "batch_size", int), (("-lr", "--learning_rate"), "lr", float),
    (("-wd", "--wd"), "weight_decay", float), (("--log_every_n_steps",), "log_every", int),
    (("--gamma",), "ema_momentum", float), (("--update_gamma_after_step",), "ema_copy_until", int),
    (("--update_gamma_every_n_steps",), "ema_every", int),
]


def add_seed_aliases(parser):
    group = parser.add_argument_group("mrl-pytorch flag names (aliases of the flags above)")
    for names, dest, kind in SEED_ALIASES:
        group.add_argument(*names, dest=dest, type=kind, default=argparse.SUPPRESS, help=f"= --{dest}")


class Encoder(nn.Module):
    """Backbone + the projector's trunk (the part before the nesting point): image -> what the prefixes are cut of."""

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, x):
        return self.projector.trunk(self.backbone(x))


class SSLModel(nn.Module):
    """The online encoder (+ BYOL's predictor, ReLIC's temperature), the EMA target (ReLIC, BYOL) and the loss.

    forward(view1, view2) -> (weighted Matryoshka loss, per-dim losses). The two views go through the backbone as one
    batch (one forward per network); the Matryoshka wrapper slices the embeddings at every d and calls prefix_loss,
    which projects each prefix and applies the method's base loss, symmetrized over the two view orders. The target
    is a frozen submodule (no gradients, not in the optimizer, not reduced by DDP), so accelerator.save_state saves
    its weights and update counter with the model's and a resume restores them exactly.
    """

    def __init__(self, method, backbone, projector, dims, weights, ema_momentum=(), ema_copy_until=1, ema_every=1,
                 alpha=1.0, max_temperature=5.0, temperature=0.5, predictor_hidden=512):
        super().__init__()
        self.method, self.alpha, self.max_temperature, self.temperature = method, alpha, max_temperature, temperature
        self.online = Encoder(backbone, projector)
        self.predictor = predictor(projector.fc2.out_features, predictor_hidden) if method == "byol" else None
        # mrl-pytorch's t': the logit scale is exp(t'), starting at 1
        self.log_temperature = nn.Parameter(torch.zeros(())) if method == "relic" else None
        self.target = EMA(self.online, ema_momentum, ema_copy_until, ema_every) if method != "simclr" else None
        self.loss = MatryoshkaLoss(self.prefix_loss, dims, weights)

    def forward(self, view1, view2):
        views = torch.cat([view1, view2])
        embeddings = [self.online(views)]
        if self.target is not None:
            with torch.no_grad():
                embeddings.append(self.target(views))
        return self.loss(*embeddings)

    def prefix_loss(self, online, target=None):
        """The base loss on prefixes of width d: online (and target) embeddings of view 1 stacked over view 2."""
        p1, p2 = self.online.projector(online).chunk(2)
        if self.method == "simclr":
            return nt_xent_loss(p1, p2, self.temperature)
        with torch.no_grad():
            t1, t2 = self.target.module.projector(target).chunk(2)
        if self.method == "relic":
            loss = lambda o, t: relic_loss(o, t, self.log_temperature, self.alpha, self.max_temperature)  # noqa: E731
            return (loss(p1, t2) + loss(p2, t1)) / 2
        q1, q2 = self.predictor(torch.cat([p1, p2])).chunk(2)
        return (byol_loss(q1, t2) + byol_loss(q2, t1)) / 2

    def update_target(self, step):
        """After optimizer step `step` (once per step, not per micro-batch); returns the gamma used (None: no target)."""
        return self.target.update(self.online, step) if self.target is not None else None

    def logit_scale(self):
        return self.log_temperature.detach().exp().clamp(0, self.max_temperature) if self.method == "relic" else None


class Exported(nn.Module):
    """What model.safetensors holds: `backbone.*` (what evaluate.py loads) and `projector.*`."""

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector


def build_model(args, backbone, projector, dims, weights, ema_schedule, sync_bn=False):
    """The SSLModel the flags describe, in --memory_format. With `sync_bn` every BatchNorm in it -- the backbone's,
    the projector's, BYOL's predictor's and those of the EMA target's copy -- normalizes over the global batch
    (SyncBatchNorm, which runs on GPUs only)."""
    model = SSLModel(args.method, backbone, projector, dims, weights, ema_schedule, args.ema_copy_until,
                     args.ema_every, args.alpha, args.max_temperature, args.temperature, args.proj_hidden_dim)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model


def main(args):
    preset = get_preset(args.dataset)
    args.model = args.model or preset.model
    args.image_size = args.image_size or preset.image_size
    cli.resolve_run_args(args, f"ssl_{args.method}" + ("_nest-projector" if args.nest == "projector" else ""))
    check_args(args)

    if args.fp16_precision and not torch.cuda.is_available():
        raise UserError("--fp16_precision needs a CUDA GPU; on the CPU train in fp32 (or --mixed_precision bf16)")
    # --batch_size is the global batch, split over the processes
    accelerator = build_accelerator(args, mixed_precision="fp16" if args.fp16_precision else None)
    if args.batch_size // accelerator.num_processes < 2:
        raise UserError(f"--batch_size {args.batch_size} gives {args.batch_size // accelerator.num_processes} image(s) "
                        f"per process; the {args.method} loss compares images within a batch and needs at least 2")
    preemption = Preemption(accelerator)
    resuming = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint) is not None
    cli.check_output_dir(args, resuming=resuming, is_main=accelerator.is_main_process)

    # ---- data: two augmented views per image for training (labels unused); labeled splits for the kNN monitor
    with accelerator.main_process_first():
        splits = load_splits(args.dataset, args.dataset_path, seed=args.seed, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction, max_train_samples=args.max_train_samples,
                             max_eval_samples=args.max_eval_samples, min_image_size=args.min_image_size)
    mean, std = (preset.mean, preset.std) if args.normalize == "dataset" else ((0.0,) * 3, (1.0,) * 3)
    size = (args.image_size, args.image_size)
    strength = dict(crop_scale=(args.crop_min_scale, 1.0), strength=args.jitter_strength, blur_prob=args.blur_prob,
                    solarize_prob=args.solarize_prob)
    pretrain = splits.train if splits.unlabeled is None else datasets.concatenate_datasets([splits.train,
                                                                                           splits.unlabeled])
    if args.data_on_device:  # decoded once, keyed by the fingerprint of the dataset before any transform is set
        train_loader = DeviceLoader.from_dataset(pretrain, args.image_size, accelerator, args.batch_size, args.seed,
                                                 args.num_workers)
    if args.gpu_augment or args.data_on_device:  # workers only decode and resize; uint8: a quarter of the bytes
        cpu_transform, views, gpu_augment = T.Compose([T.Resize(size), T.PILToTensor()]), 1, \
            BatchAugment(args.image_size, mean, std, **strength)
    else:
        cpu_transform, views, gpu_augment = T.Compose([ssl_augmentation(args.image_size, **strength), T.ToTensor(),
                                                       T.Normalize(mean, std)]), 2, None
    train_transform = attach_transforms(splits, "ssl", args.image_size, mean, std, args.seed, views=views,
                                        train_transform=cpu_transform)
    pretrain.set_transform(train_transform)
    bank = splits.train.shuffle(seed=args.seed).select(range(min(args.knn_bank_samples, len(splits.train))))
    bank = bank.with_transform(ImageTransform(build_transform("ssl", args.image_size, mean, std, train=False)))
    loader = lambda ds, batch_size, train: torch.utils.data.DataLoader(  # noqa: E731
        FillUnreadable(ds, evaluation=not train), batch_size=batch_size, shuffle=train, drop_last=train,
        num_workers=args.num_workers, collate_fn=Collate(), pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_signals_in_worker)
    if not args.data_on_device:
        train_loader = loader(pretrain, args.batch_size, True)  # full batches only: the loss compares within a batch
    if len(train_loader) == 0:
        raise UserError(f"{len(pretrain)} training images are fewer than one batch of --batch_size {args.batch_size}")
    bank_loader, query_loader = loader(bank, 2 * args.batch_size, False), loader(splits.val, 2 * args.batch_size, False)

    # ---- model: backbone + projector (+ predictor) online, EMA target, Matryoshka loss over the prefixes
    cifar_stem = {"auto": None, "on": True, "off": False}[args.cifar_stem]
    backbone = build_backbone(args.model, args.image_size, cifar_stem, args.norm)
    batchnorm = args.method != "relic" if args.proj_batchnorm == "auto" else args.proj_batchnorm == "on"
    projector = Projector(backbone.embed_dim, args.proj_hidden_dim, args.proj_out_dim, args.nest, batchnorm)
    dims = cli.flat_dims(args.dims) or default_dims(projector.nested_width)
    if args.nest == "projector" and max(dims) > projector.nested_width:
        raise UserError(f"with --nest projector, --dims are prefixes of the projector's hidden layer and must lie in "
                        f"1..{projector.nested_width} (--proj_hidden_dim), got {sorted(dims)}")
    dims = check_dims(dims, projector.nested_width)
    # kNN on prefixes of the backbone output, which is what evaluation truncates (with --nest projector it is not
    # nested, so this shows what that costs)
    knn_dims = dims if args.nest == "backbone" else default_dims(backbone.embed_dim)
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    ema_schedule = cosine_schedule(args.ema_momentum, 1.0, args.epochs, steps_per_epoch)
    weights = dim_weights(dims, args.dim_weights, given=cli.flat_dims(args.dims))
    model = build_model(args, backbone, projector, dims, weights, ema_schedule,
                        sync_bn=args.sync_bn and accelerator.num_processes > 1)
    optimizer = build_optimizer(args, model)

    model, optimizer, train_loader, bank_loader, query_loader = accelerator.prepare(
        model, optimizer, train_loader, bank_loader, query_loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    if args.lr_schedule == "cosine":
        lr_schedule = cosine_schedule(args.lr, args.min_lr, args.epochs, steps_per_epoch, args.warmup_epochs)
    else:
        lr_schedule = constant_schedule(args.lr, args.epochs, steps_per_epoch)
    resumed = load_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint)
    if resumed:
        accelerator.print(f"resumed from {resumed}: epoch {state.epoch}, step {state.step}, batch {state.batch_in_epoch}")
    unwrapped = unwrap(accelerator, model)
    export_target = unwrapped.target is not None and args.export_encoder != "online"
    exported = Exported(unwrapped.target.module.backbone if export_target else unwrapped.online.backbone,
                        unwrapped.online.projector)
    trained_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    split_sizes = {"pretrain": len(pretrain), "train": len(splits.train), "val": len(splits.val), "knn_bank": len(bank),
                   "unlabeled": len(splits.unlabeled) if splits.unlabeled is not None else 0}
    init_tracking(accelerator, args, state, {  # the flags, and what the code derived from them
        **vars(args), "dims": dims, "knn_dims": knn_dims, "embed_dim": backbone.embed_dim,
        "num_classes": len(splits.class_names), "split_sizes": split_sizes, "trained_parameters": trained_parameters,
        "steps_per_epoch": steps_per_epoch, "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision, "loss_per_dim_at_chance": loss_at_chance(args),
        "knn_accuracy_at_chance": 1 / len(splits.class_names)}, relog=lambda row: knn_log(knn_dims, row))
    config = {**model_config(args, backbone, dims, splits, preset, mean, std, export_target),
              "wandb": wandb_info(state, args)}
    if accelerator.is_main_process:  # now, not only at the end: the run's checkpoints can be evaluated with it
        write_config(args.output_dir, config)
    accelerator.print(
        f"{args.dataset}: {len(pretrain)} training images"
        + (f" ({len(splits.train)} train + {len(splits.unlabeled)} unlabeled)" if splits.unlabeled is not None else "")
        + f", kNN monitor: {len(bank)} labeled bank / {len(splits.val)} val images, {len(splits.class_names)} classes"
        + f"\n{args.method} on {args.model} (embedding {backbone.embed_dim}), nested on the {args.nest} at dims {dims}, "
        + f"{trained_parameters:,} trained parameters"
        + f"\n{args.epochs} epochs x {steps_per_epoch} optimizer steps, {accelerator.num_processes} process(es), "
        + f"mixed precision: {accelerator.mixed_precision}, augmentation on the {'accelerator' if gpu_augment else 'CPU'}"
        + (" (data too: --data_on_device)" if args.data_on_device else "") + f", output: {args.output_dir}")

    # ---- train; the online kNN of the untrained network (step 0) is the reference the kNN curve rises from
    knn = None
    monitored = (exported.backbone, bank_loader, query_loader, knn_dims, len(splits.class_names))
    if args.knn_every and not state.history:
        monitor_knn(args, accelerator, state, 0, *monitored)
    for epoch in range(state.epoch, args.epochs):
        train_one_epoch(args, accelerator, model, optimizer, train_loader, train_transform, gpu_augment, dims,
                        lr_schedule, state, epoch, preemption)
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        if epoch + 1 == args.epochs or (args.knn_every and (epoch + 1) % args.knn_every == 0):
            knn = monitor_knn(args, accelerator, state, epoch + 1, *monitored)
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, args.output_dir, state.step, args.checkpoints_total_limit)

    # ---- model and reports
    if knn is None:  # a resumed run that had already finished its epochs
        knn = knn_monitor(args, accelerator, *monitored)
    save_model(accelerator, exported.to(memory_format=torch.contiguous_format), args.output_dir, config)
    if accelerator.is_main_process:
        write_reports(args, accelerator, knn_dims, knn, state)
    log_model_artifact(accelerator, args, state,
                       {"dims": dims, "dataset": args.dataset, "backbone": args.model, "method": args.method,
                        "knn_accuracy": knn})
    finish_tracking(accelerator)
    accelerator.end_training()
    publish_run(args, accelerator, "train_ssl.py")  # the model card; with --push_to_hub, the upload


def monitor_knn(args, accelerator, state, epoch, backbone, bank_loader, query_loader, dims, num_classes):
    """The online kNN after `epoch` (0: the untrained network): kept in the history, logged (its series, and a
    per-dim table) and printed."""
    knn = knn_monitor(args, accelerator, backbone, bank_loader, query_loader, dims, num_classes)
    state.history.append({"epoch": epoch, "step": state.step, "knn_accuracy": knn})
    log_history_row(accelerator, state, knn_log(dims, state.history[-1]), step=state.step)
    log_per_dim_table(accelerator, "knn_accuracy_per_dim", dims, {"knn_accuracy": knn}, step=state.step)
    accelerator.print(f"epoch {epoch}: kNN accuracy " + "  ".join(f"d{d} {a:.3f}" for d, a in zip(dims, knn)))
    return knn


def knn_log(dims, row):
    """What W&B gets for a kNN row of state.history (and what a resumed run logs again)."""
    return {"epoch": row["epoch"], **{f"knn/accuracy_d{d}": a for d, a in zip(dims, row["knn_accuracy"])}}


def loss_at_chance(args):
    """Each dim's loss when the network tells no image from another, for reading the loss curve: ReLIC and SimCLR
    pick each image's other view among the batch's (ln B) or both views' (ln(2B - 1)) candidates; BYOL's normalized
    MSE has no such level."""
    return {"relic": math.log(args.batch_size), "simclr": math.log(2 * args.batch_size - 1)}.get(args.method)


def check_args(args):
    for name in ("proj_hidden_dim", "proj_out_dim", "grad_accum_steps", "knn_k", "knn_bank_samples", "ema_every",
                 "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if not 0 < args.crop_min_scale <= 1:
        raise UserError(f"--crop_min_scale must be in (0, 1], got {args.crop_min_scale}")
    if not 0 <= args.ema_momentum <= 1:
        raise UserError(f"--ema_momentum (--gamma) must be in [0, 1], got {args.ema_momentum}")
    if args.temperature <= 0 or args.knn_temperature <= 0 or args.max_temperature <= 0:
        raise UserError("temperatures must be positive")


def build_optimizer(args, model):
    """Adam (mrl-pytorch) or AdamW over the trainable parameters; --no_decay_norm_bias exempts 1-d ones."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if args.no_decay_norm_bias:
        groups = [{"params": [p for _, p in trainable if p.ndim > 1], "weight_decay": args.weight_decay},
                  {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in trainable], "weight_decay": args.weight_decay}]
    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[args.optimizer](groups, lr=args.lr)


def train_one_epoch(args, accelerator, model, optimizer, train_loader, train_transform, gpu_augment, dims,
                    lr_schedule, state, epoch, preemption):
    model.train()  # every epoch: the kNN monitor leaves the backbone in eval mode (mrl-pytorch never switched back)
    unwrapped = unwrap(accelerator, model)
    generator = torch.Generator(device=accelerator.device) if gpu_augment else None
    channels_last = args.memory_format == "channels_last"
    start = time.perf_counter()
    if isinstance(train_loader, DeviceLoader):  # --data_on_device: gathered on the accelerator, no workers
        batches, progress = train_loader.epoch_batches(accelerator, state, epoch, args.epochs)
    else:
        batches, progress = epoch_batches(accelerator, train_loader, train_transform, state, epoch, args.epochs)
    group_losses, skipped, loaded, unreadable = [], 0, 0, []
    guard = LossGuard(accelerator.device)  # NaN/inf loss: checked before logging and saving, no sync per step
    meter = StepMeter(state.step)  # throughput and data-wait time between logs
    for batch in meter.batches(batches):
        skipped, loaded = skipped + batch["skipped"], loaded + len(batch["labels"])  # no device sync per batch
        unreadable += batch["unreadable"]
        check_readable(batch)
        views = batch["pixel_values"]
        if gpu_augment is not None:  # two views of the batch, drawn from a generator seeded by (seed, epoch, batch)
            generator.manual_seed(batch_seed(args.seed, epoch, state.batch_in_epoch, accelerator.process_index))
            views = [gpu_augment(views, generator), gpu_augment(views, generator)]
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        loss, per_dim, gamma, grad_norm = training_step(
            accelerator, model, optimizer, views, float(lr_schedule[state.step]), args.max_grad_norm, state.step,
            accumulation_scale(state.batch_in_epoch, len(train_loader), args.grad_accum_steps),
            measure_norm=(state.step + 1) % args.log_every == 0)
        group_losses.append(per_dim)
        if not count_batch(accelerator, state, guard, progress, loss):
            continue  # mid accumulation group
        if state.step % args.log_every == 0:
            guard.check(accelerator)
            extra = {"train/ema_gamma": gamma} if gamma is not None else {}
            if unwrapped.logit_scale() is not None:
                extra["train/logit_scale"] = unwrapped.logit_scale().item()
            log_train_losses(accelerator, progress, state, epoch, len(train_loader), dims, unwrapped.loss.weights,
                             group_losses, float(lr_schedule[state.step - 1]), grad_norm, meter, **extra)
        group_losses = []
        after_optimizer_step(args, accelerator, state, guard, preemption)
    progress.close()
    guard.check(accelerator)
    end_epoch(accelerator, skipped, loaded, epoch, state.step, time.perf_counter() - start, unreadable)


def training_step(accelerator, model, optimizer, views, lr, max_grad_norm, step, scale=1.0, measure_norm=False):
    """One forward and backward pass on the two views. At the end of an accumulation group the optimizer steps at
    `lr` (after clipping) and then the EMA target moves: once per optimizer step, not per micro-batch. `scale`
    multiplies the loss in backward (see loop.accumulation_scale). Returns the loss and the per-dim losses, detached,
    the target's momentum at optimizer step `step` (None on micro-batches that do not step, and for SimCLR), and the
    gradient norm before clipping (a device tensor) where the step clipped or `measure_norm` asked for it."""
    gamma = grad_norm = None
    with accelerator.accumulate(model):
        loss, per_dim = model(*views)
        accelerator.backward(loss * scale if scale != 1.0 else loss)
        if accelerator.sync_gradients:
            for group in optimizer.param_groups:
                group["lr"] = lr  # a Python float: a numpy scalar in the optimizer state would not reload
            if max_grad_norm > 0 or measure_norm:  # an infinite threshold measures without clipping
                grad_norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                        max_grad_norm if max_grad_norm > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad()
        if accelerator.sync_gradients:
            gamma = unwrap(accelerator, model).update_target(step)
    return loss.detach(), per_dim, gamma, grad_norm


def knn_monitor(args, accelerator, backbone, bank_loader, query_loader, dims, num_classes):
    """Per-dim weighted kNN accuracy (DINO's eval_knn, mrl/retrieval.py as evaluate.py uses it) of the backbone's
    prefixes, each L2-renormalized after slicing: val queries against a labeled train bank. Cheap and label-light,
    as solo-learn and DINO monitor SSL runs; not evaluate.py's linear probe, so label the numbers "online kNN"."""
    was_training = backbone.training
    backbone.eval()
    try:
        channels_last = args.memory_format == "channels_last"
        # gathered on the host, searched on the accelerator
        bank, bank_labels = (t.to(accelerator.device) for t in embed(accelerator, backbone, bank_loader, channels_last))
        queries, query_labels = (t.to(accelerator.device)
                                 for t in embed(accelerator, backbone, query_loader, channels_last))
    finally:
        backbone.train(was_training)
    accuracies = []
    for d in dims:
        similarity, index = nearest_neighbors(normalized_prefix(queries, d), normalized_prefix(bank, d), args.knn_k)
        predicted = knn_predict(similarity, bank_labels[index], num_classes, args.knn_k, args.knn_temperature)
        accuracies.append((predicted == query_labels).float().mean().item())
    return accuracies


def model_config(args, backbone, dims, splits, preset, mean, std, export_target):
    """What evaluate.py needs to rebuild the backbone and its preprocessing (saved as config.json)."""
    return {
        "kind": "ssl",
        "model": {"backbone": args.model, "embed_dim": backbone.embed_dim,
                  "cifar_stem": getattr(backbone, "cifar_stem", None), "norm": args.norm},
        "heads": None,
        "ssl": {"method": args.method, "nest": args.nest, "dims": dims, "exported": "target" if export_target else "online",
                "projector": {"hidden_dim": args.proj_hidden_dim, "out_dim": args.proj_out_dim}},
        "data": {"dataset": args.dataset, "dataset_path": args.dataset_path, "image_size": args.image_size,
                 "mean": list(mean), "std": list(std), "augment": "ssl", "seed": args.seed,
                 "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
                 "splits": splits.record,  # everything that defines the splits: evaluate.py rebuilds them from it
                 "class_names": splits.class_names},
        "args": vars(args),
    }


def write_reports(args, accelerator, dims, knn, state):
    """metrics.json, the per-dim kNN table on stdout, and the accuracy-vs-dim plot (also sent to W&B)."""
    metrics = {"protocol": f"online weighted kNN (k={args.knn_k}, T={args.knn_temperature}) on backbone prefixes, "
                           "val queries vs a labeled train bank -- not a linear probe",
               "dims": dims, "knn_accuracy": knn, "history": state.history, "steps": state.step}
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"\n{args.method} ({args.model} on {args.dataset}), online kNN accuracy per dim:")
    print("  dim  knn_accuracy")
    for d, a in zip(dims, knn):
        print(f"{d:>5}  {a:>12.4f}")
    print(f"saved {os.path.join(args.output_dir, 'model.safetensors')} and metrics.json")
    if len(dims) > 1:
        curves = {f"epoch {h['epoch']}": (dims, h["knn_accuracy"]) for h in state.history[-4:]}
        path = plots.accuracy_vs_dim(curves, os.path.join(args.output_dir, "knn_accuracy_vs_dim.png"),
                                     ylabel="online kNN accuracy", title=f"{args.method}: kNN accuracy against dim")
        log_image_files(accelerator, {"plots/knn_accuracy_vs_dim": path}, step=state.step)
    log_per_dim_table(accelerator, "knn_accuracy_per_epoch", dims,  # one native chart: a line per evaluated epoch
                      {f"epoch {h['epoch']}": h["knn_accuracy"] for h in state.history}, step=state.step,
                      chart_key="charts/knn_accuracy_vs_dim",
                      title=f"{args.method}: online kNN accuracy against log2(dim)")


if __name__ == "__main__":
    cli.run(main, get_args_parser().parse_args())
