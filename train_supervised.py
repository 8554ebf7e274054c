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
  python -m mrl.supervise torchrun --nproc_per_node 8 train_supervised.py --dataset cifar10 --model resnet18
"""

import argparse
import json
import math
import os
import time

import torch

from mrl import UserError, cli, plots
from mrl.checkpoint import (TrainState, load_checkpoint, resolve_checkpoint, save_checkpoint, save_model,
                            write_config)
from mrl.data import Collate, FillUnreadable, attach_transforms, get_preset, load_splits
from mrl.guards import LossGuard, Preemption, ignore_signals_in_worker
from mrl.loop import (StepMeter, accumulation_scale, after_optimizer_step, build_accelerator, check_readable,
                      count_batch, end_epoch, epoch_batches, log_train_losses)
from mrl.losses import dim_weights, per_head_cross_entropy
from mrl.models import MatryoshkaClassifier, MatryoshkaHeads, build_backbone, check_dims, default_dims
from mrl.pretrained import publish_run
from mrl.schedules import exponential_schedule
from mrl.tracking import (finish_tracking, init_tracking, log_history_row, log_image_files, log_model_artifact,
                          log_per_dim_table, log_summary, wandb_info)


def get_args_parser():
    parser = argparse.ArgumentParser("train_supervised.py", description=__doc__, formatter_class=cli.HelpFormatter)
    cli.add_data_args(parser, default_dataset="cats_vs_dogs")
    cli.add_model_args(parser)
    group = parser.add_argument_group("Matryoshka heads")
    group.add_argument("--baseline", action="store_true",
                       help="train one classifier on the full embedding instead of the nested heads (the blog's baseline)")
    group.add_argument("--tied", action="store_true",
                       help="MRL-E: all heads share one weight matrix, the head for d using its first d columns")
    group.add_argument("--dim_weights", default="uniform",
                       help="loss weight per dim: 'uniform' (the blog and the paper) or comma-separated numbers")
    group = parser.add_argument_group("optimization (defaults: the blog's)")
    group.add_argument("--batch_size", type=int, default=8,
                       help="images per forward pass, summed over all processes (split evenly among them)")
    group.add_argument("--grad_accum_steps", type=int, default=4, help="forward passes per optimizer step")
    group.add_argument("--lr", type=float, default=4e-4, help="AdamW learning rate")
    group.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (torch's default, as the blog)")
    group.add_argument("--lr_gamma", type=float, default=0.85, help="learning rate x gamma after every epoch (ExponentialLR)")
    group.add_argument("--sync_bn", action="store_true",
                       help="multi-GPU: BatchNorm statistics over the global batch (SyncBatchNorm), so that a run on "
                            "N GPUs normalizes like one on a single GPU")
    group.add_argument("--memory_format", default="contiguous", choices=("contiguous", "channels_last"),
                       help="weight and activation layout: contiguous is PyTorch's default, as the blog; "
                            "channels_last runs bf16/fp16 convolutions faster on recent GPUs")
    group.add_argument("--max_grad_norm", type=float, default=1.0,
                       help="clip the gradient norm at every optimizer step (0: off). The blog clipped at 1.0, but on "
                            "every micro-batch; here it is clipped once per accumulated step")
    cli.add_run_args(parser, default_epochs=15)
    cli.add_hub_args(parser)
    return parser


def main(args):
    preset = get_preset(args.dataset)
    args.model = args.model or preset.model
    args.image_size = args.image_size or preset.image_size
    cli.resolve_run_args(args, "supervised_" + ("baseline" if args.baseline else "mrl-e" if args.tied else "mrl"))

    accelerator = build_accelerator(args)  # --batch_size is the global batch, split over the processes
    preemption = Preemption(accelerator)
    resuming = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint) is not None
    cli.check_output_dir(args, resuming=resuming, is_main=accelerator.is_main_process)

    # ---- data: train / validation / test, decoded and augmented lazily in the DataLoader workers
    with accelerator.main_process_first():
        splits = load_splits(args.dataset, args.dataset_path, seed=args.seed, val_fraction=args.val_fraction,
                             test_fraction=args.test_fraction, max_train_samples=args.max_train_samples,
                             max_eval_samples=args.max_eval_samples, min_image_size=args.min_image_size)
    train_transform = attach_transforms(splits, preset.augment, args.image_size, preset.mean, preset.std, args.seed)
    eval_batch_size = args.batch_size * args.grad_accum_steps  # no activations kept for backward: bigger batches fit
    # Training batches are whole: on N processes Accelerate would pad an epoch's last, incomplete batch with images
    # repeated from its start, so that step would not be the one a single process takes (an epoch leaves out fewer
    # than --batch_size images, others each epoch).
    loader = lambda ds, batch_size, train: torch.utils.data.DataLoader(  # noqa: E731
        FillUnreadable(ds, evaluation=not train), batch_size=batch_size, shuffle=train, drop_last=train,
        num_workers=args.num_workers, collate_fn=Collate(), pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_signals_in_worker)
    train_loader = loader(splits.train, args.batch_size, True)
    if len(train_loader) == 0:
        raise UserError(f"{len(splits.train)} training images are fewer than one batch of --batch_size "
                        f"{args.batch_size}")
    val_loader = loader(splits.val, eval_batch_size, False)
    test_loader = loader(splits.test, eval_batch_size, False) if splits.test is not None else None

    # ---- model: backbone + one linear head per prefix dim (a single full-width head for the baseline)
    cifar_stem = {"auto": None, "on": True, "off": False}[args.cifar_stem]
    backbone = build_backbone(args.model, args.image_size, cifar_stem, args.norm)
    if args.baseline:
        dims = [backbone.embed_dim]
    else:
        dims = check_dims(cli.flat_dims(args.dims) or default_dims(backbone.embed_dim), backbone.embed_dim)
    model = MatryoshkaClassifier(backbone, MatryoshkaHeads(dims, len(splits.class_names), tied=args.tied))
    if args.sync_bn and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.memory_format == "channels_last":  # the convolutions' outputs follow their weights' layout
        model = model.to(memory_format=torch.channels_last)
    loss_weights = torch.tensor(dim_weights(dims, args.dim_weights, given=cli.flat_dims(args.dims)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    test_loader = accelerator.prepare(test_loader) if test_loader is not None else None
    loss_weights = loss_weights.to(accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    # The learning rate of every optimizer step, precomputed; an epoch ends with a step even when its last
    # accumulation group is incomplete.
    steps_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    lr_schedule = exponential_schedule(args.lr, args.lr_gamma, args.epochs, steps_per_epoch)
    resumed = load_checkpoint(accelerator, args.output_dir, args.resume_from_checkpoint)
    if resumed:
        accelerator.print(f"resumed from {resumed}: epoch {state.epoch}, step {state.step}, batch {state.batch_in_epoch}")
    parameters = sum(p.numel() for p in model.parameters())
    split_sizes = {"train": len(splits.train), "val": len(splits.val),
                   "test": len(splits.test) if splits.test is not None else 0}
    init_tracking(accelerator, args, state, {  # the flags, and what the code derived from them
        **vars(args), "dims": dims, "embed_dim": backbone.embed_dim, "num_classes": len(splits.class_names),
        "split_sizes": split_sizes, "parameters": parameters, "steps_per_epoch": steps_per_epoch,
        "processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
        "accuracy_at_chance": 1 / len(splits.class_names)}, relog=lambda row: validation_log(dims, row))
    config = {**model_config(args, backbone, dims, splits, preset), "wandb": wandb_info(state, args)}
    if accelerator.is_main_process:  # now, not only at the end: the run's checkpoints can be evaluated with it
        write_config(args.output_dir, config)
    accelerator.print(
        f"{args.dataset}: {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test) if splits.test is not None else 0} test images, {len(splits.class_names)} classes"
        + (f" ({splits.dropped} dropped: under {args.min_image_size or preset.min_image_size} px or unreadable)"
           if splits.dropped else "")
        + f"\n{args.model}: embedding {backbone.embed_dim}, heads at dims {dims}"
        + f"{' (MRL-E, tied)' if args.tied else ''}, {parameters:,} parameters"
        + f"\n{args.epochs} epochs x {steps_per_epoch} optimizer steps, {accelerator.num_processes} process(es), "
        + f"mixed precision: {accelerator.mixed_precision}, output: {args.output_dir}")

    # ---- train
    for epoch in range(state.epoch, args.epochs):
        train_one_epoch(args, accelerator, model, optimizer, train_loader, train_transform, dims, loss_weights,
                        lr_schedule, state, epoch, preemption)
        val = evaluate(accelerator, model, val_loader, dims)
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        state.history.append({"epoch": epoch + 1, "step": state.step, "val_accuracy": val["accuracy"],
                              "val_loss": val["loss"]})
        log_history_row(accelerator, state, validation_log(dims, state.history[-1]), step=state.step)
        accelerator.print(f"epoch {epoch + 1}: val accuracy " + "  ".join(
            f"d{d} {a:.3f}" for d, a in zip(dims, val["accuracy"])))
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, args.output_dir, state.step, args.checkpoints_total_limit)

    # ---- final evaluation, model and reports
    val = evaluate(accelerator, model, val_loader, dims, keep_embeddings=2000)
    test = evaluate(accelerator, model, test_loader, dims) if test_loader is not None else None
    save_model(accelerator, model, args.output_dir, config)
    if accelerator.is_main_process:
        write_reports(args, accelerator, dims, val, test, state, splits.class_names)
    log_model_artifact(accelerator, args, state,
                       {"dims": dims, "dataset": args.dataset, "backbone": args.model,
                        "test_accuracy": test["accuracy"] if test else None})
    finish_tracking(accelerator)
    accelerator.end_training()
    publish_run(args, accelerator, "train_supervised.py")  # the model card; with --push_to_hub, the upload


def train_one_epoch(args, accelerator, model, optimizer, train_loader, train_transform, dims, loss_weights,
                    lr_schedule, state, epoch, preemption):
    model.train()
    start = time.perf_counter()
    batches, progress = epoch_batches(accelerator, train_loader, train_transform, state, epoch, args.epochs)
    group_losses, skipped, loaded, unreadable = [], 0, 0, []
    guard = LossGuard(accelerator.device)
    meter = StepMeter(state.step)  # throughput and data-wait time between logs
    for batch in meter.batches(batches):
        skipped, loaded = skipped + batch["skipped"], loaded + len(batch["labels"])  # no device sync per batch
        unreadable += batch["unreadable"]
        check_readable(batch)
        loss, per_dim, grad_norm = training_step(
            accelerator, model, optimizer, batch, loss_weights, float(lr_schedule[state.step]), args.max_grad_norm,
            accumulation_scale(state.batch_in_epoch, len(train_loader), args.grad_accum_steps),
            measure_norm=(state.step + 1) % args.log_every == 0)
        group_losses.append(per_dim)
        if not count_batch(accelerator, state, guard, progress, loss):
            continue  # mid accumulation group
        if state.step % args.log_every == 0:
            guard.check(accelerator)
            log_train_losses(accelerator, progress, state, epoch, len(train_loader), dims, loss_weights, group_losses,
                             float(lr_schedule[state.step - 1]), grad_norm, meter)
        group_losses = []
        after_optimizer_step(args, accelerator, state, guard, preemption)
    progress.close()
    guard.check(accelerator)
    end_epoch(accelerator, skipped, loaded, epoch, state.step, time.perf_counter() - start, unreadable)


def training_step(accelerator, model, optimizer, batch, loss_weights, lr, max_grad_norm, scale=1.0,
                  measure_norm=False):
    """One forward and backward pass; at the end of an accumulation group, the optimizer steps at `lr` after
    clipping (once per step, not per micro-batch). `scale` multiplies the loss in backward (see
    loop.accumulation_scale). Returns the loss and the per-head losses, detached, and the gradient norm before
    clipping (a device tensor, read when logged) where the step clipped or `measure_norm` asked for it, else None."""
    grad_norm = None
    with accelerator.accumulate(model):
        _, logits = model(batch["pixel_values"])
        per_dim = per_head_cross_entropy(logits, batch["labels"])
        loss = (loss_weights * per_dim).sum()
        accelerator.backward(loss * scale if scale != 1.0 else loss)
        if accelerator.sync_gradients:
            for group in optimizer.param_groups:
                group["lr"] = lr  # a Python float: a numpy scalar in the optimizer state would not reload
            if max_grad_norm > 0 or measure_norm:  # an infinite threshold measures without clipping
                grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                        max_grad_norm if max_grad_norm > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad()
    return loss.detach(), per_dim.detach(), grad_norm


@torch.no_grad()
def evaluate(accelerator, model, loader, dims, keep_embeddings=0):
    """Per-head accuracy and mean cross-entropy over the whole split, gathered from every process.

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
              "loss": per_head_cross_entropy(logits, labels).tolist(), "n": len(labels)}
    if keep_embeddings:
        embeddings = torch.cat(embeddings)
        kept = valid[:len(embeddings)]
        result["embeddings"] = embeddings[kept][:keep_embeddings]
        result["labels"] = torch.cat(labels_all)[:len(embeddings)][kept][:keep_embeddings]
    return result


def validation_log(dims, row):
    """What W&B gets for an epoch's validation row of state.history (and what a resumed run logs again)."""
    return {"epoch": row["epoch"], "val/loss": sum(row["val_loss"]),
            "val/loss_mean_over_dims": sum(row["val_loss"]) / len(row["val_loss"]),
            **{f"val/accuracy_d{d}": a for d, a in zip(dims, row["val_accuracy"])},
            **{f"val/loss_d{d}": l for d, l in zip(dims, row["val_loss"])}}


def model_config(args, backbone, dims, splits, preset):
    """What evaluate.py needs to rebuild the model and its preprocessing (saved as config.json)."""
    return {
        "kind": "supervised",
        "model": {"backbone": args.model, "embed_dim": backbone.embed_dim,
                  "cifar_stem": getattr(backbone, "cifar_stem", None), "norm": args.norm},
        "heads": {"dims": dims, "num_classes": len(splits.class_names), "tied": args.tied, "baseline": args.baseline,
                  "class_names": splits.class_names},
        "data": {"dataset": args.dataset, "dataset_path": args.dataset_path, "image_size": args.image_size,
                 "mean": list(preset.mean), "std": list(preset.std), "augment": preset.augment, "seed": args.seed,
                 "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
                 "splits": splits.record},  # everything that defines the splits: evaluate.py rebuilds them from it
        "args": vars(args),
    }


def write_reports(args, accelerator, dims, val, test, state, class_names):
    """metrics.json, the per-dim table on stdout and in W&B, and the plots (PNG files, also sent to W&B)."""
    metrics = {"protocol": "each Matryoshka head's own prediction (no probe)", "dims": dims,
               "val": {k: val[k] for k in ("accuracy", "loss", "n")},
               "test": {k: test[k] for k in ("accuracy", "loss", "n")} if test else None,
               "history": state.history, "steps": state.step}
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)

    columns = {"val_accuracy": val["accuracy"]} | ({"test_accuracy": test["accuracy"]} if test else {})
    label = "baseline" if args.baseline else "MRL-E" if args.tied else "MRL"
    print(f"\n{label} heads ({args.model} on {args.dataset}), accuracy per dim:")
    print("  dim  " + "  ".join(f"{c:>13}" for c in columns))
    for i, d in enumerate(dims):
        print(f"{d:>5}  " + "  ".join(f"{columns[c][i]:>13.4f}" for c in columns))
    print(f"saved {os.path.join(args.output_dir, 'model.safetensors')} and metrics.json")
    log_per_dim_table(accelerator, "accuracy_per_dim", dims, columns, step=state.step,
                      chart_key="charts/accuracy_vs_dim", title=f"{label} heads: accuracy against log2(dim)")
    if test:  # the runs table compares runs by these (val/accuracy_d* hold their best and last epochs there)
        log_summary(accelerator, {f"test/{name}_d{d}": value for name in ("accuracy", "loss")
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
    cli.run(main, get_args_parser().parse_args())
