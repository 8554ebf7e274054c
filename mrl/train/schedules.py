"""Per-step schedules as precomputed arrays (as in DINO): stateless, so a resumed run reads the value at its step."""

import math

import numpy as np


def exponential_schedule(base, gamma, epochs, steps_per_epoch):
    """`base * gamma**epoch`, constant within an epoch: torch's ExponentialLR stepped once per epoch (the blog)."""
    return base * gamma ** np.repeat(np.arange(epochs), steps_per_epoch).astype(np.float64)


def cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs=0, warmup_start=0.0):
    """Linear warmup from `warmup_start` to `base`, then a half cosine from `base` down (or up) to `final`."""
    total, warmup = epochs * steps_per_epoch, min(int(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch)
    ramp = np.linspace(warmup_start, base, warmup, endpoint=False)
    t = np.arange(total - warmup) / max(total - warmup, 1)
    return np.concatenate([ramp, final + 0.5 * (base - final) * (1 + np.cos(math.pi * t))])


def constant_schedule(base, epochs, steps_per_epoch):
    return np.full(epochs * steps_per_epoch, float(base))


def warmup_then(name, base, epochs, steps_per_epoch, warmup_epochs=0.0, gamma=1.0, warmup_start_factor=1e-4):
    """train_supervised.py's --lr_schedule, per optimizer step: a linear warmup over `warmup_epochs` from
    `warmup_start_factor * base` to `base`, then

      linear       down to 0 at the end of the last epoch: the MRL reference's (FFCV's) ImageNet schedule, whose
                   per-epoch values interp(epoch, [0, warmup, epochs], [1e-4 * base, base, 0]) are themselves
                   interpolated over each epoch's steps -- the same thing as evaluating the ramp at the fractional
                   epoch `epoch + step / steps_per_epoch`, which is what is done here
      cosine       a half cosine down to 0
      exponential  `base * gamma**k` in the k-th epoch after the warmup: the blog's ExponentialLR, stepped per epoch
      constant     `base`

    With warmup_epochs = 0 the exponential schedule is exactly exponential_schedule's.
    """
    total = epochs * steps_per_epoch
    steps = np.arange(total)
    t = steps // steps_per_epoch + (steps % steps_per_epoch) / steps_per_epoch  # fractional epoch at each step
    after = np.maximum(t - warmup_epochs, 0.0)  # epochs since the warmup ended
    remaining = max(epochs - warmup_epochs, 1e-12)
    if name == "linear":
        lr = base * (1 - after / remaining)
    elif name == "cosine":
        lr = 0.5 * base * (1 + np.cos(math.pi * after / remaining))
    elif name == "exponential":
        lr = base * gamma ** np.floor(after)
    elif name == "constant":
        lr = np.full(total, float(base))
    else:
        raise ValueError(f"unknown learning-rate schedule {name!r}")
    if warmup_epochs > 0:
        ramp = np.interp(t, [0.0, warmup_epochs], [warmup_start_factor * base, base])
        lr = np.where(t < warmup_epochs, ramp, lr)
    return lr.astype(np.float64)


def progressive_resolution(epoch, min_res, max_res, start_ramp, end_ramp):
    """The training resolution of `epoch` (0-based) under FFCV's progressive resizing, as the MRL reference trains
    ImageNet: `min_res` up to epoch `start_ramp`, `max_res` from `end_ramp` on, and in between the linear
    interpolation rounded to a multiple of 32."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp(epoch, [start_ramp, end_ramp], [min_res, max_res]) / 32)) * 32
