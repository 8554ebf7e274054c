"""The Matryoshka loss: a base loss applied to nested prefixes of the embedding, summed with per-dim weights."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from mrl import UserError


def dim_weights(dims, spec="uniform"):
    """Per-dim loss weights c_m: "uniform" (all 1, the paper's and the blog's choice) or a comma list of floats."""
    if spec == "uniform":
        return [1.0] * len(dims)
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise UserError(f"--dim_weights must be 'uniform' or comma-separated numbers, got {spec!r}") from None
    if len(weights) != len(dims):
        raise UserError(f"--dim_weights has {len(weights)} values for {len(dims)} dims {list(dims)}")
    if any(w < 0 for w in weights):
        raise UserError(f"--dim_weights must be non-negative, got {spec!r}")
    return weights


class MatryoshkaLoss(nn.Module):
    """Wraps any base loss: `base_loss(*prefixes, **kwargs)` is evaluated on `e[..., :d]` of every embedding
    for every d in `dims`, from one forward pass of the encoder, and the results are summed with `weights`.

    forward returns (weighted total, per-dim unweighted losses detached for logging). The embeddings are sliced,
    never truncated in place, so the caller's tensors are left intact whatever order the dims came in.
    """

    def __init__(self, base_loss, dims, weights=None):
        super().__init__()
        self.base_loss, self.dims = base_loss, sorted(dims)
        self.register_buffer("weights", torch.tensor(weights or [1.0] * len(dims), dtype=torch.float32), persistent=False)

    def forward(self, *embeddings, **kwargs):
        per_dim = torch.stack([self.base_loss(*(e[..., :d] for e in embeddings), **kwargs) for d in self.dims])
        return (self.weights.to(per_dim.dtype) * per_dim).sum(), per_dim.detach()


def per_head_cross_entropy(logits, labels):
    """Mean cross-entropy of every head at once: logits (heads, batch, classes) -> losses (heads,)."""
    heads = logits.shape[0]
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(heads), reduction="none")
    return losses.view(heads, -1).mean(1)
