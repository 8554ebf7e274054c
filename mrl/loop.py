"""The bookkeeping both training scripts share around their own training step: the Accelerator they run under,
where an epoch starts after a resume, progress, throughput and unreadable-image counts, and what happens after an
optimizer step (checkpoint, preemption)."""

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from mrl import UserError
from mrl.checkpoint import save_checkpoint
from mrl.guards import Preempted


def build_accelerator(args, mixed_precision=None):
    """The Accelerator both training scripts run under (mixed precision and processes from `accelerate launch`),
    after checking that --batch_size splits evenly over the processes; seeds every RNG with --seed.

    split_batches: --batch_size is the global batch, so a run means the same thing on 1 or 8 processes. The seedable
    sampler makes each epoch's order a function of (seed, epoch), which exact resume relies on.
    """
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum_steps, mixed_precision=mixed_precision,
        log_with="wandb" if args.report_to == "wandb" else None,
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=args.seed))
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
    """Save a checkpoint every --checkpointing_steps steps; on a preemption signal save one and stop the run.
    The loss guard is checked first, so a diverged model never replaces the last good checkpoint."""
    stop = preemption.requested(accelerator)
    if stop or (args.checkpointing_steps != "epoch" and state.step % int(args.checkpointing_steps) == 0):
        guard.check(accelerator)
        path = save_checkpoint(accelerator, args.output_dir, state.step, args.checkpoints_total_limit)
    if stop:
        accelerator.end_training()
        raise Preempted(f"saved {path} at step {state.step}; relaunch the same command with "
                        "--resume_from_checkpoint latest to continue")


def end_epoch(accelerator, skipped, loaded, epoch, step, seconds):
    """Log the epoch's throughput and how many unreadable images all processes skipped (this process: `skipped`, a
    count that may live on the device to avoid a sync per batch, besides the `loaded` readable ones), and stop with a
    clear message when no image at all could be read. `seconds`: this process's wall-clock for the epoch, data
    loading included (after a mid-epoch resume, for the part it trained)."""
    counts = torch.stack([torch.as_tensor(skipped).cpu(), torch.as_tensor(loaded)]).to(accelerator.device)
    skipped, loaded = (int(c) for c in accelerator.reduce(counts, "sum").tolist())
    if skipped and not loaded:
        raise UserError(f"none of the {skipped} training images loaded this epoch could be read (corrupt or empty files?)")
    accelerator.print(f"epoch {epoch + 1}: {loaded} images in {seconds:.1f} s ({loaded / seconds:,.1f} img/s)"
                      + (f", skipped {skipped} unreadable images" if skipped else ""))
    accelerator.log({"train/epoch_seconds": seconds, "train/images_per_second": loaded / seconds,
                     **({"data/skipped_images": skipped} if skipped else {})}, step=step)


def log_train_losses(accelerator, progress, state, epoch, steps_in_epoch, dims, weights, group_losses, lr, **extra):
    """Log the train loss of the optimizer step just taken, averaged over its micro-batches and all processes:
    the weighted total and each dim's own loss, with the learning rate and the fp16 skipped-step count."""
    per_dim = accelerator.reduce(torch.stack(group_losses).mean(0), "mean")
    total = (weights * per_dim).sum().item()
    progress.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
    accelerator.log({"train/loss": total, "train/lr": lr, "train/skipped_steps": state.skipped_steps,
                     "epoch": epoch + state.batch_in_epoch / steps_in_epoch, **extra,
                     **{f"train/loss_d{d}": loss for d, loss in zip(dims, per_dim.tolist())}}, step=state.step)
