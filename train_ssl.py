#!/usr/bin/env python
"""Self-supervised Matryoshka Representation Learning with Hugging Face Accelerate.

Every image is augmented twice; a backbone maps each view to an embedding z, and a self-supervised loss pulls the two
views of an image together -- on every prefix z[:, :d], d in --dims, at once (the Matryoshka loss), so that each
prefix is a representation on its own: evaluate.py truncates z to d dims and probes it. --method picks the loss from
mrl/ssl/methods.py (ReLIC, SimCLR, BYOL, VICReg, Barlow Twins; listed under --method below), each with its own flags.

The defaults reproduce mrl-pytorch's CIFAR-10 run (ReLIC, ResNet-18, batch 256, Adam lr 3e-4 wd 1e-5, 100 epochs,
projector to 64, dims 8..512, EMA gamma 0.995 raised to 1 on a cosine schedule, no LR schedule), with its bugs fixed
(see docs/differences.md: the loss is nested on the backbone output that evaluation truncates, BatchNorm trains in
train mode, resume is exact). mrl-pytorch's flag names are accepted too (--dataset_name, --num_epochs, --gamma, ...).

examples:
  python train_ssl.py --method relic                      # mrl-pytorch's CIFAR-10 ResNet-18 run
  python train_ssl.py --method relic --nest projector     # its released wheel's nesting
  python train_ssl.py --method vicreg --sim_coeff 25      # a method's own flags
  python train_ssl.py --mixed_precision bf16 --gpu_augment
  python train_ssl.py --dataset stl10 --model resnet50    # 100k unlabeled + 5k train images
  python train_ssl.py --dataset digits --image_size 8 --batch_size 64 --epochs 2 --num_workers 0   # a quick CPU run
  python -m mrl.train.supervise torchrun --nproc_per_node 8 train_ssl.py --mixed_precision bf16 --sync_bn
"""

import argparse
import json
import os

import torch
import torchvision.transforms as T

import datasets
from mrl import UserError, cli
from mrl.batches.device_data import DeviceLoader
from mrl.batches.loaders import epoch_loader
from mrl.batches.ssl_augment import BatchAugment, batch_seed, ssl_augmentation
from mrl.batches.transforms import ImageTransform, attach_transforms, build_transform
from mrl.eval.features import embed_loader
from mrl.eval.retrieval import knn_predict, nearest_neighbors, normalized_prefix
from mrl.matryoshka import default_dims, dim_weights, flat_dims, training_dims
from mrl.models.backbones import build_backbone
from mrl.report import plots
from mrl.report.tracking import log_history_row, log_image_files, log_per_dim_table
from mrl.run_folder.config import run_config
from mrl.run_folder.final_model import save_model
from mrl.ssl import methods
from mrl.ssl.model import build_model, build_projector, exported_encoder
from mrl.ssl.projectors import NEST
from mrl.train.loop import train_one_epoch
from mrl.train.optim import build_optimizer
from mrl.train.publish import checkpoint_pusher
from mrl.train.run import (
    check_one_batch,
    data_loader,
    end_run,
    load_data,
    resolve_preset,
    start_run,
    start_tracking,
    steps_per_epoch,
)
from mrl.train.optim import constant_schedule, cosine_schedule
from mrl.utils import script
from mrl.utils.distributed import unwrap


def get_args_parser():
    parser = methods.ArgumentParser("train_ssl.py", description=__doc__)
    cli.add_data_args(parser, default_dataset="cifar10")
    cli.add_model_args(parser)
    group = parser.add_argument_group("self-supervised method (mrl/ssl/methods.py: each method's flags are refused with "
                                      "another --method)")
    methods.add_method_args(group)
    group.add_argument("--nest", default="backbone", choices=NEST,
                       help="where the Matryoshka prefixes are taken: 'backbone' = of the backbone output, which is "
                            "what evaluation truncates (each prefix goes through the projector on its own); "
                            "'projector' = of the projector's last hidden layer, as mrl-pytorch 0.1.1 did (then --dims "
                            "are prefixes of --proj_hidden_dim and the backbone output itself is not nested)")
    group.add_argument("--export_encoder", default="auto", choices=("auto", "online", "target"),
                       help="which backbone is saved (and monitored): auto = the EMA target where there is one (as "
                            "mrl-pytorch saves and evaluates it), else the online backbone")

    group = parser.add_argument_group("augmentation (mrl-pytorch's two-view recipe, see mrl/batches/ssl_augment.py)")
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
                       help="normalize inputs with the dataset preset's mean/std (a timm or --pretrained backbone's "
                            "own; saved in config.json, so evaluation matches), or feed [0, 1] pixels as mrl-pytorch "
                            "did")

    group = parser.add_argument_group("optimization (defaults: mrl-pytorch's)")
    cli.add_optimization_args(group, defaults={
        "batch_size": 256, "grad_accum_steps": 1, "optimizer": "adam", "lr": 3e-4, "backbone_lr_scale": 1.0,
        "weight_decay": 1e-5, "lr_schedule": "none", "warmup_epochs": 0.0, "max_grad_norm": 0.0,
        "memory_format": "channels_last"}, choices={"optimizer": ("adam", "adamw"), "lr_schedule": ("none", "cosine")},
        notes={"optimizer": "adam: weight decay as L2 in the gradient (mrl-pytorch); adamw: decoupled",
               "backbone_lr_scale": "What is new: the projector and predictor; below 1 keeps a --pretrained start "
                                    "closer to where it began",
               "lr_schedule": "none: constant (mrl-pytorch); cosine: linear warmup, then cosine decay to --min_lr",
               "warmup_epochs": "Cosine schedule only",
               "memory_format": "ResNet-18's step 1.3x faster on 2 CPU cores; mrl-pytorch: contiguous"})
    group.add_argument("--no_decay_norm_bias", action="store_true",
                       help="exempt norm weights, biases and learnable scalars (ReLIC's temperature) from weight decay "
                            "(mrl-pytorch decays everything)")
    group.add_argument("--min_lr", type=float, default=0.0, help="cosine schedule: final learning rate")
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


# mrl-pytorch's flag names -> ours (docs/train_ssl.md's table). Same-named flags (--batch_size, --dataset_path,
# --proj_out_dim, --proj_hidden_dim, --alpha, --fp16_precision) need no alias.
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


def main(args):
    check_args(args)
    method = methods.METHODS[args.method]
    variant_name = f"ssl_{args.method}" + ("_nest-projector" if args.nest == "projector" else "")
    preset, source = resolve_preset(args, variant_name)
    if args.fp16_precision and not torch.cuda.is_available():
        raise UserError("--fp16_precision needs a CUDA GPU; on the CPU train in fp32 (or --mixed_precision bf16)")
    pusher = checkpoint_pusher(args)  # with --hub_push_checkpoints: every checkpoint saved is uploaded
    # --batch_size is the global batch, split over the processes
    run = start_run(args, after_save=pusher, mixed_precision="fp16" if args.fp16_precision else None)
    accelerator, state = run.accelerator, run.state
    if args.batch_size // accelerator.num_processes < 2:
        raise UserError(f"--batch_size {args.batch_size} gives {args.batch_size // accelerator.num_processes} image(s) "
                        f"per process; the {args.method} loss compares images within a batch and needs at least 2")

    # ---- data: two augmented views per image for training (labels unused); labeled splits for the kNN monitor
    splits = load_data(run)
    # --normalize dataset: the preset's mean/std, or a pretrained backbone's own (resolve_preset put them there)
    mean, std = (preset.mean, preset.std) if args.normalize == "dataset" else ((0.0,) * 3, (1.0,) * 3)
    size = (args.image_size, args.image_size)
    strength = dict(crop_scale=(args.crop_min_scale, 1.0), strength=args.jitter_strength, blur_prob=args.blur_prob,
                    solarize_prob=args.solarize_prob)
    pretrain = splits.train if splits.unlabeled is None else datasets.concatenate_datasets([splits.train,
                                                                                           splits.unlabeled])
    if args.gpu_augment or args.data_on_device:  # workers only decode and resize; uint8: a quarter of the bytes
        cpu_transform, views, gpu_augment = T.Compose([T.Resize(size), T.PILToTensor()]), 1, \
            BatchAugment(args.image_size, mean, std, **strength)
    else:
        cpu_transform, views, gpu_augment = T.Compose([ssl_augmentation(args.image_size, **strength), T.ToTensor(),
                                                       T.Normalize(mean, std)]), 2, None
    if args.data_on_device:  # decoded once, keyed by the fingerprint of the dataset before any transform is set
        train_loader = DeviceLoader.from_dataset(pretrain, args.image_size, accelerator, args.batch_size, args.seed,
                                                 args.num_workers)
        check_one_batch(train_loader, len(pretrain), args.batch_size)
    train_transform = attach_transforms(splits, "ssl", args.image_size, mean, std, args.seed, views=views,
                                        train_transform=cpu_transform, decoder=args.decoder,
                                        preprocessing=source.preprocessing)
    pretrain.set_transform(train_transform)
    if not args.data_on_device:
        train_loader = data_loader(args, pretrain, args.batch_size, train=True)
    bank = splits.train.shuffle(seed=args.seed).select(range(min(args.knn_bank_samples, len(splits.train))))
    bank = bank.with_transform(ImageTransform(build_transform("ssl", args.image_size, mean, std, train=False,
                                                              preprocessing=source.preprocessing),
                                              decoder=args.decoder))
    bank_loader = data_loader(args, bank, 2 * args.batch_size, train=False)
    query_loader = data_loader(args, splits.val, 2 * args.batch_size, train=False)

    # ---- model: backbone + projector online, what the method adds (EMA target, predictor), the Matryoshka loss
    cifar_stem = {"auto": None, "on": True, "off": False}[args.cifar_stem]
    backbone = build_backbone(args.model, args.image_size, cifar_stem, args.norm, pretrained=args.pretrained,
                              embed_dim=args.embed_dim, timm=source.timm)
    projector = build_projector(args, backbone)
    if args.nest == "projector":  # the prefixes of the projector's hidden layer
        dims = training_dims(args.dims, projector.nested_width, name="--dims (with --nest projector, prefixes of the "
                             "projector's hidden layer)", whose="--proj_hidden_dim")
    else:
        dims = training_dims(args.dims, backbone.embed_dim)
    # kNN on prefixes of the backbone output, which is what evaluation truncates (with --nest projector it is not
    # nested, so this shows what that costs)
    knn_dims = dims if args.nest == "backbone" else default_dims(backbone.embed_dim)
    steps = steps_per_epoch(args, train_loader)
    ema_schedule = cosine_schedule(args.ema_momentum, 1.0, args.epochs, steps) if method.ema_target else None
    weights = dim_weights(dims, args.dim_weights, given=flat_dims(args.dims))
    model = build_model(args, backbone, projector, dims, weights, ema_schedule,
                        sync_bn=args.sync_bn and accelerator.num_processes > 1)
    # --no_decay_norm_bias exempts the 1-d parameters (norms, biases, ReLIC's temperature); mrl-pytorch decays all
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay,
                                no_decay="norm_bias" if args.no_decay_norm_bias else "none",
                                backbone_lr_scale=args.backbone_lr_scale)

    model, optimizer, train_loader, bank_loader, query_loader = accelerator.prepare(
        model, optimizer, train_loader, bank_loader, query_loader)
    train_loader = epoch_loader(accelerator, train_loader, train_transform)  # what the loop draws epochs from
    if args.lr_schedule == "cosine":
        lr_schedule = cosine_schedule(args.lr, args.min_lr, args.epochs, steps, args.warmup_epochs)
    else:
        lr_schedule = constant_schedule(args.lr, args.epochs, steps)
    run.resume()
    unwrapped = unwrap(accelerator, model)
    exported, exported_name = exported_encoder(unwrapped, args.export_encoder)
    generator = torch.Generator(device=accelerator.device) if gpu_augment else None
    channels_last = args.memory_format == "channels_last"

    def forward(batch):  # the method's Matryoshka loss on the batch's two views
        views = batch["pixel_values"]
        if gpu_augment is not None:  # two views of the batch, drawn from a generator seeded by (seed, epoch, batch)
            generator.manual_seed(batch_seed(args.seed, state.epoch, state.batch_in_epoch, accelerator.process_index))
            views = [gpu_augment(views, generator), gpu_augment(views, generator)]
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return model(*views)

    trained_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    split_sizes = {"pretrain": len(pretrain), "train": len(splits.train), "val": len(splits.val), "knn_bank": len(bank),
                   "unlabeled": len(splits.unlabeled) if splits.unlabeled is not None else 0}
    ssl = {"method": args.method, "nest": args.nest, "dims": dims, "exported": exported_name,
           "projector": {"hidden_dim": args.proj_hidden_dim, "out_dim": args.proj_out_dim}}
    config = start_tracking(run, {  # what the code derived from the flags, next to them on the W&B page
        "dims": dims, "knn_dims": knn_dims, "embed_dim": backbone.embed_dim, "num_classes": len(splits.class_names),
        "split_sizes": split_sizes, "trained_parameters": trained_parameters, "steps_per_epoch": steps,
        "loss_per_dim_at_chance": method.loss_at_chance(args.batch_size) if method.loss_at_chance else None,
        "knn_accuracy_at_chance": 1 / len(splits.class_names)},
        run_config(args, backbone, splits, mean, std, "ssl", ssl=ssl, timm=source.timm,
                   preprocessing=source.preprocessing), relog=lambda row: knn_log(knn_dims, row))
    accelerator.print(
        f"{args.dataset}: {len(pretrain)} training images"
        + (f" ({len(splits.train)} train + {len(splits.unlabeled)} unlabeled)" if splits.unlabeled is not None else "")
        + f", kNN monitor: {len(bank)} labeled bank / {len(splits.val)} val images, {len(splits.class_names)} classes"
        + f"\n{args.method} on {args.model} (embedding {backbone.embed_dim}), nested on the {args.nest} at dims {dims}, "
        + f"{trained_parameters:,} trained parameters"
        + f"\n{args.epochs} epochs x {steps} optimizer steps, {accelerator.num_processes} process(es), "
        + f"mixed precision: {accelerator.mixed_precision}, augmentation on the {'accelerator' if gpu_augment else 'CPU'}"
        + (" (data too: --data_on_device)" if args.data_on_device else "") + f", output: {args.output_dir}")

    # ---- train; the online kNN of the untrained network (step 0) is the reference the kNN curve rises from
    knn = None
    monitored = (exported.backbone, bank_loader, query_loader, knn_dims, len(splits.class_names))
    if args.knn_every and not state.history:
        monitor_knn(args, accelerator, state, 0, *monitored)
    for epoch in run.epochs():
        train_one_epoch(run, model, optimizer, train_loader, lr_schedule, dims,
                        unwrapped.loss.weights, forward, after_step=unwrapped.after_optimizer_step,
                        logs=unwrapped.logs)
        if epoch + 1 == args.epochs or (args.knn_every and (epoch + 1) % args.knn_every == 0):
            knn = monitor_knn(args, accelerator, state, epoch + 1, *monitored)

    # ---- model and reports
    if knn is None:  # a resumed run that had already finished its epochs
        knn = knn_monitor(args, accelerator, *monitored)
    save_model(accelerator, exported.to(memory_format=torch.contiguous_format), args.output_dir, config)
    if accelerator.is_main_process:
        write_reports(args, accelerator, knn_dims, knn, state)
    end_run(run, {"dims": dims, "dataset": args.dataset, "backbone": args.model, "method": args.method,
                  "knn_accuracy": knn}, "train_ssl.py")


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


def check_args(args):
    for name in ("grad_accum_steps", "knn_k", "knn_bank_samples", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if not 0 < args.crop_min_scale <= 1:
        raise UserError(f"--crop_min_scale must be in (0, 1], got {args.crop_min_scale}")
    if args.knn_temperature <= 0:
        raise UserError("--knn_temperature must be positive")


def knn_monitor(args, accelerator, backbone, bank_loader, query_loader, dims, num_classes):
    """Per-dim weighted kNN accuracy (DINO's eval_knn, mrl/eval/retrieval.py as evaluate.py uses it) of the backbone's
    prefixes, each L2-renormalized after slicing: val queries against a labeled train bank. Cheap and label-light,
    as solo-learn and DINO monitor SSL runs; not evaluate.py's linear probe, so label the numbers "online kNN"."""
    was_training = backbone.training
    backbone.eval()
    try:
        channels_last = args.memory_format == "channels_last"
        # gathered on the host, searched on the accelerator
        bank, bank_labels = (t.to(accelerator.device) for t in embed_loader(accelerator, backbone, bank_loader, channels_last))
        queries, query_labels = (t.to(accelerator.device)
                                 for t in embed_loader(accelerator, backbone, query_loader, channels_last))
    finally:
        backbone.train(was_training)
    accuracies = []
    for d in dims:
        similarity, index = nearest_neighbors(normalized_prefix(queries, d), normalized_prefix(bank, d), args.knn_k)
        predicted = knn_predict(similarity, bank_labels[index], num_classes, args.knn_k, args.knn_temperature)
        accuracies.append((predicted == query_labels).float().mean().item())
    return accuracies


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
    script.run(main, get_args_parser().parse_args())
