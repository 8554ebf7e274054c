"""The target network of ReLIC and BYOL: an exponential moving average (EMA) of the online network.

After optimizer step k the target follows the online network by

    target <- gamma_k * target + (1 - gamma_k) * online        (parameters and floating-point buffers)

with gamma_k a per-step array (mrl-pytorch and BYOL: cosine from the base gamma up to 1 over training; the base is
0.995 in mrl-pytorch's run_training.py; see mrl.train.optim.cosine_schedule). mrl-pytorch's two knobs are kept: until step `copy_until` (its
`update_gamma_after_step`) the target is a plain copy of the online network, and afterwards it moves only every
`every` steps (its `update_gamma_every_n_steps`).

`update` must be called once per optimizer step -- under gradient accumulation on `accelerator.sync_gradients`
only, not per micro-batch -- with the index of that step. The target weights and the update counter are module
state (the counter is a buffer), so they are saved and restored with the model's state dict: a resumed run's target
is bit-identical to the uninterrupted run's.
"""

import copy

import torch
import torch.nn as nn


class EMA(nn.Module):
    """`module` is a frozen deep copy of `online`, kept as an EMA of it by `update`; forward calls it."""

    def __init__(self, online, momentum, copy_until=1, every=1):
        super().__init__()
        self.module = copy.deepcopy(online).requires_grad_(False)
        self.momentum = momentum  # gamma per optimizer step (a sequence indexed by step)
        self.copy_until, self.every = copy_until, max(1, every)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))  # optimizer steps seen

    def gamma(self, step):
        """The momentum applied after optimizer step `step` (0-based): 0 means copy, 1 means keep the target as is."""
        if step <= self.copy_until:
            return 0.0
        if step % self.every:
            return 1.0
        return float(self.momentum[min(step, len(self.momentum) - 1)])

    @torch.no_grad()
    def update(self, online, step):
        """Move the target towards `online` after optimizer step `step`; returns the gamma used."""
        gamma = self.gamma(step)
        if gamma < 1.0:
            target_params, online_params = self._floating(self.module), self._floating(online)
            torch._foreach_lerp_(target_params, online_params, 1.0 - gamma)  # one fused kernel for all tensors
            for t, o in zip(self.module.buffers(), online.buffers()):  # integer buffers (BN batch counters)
                if not t.is_floating_point():
                    t.copy_(o)
        self.num_updates += 1
        return gamma

    @staticmethod
    def _floating(module):
        tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
        return [t.data for t in tensors]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
