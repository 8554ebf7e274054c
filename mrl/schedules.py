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
