"""What several processes share: how long a collective may wait, the model without the wrappers that run it on
several (`unwrap`), and a batch's embeddings gathered from every process, so that a contrastive loss on N processes compares each image with the whole global batch, as it does on one.

The timeout. A collective (a barrier, an all-reduce) waits for every process; past the process group's timeout the
run fails. NCCL's default, 10 minutes, is shorter than work one process sometimes does alone while the others wait
at a barrier: downloading and preparing a dataset (`main_process_first`), decoding it for --data_on_device,
evaluating a checkpoint. Every Accelerator here is built by `make_accelerator`, with 3 hours instead (or
MRL_DIST_TIMEOUT_MINUTES); a process that really hangs is then noticed that much later.

Gathering.
Each process computes its loss on its own rows (queries) against the candidates of all processes, averaged over its
rows; DDP then averages the processes' gradients. For that average to be the gradient of the global loss, the
gradient that process q's loss sends to process p's candidates must reach p: the backward pass of the gather below
sums every process's gradient for the gathered tensor (an all-reduce) and hands each process its own slice. Process
p's gradient is then that of the *sum* of all processes' losses with respect to its embeddings, and DDP's division
by the world size turns the sum into the mean -- the global loss. (lightly and solo-learn gather the same way; the
gradient must be summed, not averaged, or every contrastive gradient shrinks by the world size.)

`torch.distributed.nn.all_gather` does the same with a reduce-scatter in its backward pass, which the gloo backend
(CPU runs, the tests) does not implement; an all-reduce works on every backend.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

from mrl import UserError

DEFAULT_TIMEOUT_MINUTES = 180


def process_group_timeout():
    value = os.environ.get("MRL_DIST_TIMEOUT_MINUTES", DEFAULT_TIMEOUT_MINUTES)
    try:
        minutes = float(value)
    except ValueError:
        minutes = -1
    if minutes <= 0:
        raise UserError(f"MRL_DIST_TIMEOUT_MINUTES must be a positive number of minutes, got {value!r}")
    return timedelta(minutes=minutes)


def make_accelerator(find_unused_parameters=False, **kwargs):
    """`Accelerator(**kwargs)` whose process group (when there are several processes) waits process_group_timeout()
    in a collective before it fails. `find_unused_parameters`: DDP lets a step leave parameters without gradients
    (a frozen backbone), at the cost of a walk over the autograd graph per step."""
    handlers = [InitProcessGroupKwargs(timeout=process_group_timeout())]
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(kwargs_handlers=handlers, **kwargs)


def unwrap(accelerator, model):
    """The module a script built, without the wrappers `accelerator.prepare` added (DDP, torch.compile's).

    Not `accelerator.unwrap_model(model)`: by default it returns the compiled wrapper (whose state dict keys carry
    `_orig_mod.`), and to do so re-points that wrapper at the bare module in place -- after which the prepared model
    no longer reaches DDP's `no_sync` (gradients are all-reduced on every micro-batch of an accumulation group).
    """
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), len(tensor)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over processes: every loss that used this process's rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather(tensor):
    """The rows of `tensor` from every process, concatenated in rank order (process p's rows start at p * n);
    differentiable: gradients flow back to the process the rows came from. Every process must pass the same
    shape. On one process it returns `tensor` itself."""
    if world_size() == 1:
        return tensor
    if not tensor.requires_grad:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)
    return _GatherWithGradient.apply(tensor)


def row_offset(rows):
    """Index of this process's first row in the gathered batch (each process holding `rows` rows)."""
    return dist.get_rank() * rows if world_size() > 1 else 0
