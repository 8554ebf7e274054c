"""The bookkeeping both training scripts share around their own training step: the Accelerator they run under,
where an epoch starts after a resume, progress, throughput and unreadable-image counts, and what happens after an
optimizer step (checkpoint, preemption)."""

import time

import torch
from accelerate.utils import DataLoaderConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

from mrl import UserError
from mrl.checkpoint import save_checkpoint
from mrl.distributed import make_accelerator
from mrl.guards import Preempted, write_preempted_marker
from mrl.tracking import mark_preempting


UNREADABLE_SHOWN = 3  # how many unreadable images an epoch's summary names


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


def epoch_batches(accelerator, train_loader, train_transform, state, epoch, epochs):
    """The batches of `epoch` still to train on, and a progress bar over the whole epoch.

    The shuffle order and every sample's augmentation are functions of (seed, epoch), so after a mid-epoch resume
    skipping the batches already consumed (for this epoch only) replays the uninterrupted run exactly.
    """
    train_transform.epoch = epoch  # read by the DataLoader workers when they start, i.e. at iter(batches)
    train_loader.set_epoch(epoch)
    batches = accelerator.skip_first_batches(train_loader, state.batch_in_epoch) if state.batch_in_epoch else train_loader
    progress = tqdm(total=len(train_loader), initial=state.batch_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    return batches, progress


def accumulation_scale(batch_in_epoch, batches_in_epoch, accumulation_steps):
    """The factor that makes an optimizer step the mean over the micro-batches its accumulation group really holds.

    Accelerate divides every micro-batch's loss by --grad_accum_steps N and steps at the end of the epoch even when
    its last group is incomplete (the groups start afresh each epoch); a last group of k < N micro-batches would
    then step on k/N of the mean gradient. Multiplying that group's losses by N/k restores the mean.
    `batch_in_epoch`: the index of the micro-batch about to be trained on.
    """
    group_start = batch_in_epoch - batch_in_epoch % accumulation_steps
    return accumulation_steps / min(accumulation_steps, batches_in_epoch - group_start)


def check_readable(batch):
    """Stop with one line when a training batch came out empty: no image of the whole split can be read (see
    data.FillUnreadable, which fills in every unreadable one otherwise)."""
    if batch["labels"].numel() == 0:
        names = ", ".join(batch["unreadable"][:UNREADABLE_SHOWN])
        raise UserError(f"none of the training images could be read ({names}, ...): corrupt or empty files?")


def count_batch(accelerator, state, guard, progress, loss):
    """Bookkeeping after each forward/backward pass: the loss goes to the NaN guard, the batch to the resume position
    and the progress bar; at the end of an accumulation group the optimizer step is counted (and, with fp16, whether
    the grad scaler skipped it). Returns whether an optimizer step was taken."""
    guard.update(loss, state.step + 1)
    state.batch_in_epoch += 1
    progress.update(1)
    if not accelerator.sync_gradients:
        return False
    state.step += 1
    state.skipped_steps += accelerator.optimizer_step_was_skipped
    return True


def after_optimizer_step(args, accelerator, state, guard, preemption):
    """Save a checkpoint every --checkpointing_steps steps; on a preemption signal save one and stop the run,
    leaving the PREEMPTED marker in the run folder and the W&B run marked as preempted (not finished).
    The loss guard is checked first, so a diverged model never replaces the last good checkpoint."""
    stop = preemption.requested(accelerator)
    if stop or (args.checkpointing_steps != "epoch" and state.step % int(args.checkpointing_steps) == 0):
        guard.check(accelerator)
        path = save_checkpoint(accelerator, args.output_dir, state.step, args.checkpoints_total_limit)
    if stop:
        if accelerator.is_main_process:
            write_preempted_marker(args.output_dir, state.step, path, preemption.received or "another process's")
        mark_preempting(accelerator)
        accelerator.end_training()
        raise Preempted(f"saved {path} at step {state.step}; relaunch the same command with "
                        "--resume_from_checkpoint latest to continue")


def end_epoch(accelerator, skipped, loaded, epoch, step, seconds, unreadable=()):
    """Log the epoch's throughput and how many unreadable images all processes replaced with readable ones (this
    process: `skipped`, a count that may live on the device to avoid a sync per batch, among the `loaded` ones, and
    the names of the `unreadable` ones). `seconds`: this process's wall-clock for the epoch, data loading included
    (after a mid-epoch resume, for the part it trained)."""
    counts = torch.stack([torch.as_tensor(skipped).cpu(), torch.as_tensor(loaded)]).to(accelerator.device)
    skipped, loaded = (int(c) for c in accelerator.reduce(counts, "sum").tolist())
    names = ""
    if skipped:
        shown = gather_object(list(unreadable)[:UNREADABLE_SHOWN])[:UNREADABLE_SHOWN]
        names = f" ({', '.join(shown)}{', ...' if skipped > len(shown) else ''})"
    accelerator.print(f"epoch {epoch + 1}: {loaded} images in {seconds:.1f} s ({loaded / seconds:,.1f} img/s)"
                      + (f", {skipped} unreadable images replaced by the next readable ones{names}" if skipped else ""))
    accelerator.log({"train/epoch_seconds": seconds, "train/images_per_second": loaded / seconds,
                     **({"data/skipped_images": skipped} if skipped else {})}, step=step)


class StepMeter:
    """Throughput and data-wait time between two train-loss logs, from the host's clock alone (no device sync).

    `batches(loader)` times each fetch of the next batch: the time the training loop, and with it the accelerator,
    waited for data. A data-bound run shows a large `perf/data_wait_fraction`; in a compute-bound GPU run the host
    runs ahead of the device and waits elsewhere (at the next sync), so the fraction stays near 0.
    """

    def __init__(self, step):
        self.reset(step)

    def reset(self, step):
        self.start, self.step, self.data_seconds, self.images = time.perf_counter(), step, 0.0, 0

    def batches(self, loader):
        iterator = iter(loader)
        while True:
            fetch = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.data_seconds += time.perf_counter() - fetch
            self.images += len(batch["labels"])
            yield batch

    def read(self, step, num_processes):
        """The metrics since the last read (or the start of the epoch); then it starts over. Images are counted on
        this process, which holds 1/num_processes of every batch."""
        seconds = time.perf_counter() - self.start
        values = {"perf/images_per_second": self.images * num_processes / seconds,
                  "perf/seconds_per_step": seconds / max(step - self.step, 1),
                  "perf/data_wait_fraction": self.data_seconds / seconds}
        self.reset(step)
        return values


def log_train_losses(accelerator, progress, state, epoch, steps_in_epoch, dims, weights, group_losses, lr,
                     grad_norm=None, meter=None, **extra):
    """Log the train loss of the optimizer step just taken, averaged over its micro-batches and all processes:
    the weighted sum over dims that is minimized (`train/loss`), their plain mean (`train/loss_mean_over_dims`,
    comparable between a run with 7 heads and the baseline's one) and each dim's own loss, with the learning rate,
    the step's gradient norm (before clipping), the fp16 skipped-step count and the meter's throughput. All device
    values travel to the host in one copy."""
    per_dim = torch.stack(group_losses).float().mean(0)
    values = [per_dim, (weights * per_dim).sum().reshape(1)]
    if grad_norm is not None:  # the same on every process: the gradients were reduced before clipping
        values.append(torch.as_tensor(grad_norm, dtype=torch.float32, device=per_dim.device).reshape(1))
    values = accelerator.reduce(torch.cat(values), "mean").tolist()
    per_dim, total, norm = values[:len(dims)], values[len(dims)], values[len(dims) + 1:]
    progress.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"train/loss": total, "train/loss_mean_over_dims": sum(per_dim) / len(per_dim), "train/lr": lr,
                     "train/skipped_steps": state.skipped_steps, "epoch": epoch + state.batch_in_epoch / steps_in_epoch,
                     **({"train/grad_norm": norm[0]} if norm else {}),
                     **(meter.read(state.step, accelerator.num_processes) if meter is not None else {}), **extra,
                     **{f"train/loss_d{d}": loss for d, loss in zip(dims, per_dim)}}, step=state.step)
