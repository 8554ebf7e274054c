#!/usr/bin/env python
"""Supervised Matryoshka Representation Learning with Hugging Face Accelerate.

A backbone maps an image to an embedding z. One linear classifier per prefix z[:, :d], d in --dims, is trained on
the sum of their cross-entropies, so that every prefix of z is a useful representation on its own. --baseline
trains the usual single classifier on the full z instead; --tied shares one weight matrix among the heads (MRL-E).

examples:
  python train_supervised.py                    # the blog: cats_vs_dogs, 4-conv CNN, heads 8..1024, 15 epochs
  python train_supervised.py --baseline
  python train_supervised.py --dataset digits --epochs 8 --batch_size 32 --grad_accum_steps 1 --lr 2e-3
  python train_supervised.py --dataset cifar10 --model resnet18 --tied --mixed_precision bf16
  python -m mrl.train.supervise torchrun --nproc_per_node 8 train_supervised.py --dataset cifar10 --model resnet18
"""

import argparse
import json
import os

import torch

from mrl import UserError, cli
from mrl.batches.device_decode import EncodedCollate, EncodeTransform, decode_batch
from mrl.batches.loaders import epoch_loader
from mrl.batches.transforms import attach_transforms, build_transform
from mrl.data.presets import get_preset
from mrl.data.shards import is_webdataset
from mrl.matryoshka import (
    MatryoshkaClassifier,
    MatryoshkaHeads,
    dim_weights,
    flat_dims,
    per_head_cross_entropy,
    training_dims,
)
from mrl.models.backbones import build_backbone
from mrl.report import plots
from mrl.report.tracking import log_history_row, log_image_files, log_per_dim_table, log_summary
from mrl.run_folder.config import run_config
from mrl.run_folder.final_model import save_model
from mrl.train.loop import train_one_epoch
from mrl.train.optim import NO_DECAY, build_optimizer
from mrl.train.publish import checkpoint_pusher
from mrl.train.recipes import fill_recipe
from mrl.train.run import data_loader, end_run, load_data, resolve_preset, start_run, start_tracking, steps_per_epoch
from mrl.train.optim import progressive_resolution, warmup_then
from mrl.utils import script
from mrl.utils.distributed import unwrap


def get_args_parser():
    parser = script.ArgumentParser("train_supervised.py", description=__doc__)
    cli.add_data_args(parser, default_dataset="cats_vs_dogs")
    cli.add_model_args(parser)
    group = parser.add_argument_group("Matryoshka heads")
    group.add_argument("--baseline", action="store_true",
                       help="train one classifier on the full embedding instead of the nested heads (the blog's baseline)")
    group.add_argument("--tied", action="store_true",
                       help="MRL-E: all heads share one weight matrix, the head for d using its first d columns")
    group.add_argument("--fixed_feature", type=int, default=None, metavar="K",
                       help="the MRL paper's fixed-feature baseline FF-K: one classifier on the first K dims of the "
                            "embedding only (the embedding keeps its width; the rest of it gets no gradient)")
    group = parser.add_argument_group(
        "optimization (defaults: the dataset's recipe -- the blog's AdamW + ExponentialLR everywhere, the MRL paper's "
        "SGD recipe for --dataset imagenet; with --pretrained, the fine-tuning recipe: AdamW 1e-3 for the heads and "
        "0.1x for the backbone, weight decay 0.05 except norms and biases, 1 warmup epoch then cosine, label smoothing "
        "0.1, batch 64, 10 epochs; see mrl/train/recipes.py)")
    cli.add_optimization_args(group, defaults=dict.fromkeys(cli.OPTIMIZATION_FLAGS), choices={
        "optimizer": ("adamw", "sgd"), "lr_schedule": ("exponential", "linear", "cosine", "constant")}, notes={
        "batch_size": "(default: 8, the blog's; 1024 for imagenet, the reference's 2 GPUs x 512)",
        "grad_accum_steps": "(default: 4, the blog's; 1 for imagenet)",
        "optimizer": "adamw (the blog) or sgd with --momentum (imagenet, the reference)",
        "lr": "(default: 4e-4, the blog's; for imagenet 1.7 x global batch / 4096 = 0.425 at 1024. The reference's "
              "sources disagree -- README 0.425 at 2 x 512, paper 0.475 at 256 per GPU, yaml 0.2125 at 512 -- and 1.7 "
              "per 4096 images, linearly scaled, is the rule that FFCV's 77.2%% run used and the README's and yaml's "
              "numbers follow)",
        "backbone_lr_scale": "What is new: the heads, an --embed_dim projection (default: 0.1 with --pretrained, the "
                             "fine-tuning recipe; else 1)",
        "weight_decay": "(default: 0.01, AdamW as the blog; 1e-4 for imagenet)",
        "lr_schedule": "After the warmup: exponential = x --lr_gamma per epoch (the blog); linear = down to 0 at the "
                       "end (the reference's imagenet schedule); cosine; constant",
        "warmup_epochs": "From 1e-4 x --lr (default: 0; 2 for imagenet)",
        "max_grad_norm": "The blog clipped at 1.0 (the default), but on every micro-batch; here it is clipped once "
                         "per accumulated step. imagenet: off, as the reference",
        "memory_format": "(default: contiguous, as the blog; channels_last for imagenet)"})
    group.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: 0.9)")
    group.add_argument("--no_decay", default=None, choices=tuple(NO_DECAY),
                       help="parameters exempt from weight decay: none (the blog); bn_named = those whose name "
                            "contains 'bn' (the reference's rule for imagenet: the ResNet's bn1/bn2/bn3, not its "
                            "downsample BatchNorms); norm_bias = every 1-d parameter")
    group.add_argument("--lr_gamma", type=float, default=None,
                       help="exponential schedule: the factor per epoch (default: 0.85, the blog's)")
    group.add_argument("--label_smoothing", type=float, default=None,
                       help="label smoothing of every head's cross-entropy (default: 0; 0.1 for imagenet)")
    group.add_argument("--min_res", type=int, default=None,
                       help="progressive resizing (FFCV's, as the reference trains imagenet): train at --min_res px "
                            "until --start_ramp, then ramp in steps of 32 px to --max_res at --end_ramp. Evaluation "
                            "stays at --image_size (default: off; 160 for imagenet)")
    group.add_argument("--max_res", type=int, default=None, help="progressive resizing: the last resolution "
                                                                "(default: --min_res; 192 for imagenet)")
    group.add_argument("--start_ramp", type=int, default=None,
                       help="progressive resizing: the epoch the ramp starts (default: 29/40 of --epochs, the reference's)")
    group.add_argument("--end_ramp", type=int, default=None,
                       help="progressive resizing: the epoch it reaches --max_res (default: 34/40 of --epochs)")
    group.add_argument("--blurpool", action=argparse.BooleanOptionalAction, default=None,
                       help="ResNets: blur before every strided convolution (BlurPool, as the reference trains "
                            "imagenet; default: off, on for imagenet)")
    group.add_argument("--freeze_backbone_epochs", type=int, default=None,
                       help="train the heads (and projection) alone for the first N epochs, the backbone's network "
                            "frozen in eval mode (a linear probe), then fine-tune everything (default: 0)")
    group.add_argument("--layer_decay", type=float, default=None,
                       help="timm backbones: layer-wise learning-rate decay, each layer below the last at this times "
                            "the rate of the one above, from timm's layer groups (e.g. 0.65-0.75 for ViTs, BEiT's "
                            "recipe; default: off)")
    group = parser.add_argument_group("decoding")
    group.add_argument("--decode_on_device", action="store_true",
                       help="the DataLoader workers only read the JPEGs' bytes; the training device decodes each batch "
                            "at once (nvJPEG on CUDA, through TorchCodec) and draws RandomResizedCrop + flip there, "
                            "with the seeds the workers would use. For when the CPUs cannot feed the GPUs: about 300 "
                            "images/s per core decode on a CPU, an A100 trains ResNet-50 at ~3,300 (benchmarks/README.md)."
                            " Training augmentations other than resized_crop_flip (imagenet, custom) stay on the CPU")
    group.add_argument("--reduced_decode", action="store_true",
                       help="decode each plain JPEG in the workers at the largest of libjpeg's reduced scales (1/2, "
                            "1/4, 1/8) that still gives its crop at least the output resolution: the crop box drawn "
                            "from the header first (the same boxes and flips as without it), the rest of the image's "
                            "pixels never computed. Changes the pixels of the crops it reduces (PSNR about 42 dB "
                            "against a full decode with the same crop; mrl/batches/reduced_decode.py), so it is off by "
                            "default; pays on images well above the training resolution (benchmarks/README.md). "
                            "RandomResizedCrop and evaluation's Resize -> CenterCrop; other augmentations decode in "
                            "full")
    cli.add_run_args(parser, default_epochs=None)
    parser._option_string_actions["--epochs"].help = "training epochs (default: 15, the blog's; 40 for imagenet)"
    cli.add_hub_args(parser)
    return parser


def main(args):
    fill_recipe(args)  # the flags left out: the dataset's recipe (the blog's, or the MRL paper's for imagenet)
    check_args(args)
    preset, source = resolve_preset(args, "supervised_" + variant(args), augment="pretrained")
    pusher = checkpoint_pusher(args)  # with --hub_push_checkpoints: every checkpoint saved is uploaded
    run = start_run(args, after_save=pusher)  # --batch_size is the global batch, split over the processes
    accelerator, state = run.accelerator, run.state

    # ---- data: train / validation / test, decoded and augmented lazily in the DataLoader workers
    splits = load_data(run, streams=True)  # webdataset shards come as streams (mrl.data.shards)
    train_transform = attach_transforms(splits, preset.augment, args.image_size, preset.mean, preset.std, args.seed,
                                        decoder=args.decoder, preprocessing=source.preprocessing,
                                        reduced_decode=args.reduced_decode)
    eval_batch_size = args.batch_size * args.grad_accum_steps  # no activations kept for backward: bigger batches fit
    if args.decode_on_device:  # the workers send the JPEGs' bytes; forward decodes and augments them on the device
        splits.train.set_transform(EncodeTransform(args.decoder))
        train_loader = data_loader(args, splits.train, args.batch_size, train=True, collate_fn=EncodedCollate())
    else:
        train_loader = data_loader(args, splits.train, args.batch_size, train=True)
    val_loader = data_loader(args, splits.val, eval_batch_size, train=False)
    test_loader = data_loader(args, splits.test, eval_batch_size, train=False) if splits.test is not None else None

    # ---- model: backbone + one linear head per prefix dim (a single full-width head for the baseline)
    cifar_stem = {"auto": None, "on": True, "off": False}[args.cifar_stem]
    backbone = build_backbone(args.model, args.image_size, cifar_stem, args.norm, blurpool=args.blurpool,
                              pretrained=args.pretrained, embed_dim=args.embed_dim, timm=source.timm)
    if args.baseline:
        dims = [backbone.embed_dim]
    elif args.fixed_feature:  # FF-K: one head, on the first K dims
        dims = training_dims([[args.fixed_feature]], backbone.embed_dim, name="--fixed_feature")
    else:
        dims = training_dims(args.dims, backbone.embed_dim)
    model = MatryoshkaClassifier(backbone, MatryoshkaHeads(dims, len(splits.class_names), tied=args.tied))
    if args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.memory_format == "channels_last":  # the convolutions' outputs follow their weights' layout
        model = model.to(memory_format=torch.channels_last)
    loss_weights = torch.tensor(dim_weights(dims, args.dim_weights, given=flat_dims(args.dims)))
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.momentum, args.no_decay,
                                args.backbone_lr_scale, args.layer_decay)

    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    train_loader = epoch_loader(accelerator, train_loader, train_transform)  # what the loop draws epochs from
    test_loader = accelerator.prepare(test_loader) if test_loader is not None else None
    loss_weights = loss_weights.to(accelerator.device)
    steps = steps_per_epoch(args, train_loader)
    lr_schedule = warmup_then(args.lr_schedule, args.lr, args.epochs, steps, args.warmup_epochs, args.lr_gamma)
    run.resume()

    def forward(batch):  # the sum of the heads' cross-entropies, each weighted by its dim's --dim_weights
        pixels = batch["pixel_values"]
        if args.decode_on_device:
            pixels = decode_batch(batch, resolution(args, state.epoch), state.epoch, True, preset.mean, preset.std,
                                  args.seed, channels_last=args.memory_format == "channels_last")
        _, logits = model(pixels)
        per_dim = per_head_cross_entropy(logits, batch["labels"], args.label_smoothing)
        return (loss_weights * per_dim).sum(), per_dim

    parameters = sum(p.numel() for p in model.parameters())
    split_sizes = {"train": len(splits.train), "val": len(splits.val),
                   "test": len(splits.test) if splits.test is not None else 0}
    heads = {"dims": dims, "num_classes": len(splits.class_names), "tied": args.tied, "baseline": args.baseline,
             "fixed_feature": args.fixed_feature}
    config = start_tracking(run, {  # what the code derived from the flags, next to them on the W&B page
        "dims": dims, "embed_dim": backbone.embed_dim, "num_classes": len(splits.class_names),
        "split_sizes": split_sizes, "parameters": parameters, "steps_per_epoch": steps,
        "accuracy_at_chance": 1 / len(splits.class_names)},
        run_config(args, backbone, splits, preset.mean, preset.std, preset.augment, heads=heads, timm=source.timm,
                   preprocessing=source.preprocessing),
        relog=lambda row: validation_log(dims, row))
    accelerator.print(
        f"{args.dataset}: {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test) if splits.test is not None else 0} test images, {len(splits.class_names)} classes"
        + (f" ({splits.dropped} dropped: under {args.min_image_size or preset.min_image_size} px or unreadable)"
           if splits.dropped else "")
        + f"\n{args.model}{' (pretrained)' if args.pretrained else ''}: embedding {backbone.embed_dim}, "
        + f"heads at dims {dims}"
        + f"{' (MRL-E, tied)' if args.tied else ''}, {parameters:,} parameters"
        + f"\n{args.epochs} epochs x {steps} optimizer steps, "
        + (f"training at {args.min_res}-{args.max_res} px (progressive resizing; --min_res/--max_res), evaluating at "
           f"{args.image_size}, " if args.min_res else "")
        + f"{accelerator.num_processes} process(es), mixed precision: {accelerator.mixed_precision}, "
        + f"JPEGs decoded {'on the device' if args.decode_on_device else f'in the workers ({args.decoder})'}"
        + (" at reduced scales where the crops allow" if args.reduced_decode else "") + ", "
        + f"output: {args.output_dir}")

    # ---- train; the heads' validation accuracy after every epoch
    for epoch in run.epochs():
        if args.freeze_backbone_epochs:  # the heads alone first (a linear probe), then everything
            frozen, bare = epoch < args.freeze_backbone_epochs, unwrap(accelerator, model)
            if frozen != bare.net_frozen:
                accelerator.print(f"epoch {epoch + 1}: the backbone's network "
                                  + ("is frozen, the heads train alone" if frozen else "trains from here on"))
            bare.freeze_net(frozen)
        if args.min_res and not args.decode_on_device:  # progressive resizing (evaluation stays at --image_size)
            train_transform.transform = build_transform(preset.augment, resolution(args, epoch), preset.mean,
                                                        preset.std, train=True)
        train_one_epoch(run, model, optimizer, train_loader, lr_schedule, dims, loss_weights, forward)
        val = evaluate(accelerator, model, val_loader, dims, args.label_smoothing)
        state.history.append({"epoch": epoch + 1, "step": state.step, "val_accuracy": val["accuracy"],
                              "val_loss": val["loss"]} | ({"val_top5": val["top5"]} if "top5" in val else {})
                             | ({"train_resolution": resolution(args, epoch)} if args.min_res else {}))
        log_history_row(accelerator, state, validation_log(dims, state.history[-1]), step=state.step)
        accelerator.print(f"epoch {epoch + 1}: val accuracy " + "  ".join(
            f"d{d} {a:.3f}" for d, a in zip(dims, val["accuracy"])))

    # ---- final evaluation, model and reports
    val = evaluate(accelerator, model, val_loader, dims, args.label_smoothing, keep_embeddings=2000)
    test = evaluate(accelerator, model, test_loader, dims, args.label_smoothing) if test_loader is not None else None
    save_model(accelerator, model, args.output_dir, config)
    if accelerator.is_main_process:
        write_reports(args, accelerator, dims, val, test, state, splits.class_names)
    end_run(run, {"dims": dims, "dataset": args.dataset, "backbone": args.model,
                  "test_accuracy": test["accuracy"] if test else None}, "train_supervised.py")


@torch.no_grad()
def evaluate(accelerator, model, loader, dims, label_smoothing=0.0, keep_embeddings=0):
    """Per-head top-1 accuracy (and top-5 with more than 10 classes) and mean cross-entropy (with the training loss's
    label smoothing, so that the two compare) over the whole split, gathered from every process.

    `keep_embeddings` > 0 also returns the first that many embeddings and labels (for the PCA plot).
    """
    model.eval()
    logits_all, labels_all, embeddings = [], [], []
    for batch in loader:
        z, logits = model(batch["pixel_values"])
        # gather_for_metrics concatenates along the batch dim and drops the samples the last batch repeated
        logits, labels, z = accelerator.gather_for_metrics((logits.transpose(0, 1).float(), batch["labels"], z.float()))
        logits_all.append(logits.cpu())
        labels_all.append(labels.cpu())
        if sum(len(e) for e in embeddings) < keep_embeddings:
            embeddings.append(z.cpu())
    logits, labels = torch.cat(logits_all), torch.cat(labels_all)
    valid = labels >= 0  # unreadable images were masked with label -1
    if not valid.any():
        raise UserError(f"none of the {len(labels)} evaluation images could be read (corrupt or empty files?)")
    logits, labels = logits[valid].transpose(0, 1), labels[valid]
    result = {"accuracy": (logits.argmax(-1) == labels).float().mean(1).tolist(),
              "loss": per_head_cross_entropy(logits, labels, label_smoothing).tolist(), "n": len(labels)}
    if logits.shape[-1] > 10:
        top5 = logits.topk(5, dim=-1).indices
        result["top5"] = (top5 == labels[:, None]).any(-1).float().mean(1).tolist()
    if keep_embeddings:
        embeddings = torch.cat(embeddings)
        kept = valid[:len(embeddings)]
        result["embeddings"] = embeddings[kept][:keep_embeddings]
        result["labels"] = torch.cat(labels_all)[:len(embeddings)][kept][:keep_embeddings]
    return result


def check_args(args):
    """What argparse cannot check, before any work is done."""
    if args.fixed_feature is not None and (args.baseline or args.tied or args.dims):
        raise UserError("--fixed_feature K trains one head on the first K dims: it goes with none of --baseline, "
                        "--tied, --dims")
    if args.fixed_feature is not None and args.fixed_feature < 1:
        raise UserError(f"--fixed_feature must be at least 1, got {args.fixed_feature}")
    if args.min_res is not None and not (0 < args.min_res <= args.max_res and args.start_ramp <= args.end_ramp):
        raise UserError(f"progressive resizing needs 0 < --min_res <= --max_res and --start_ramp <= --end_ramp, got "
                        f"{args.min_res}, {args.max_res}, {args.start_ramp}, {args.end_ramp}")
    if args.decode_on_device and get_preset(args.dataset).augment != "resized_crop_flip":
        raise UserError(f"--decode_on_device draws RandomResizedCrop + flip on the device; --dataset {args.dataset} "
                        f"trains with its own augmentation ({get_preset(args.dataset).augment})")
    if args.decode_on_device and args.reduced_decode:
        raise UserError("--reduced_decode decodes in the DataLoader workers, --decode_on_device on the device: choose "
                        "one")
    if args.decode_on_device and args.dataset_path and is_webdataset(args.dataset_path):
        raise UserError("--decode_on_device reads map-style sources (an ILSVRC folder, the Hub's parquet layout); "
                        "webdataset shards decode in the workers")
    if not 0 <= args.label_smoothing < 1:
        raise UserError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if not 0 <= args.freeze_backbone_epochs <= args.epochs:
        raise UserError(f"--freeze_backbone_epochs must be in 0..--epochs ({args.epochs}), got "
                        f"{args.freeze_backbone_epochs}")
    if args.freeze_backbone_epochs and args.model.startswith("cnn4"):
        raise UserError("--freeze_backbone_epochs freezes a ResNet's or timm model's network; cnn4 has none to keep")
    if args.backbone_lr_scale < 0 or (args.layer_decay is not None and not 0 < args.layer_decay <= 1):
        raise UserError(f"--backbone_lr_scale must be >= 0 and --layer_decay in (0, 1], got {args.backbone_lr_scale}, "
                        f"{args.layer_decay}")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        raise UserError(f"--warmup_epochs must be in 0..--epochs ({args.epochs}), got {args.warmup_epochs}")


def variant(args):
    """What is trained, as the default --output_dir and the reports name it."""
    if args.fixed_feature:
        return f"ff{args.fixed_feature}"
    return "baseline" if args.baseline else "mrl-e" if args.tied else "mrl"


def resolution(args, epoch):
    """The training resolution of `epoch`: --image_size, or progressive resizing's."""
    if not args.min_res:
        return args.image_size
    return progressive_resolution(epoch, args.min_res, args.max_res, args.start_ramp, args.end_ramp)


def validation_log(dims, row):
    """What W&B gets for an epoch's validation row of state.history (and what a resumed run logs again)."""
    return {"epoch": row["epoch"], "val/loss": sum(row["val_loss"]),
            "val/loss_mean_over_dims": sum(row["val_loss"]) / len(row["val_loss"]),
            **{f"val/accuracy_d{d}": a for d, a in zip(dims, row["val_accuracy"])},
            **{f"val/top5_d{d}": a for d, a in zip(dims, row.get("val_top5", ()))},
            **({"train/resolution": row["train_resolution"]} if "train_resolution" in row else {}),
            **{f"val/loss_d{d}": l for d, l in zip(dims, row["val_loss"])}}


def write_reports(args, accelerator, dims, val, test, state, class_names):
    """metrics.json, the per-dim table on stdout and in W&B, and the plots (PNG files, also sent to W&B)."""
    metrics = {"protocol": "each Matryoshka head's own prediction (no probe)", "dims": dims,
               "val": {k: val[k] for k in ("accuracy", "top5", "loss", "n") if k in val},
               "test": {k: test[k] for k in ("accuracy", "top5", "loss", "n") if k in test} if test else None,
               "history": state.history, "steps": state.step}
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)

    columns = {f"{split}_{metric}": result[metric] for split, result in (("val", val), ("test", test)) if result
               for metric in ("accuracy", "top5") if metric in result}
    label = {"mrl": "MRL", "mrl-e": "MRL-E", "baseline": "baseline"}.get(variant(args), f"FF-{args.fixed_feature}")
    print(f"\n{label} heads ({args.model} on {args.dataset}), accuracy per dim:")
    print("  dim  " + "  ".join(f"{c:>13}" for c in columns))
    for i, d in enumerate(dims):
        print(f"{d:>5}  " + "  ".join(f"{columns[c][i]:>13.4f}" for c in columns))
    print(f"saved {os.path.join(args.output_dir, 'model.safetensors')} and metrics.json")
    log_per_dim_table(accelerator, "accuracy_per_dim", dims, columns, step=state.step,
                      chart_key="charts/accuracy_vs_dim", title=f"{label} heads: accuracy against log2(dim)")
    if test:  # the runs table compares runs by these (val/accuracy_d* hold their best and last epochs there)
        log_summary(accelerator, {f"test/{name}_d{d}": value for name in ("accuracy", "top5", "loss") if name in test
                                  for d, value in zip(dims, test[name])})

    plot_dims = sorted({dims[0], dims[len(dims) // 3], dims[2 * len(dims) // 3], dims[-1]})
    images = {"embeddings/pca": plots.pca_scatter(val["embeddings"], val["labels"], plot_dims, class_names,
                                                  os.path.join(args.output_dir, "pca_val.png"),
                                                  title=f"validation embeddings, {label}")}
    if len(dims) > 1:
        curves = {f"{name} ({label})": (dims, values) for name, values in columns.items()}
        images["plots/accuracy_vs_dim"] = plots.accuracy_vs_dim(curves,
                                                               os.path.join(args.output_dir, "accuracy_vs_dim.png"))
    log_image_files(accelerator, images, step=state.step)


if __name__ == "__main__":
    script.run(main, get_args_parser().parse_args())
