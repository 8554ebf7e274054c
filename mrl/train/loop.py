"""The training epoch and step both training scripts run, each with its own loss: where an epoch starts after a
resume, the step (forward under autocast, backward, clipping, the optimizer and learning rate, the after-step hook),
progress, throughput, the train-loss log, unreadable-image counts, and what happens after an optimizer step
(checkpoint, preemption)."""

import math
import time

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from mrl import UserError
from mrl.report.tracking import mark_preempting
from mrl.train.guards import LossGuard, write_preempted_marker
from mrl.utils.script import Preempted

UNREADABLE_SHOWN = 3  # how many unreadable images an epoch's summary names


def epoch_batches(accelerator, loader, state, epoch, epochs):
    """The batches of `epoch` still to train on (after a resume, from state.batch_in_epoch on) from any training
    loader (mrl.batches.loaders.EpochLoader), and a progress bar over the whole epoch."""
    progress = tqdm(total=len(loader), initial=state.batch_in_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                    disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    return loader.batches(epoch, state.batch_in_epoch), progress


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
    transforms.FillUnreadable, which fills in every unreadable one otherwise)."""
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


def train_one_epoch(run, model, optimizer, loader, lr_schedule, dims, weights, forward, after_step=None,
                    logs=None):
    """Train the epoch `run.state.epoch` from where the run stands (mid-epoch after a resume).

    `forward(batch)` -> (loss, per-dim losses): the script's loss on one batch, called under autocast and the
    accumulation context. `after_step(step)`, after each optimizer step (an SSL run's EMA target), returns values to
    log with that step; `logs()` gives more at each train log (ReLIC's logit scale). `weights`: the per-dim loss
    weights, for the logged total. `loader`: a DataLoader (with `transform`, the training transform its workers
    read the epoch from) or a loader that draws its own batches (mrl.batches.device_data.DeviceLoader).
    """
    args, accelerator, state, epoch = run.args, run.accelerator, run.state, run.state.epoch
    model.train()  # every epoch: evaluation leaves the model in eval mode
    start = time.perf_counter()
    batches, progress = epoch_batches(accelerator, loader, state, epoch, args.epochs)
    group_losses, skipped, loaded, unreadable, step_logs = [], 0, 0, [], {}
    guard = LossGuard(accelerator.device)  # NaN/inf loss: checked before logging and saving, no sync per step
    meter = StepMeter(state.step)  # throughput and data-wait time between logs
    for batch in meter.batches(batches):
        skipped, loaded = skipped + batch["skipped"], loaded + len(batch["labels"])  # no device sync per batch
        unreadable += batch["unreadable"]
        check_readable(batch)
        loss, per_dim, grad_norm, step_logs = training_step(
            accelerator, model, optimizer, forward, batch, float(lr_schedule[state.step]), args.max_grad_norm,
            state.step, accumulation_scale(state.batch_in_epoch, len(loader), args.grad_accum_steps),
            measure_norm=(state.step + 1) % args.log_every == 0, after_step=after_step)
        group_losses.append(per_dim)
        if not count_batch(accelerator, state, guard, progress, loss):
            continue  # mid accumulation group
        if state.step % args.log_every == 0:
            guard.check(accelerator)
            extra = {key: float(value) for key, value in (logs() if logs else {}).items()}
            log_train_losses(accelerator, progress, state, epoch, len(loader), dims, weights, group_losses,
                             float(lr_schedule[state.step - 1]), grad_norm, meter, **step_logs, **extra)
        group_losses = []
        after_optimizer_step(run, guard)
    progress.close()
    guard.check(accelerator)
    end_epoch(accelerator, skipped, loaded, epoch, state.step, time.perf_counter() - start, unreadable)


def training_step(accelerator, model, optimizer, forward, batch, lr, max_grad_norm, step, scale=1.0,
                  measure_norm=False, after_step=None):
    """One forward and backward pass; at the end of an accumulation group the optimizer steps at `lr` after
    clipping (once per step, not per micro-batch), and then `after_step(step)` runs. `scale` multiplies the loss in
    backward (see accumulation_scale). Returns the loss and the per-dim losses, detached, the gradient norm before
    clipping (a device tensor, read when logged) where the step clipped or `measure_norm` asked for it (else None),
    and what `after_step` returned ({} on micro-batches that do not step)."""
    grad_norm, logs = None, {}
    with accelerator.accumulate(model):
        loss, per_dim = forward(batch)
        accelerator.backward(loss * scale if scale != 1.0 else loss)
        if accelerator.sync_gradients:
            for group in optimizer.param_groups:  # a Python float: a numpy scalar in the state would not reload
                group["lr"] = lr * group.get("lr_scale", 1.0)  # a fine-tuning recipe's lower rate for the backbone
            if max_grad_norm > 0 or measure_norm:  # an infinite threshold measures without clipping
                grad_norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                        max_grad_norm if max_grad_norm > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad()
        if accelerator.sync_gradients and after_step is not None:
            logs = after_step(step)
    return loss.detach(), per_dim.detach(), grad_norm, logs


def after_optimizer_step(run, guard):
    """Save a checkpoint every --checkpointing_steps steps; on a preemption signal save one and stop the run,
    leaving the PREEMPTED marker in the run folder and the W&B run marked as preempted (not finished).
    The loss guard is checked first, so a diverged model never replaces the last good checkpoint."""
    args, accelerator, state = run.args, run.accelerator, run.state
    stop = run.preemption.requested(accelerator)
    if stop or (args.checkpointing_steps != "epoch" and state.step % int(args.checkpointing_steps) == 0):
        guard.check(accelerator)
        path = run.save_checkpoint()
    if stop:
        if accelerator.is_local_main_process:  # the run folder's marker once; every machine's supervisor's notice
            write_preempted_marker(args.output_dir if accelerator.is_main_process else None, state.step, path,
                                   run.preemption.received or "another process's")
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
