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

    forward returns (weighted total, per-dim unweighted losses detached for logging). Positional arguments are the
    embeddings to slice; pass everything else (labels, temperatures) by keyword. The embeddings are sliced, never
    truncated in place, so the caller's tensors are left intact whatever order the dims came in.
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


# ---- self-supervised base losses (train_ssl.py): each compares two batches of embeddings row by row, and the
# Matryoshka wrapper above applies it to every nested prefix.

def relic_loss(online, target, log_temperature, alpha=1.0, max_temperature=5.0):
    """ReLIC (Mitrovic et al. 2020) as in mrl-pytorch, one direction: online projections of one view (n, d) against
    target projections of the other view (n, d).

    The logits are cosine similarities scaled by the learnable `exp(log_temperature)`, clamped to at most
    `max_temperature` (mrl-pytorch: `t'` starts at 0 and the scale is clamped to [0, 5]; the scale multiplies the
    logits, so it is an inverse temperature). The loss is the instance-discrimination cross-entropy (row i should pick
    column i) plus `alpha` times the invariance term KL(q_i || p_i), averaged over rows, between
    p_i = softmax of row i (online i against all targets) and q_i = softmax of column i (target i against all online
    embeddings). mrl-pytorch computes it as `kl_div(log_softmax(logits, 1), softmax(logits, 0).t())`; here both sides
    are log-probabilities (`log_target=True`), which is the same value and stable when a probability underflows.
    A bias added to the logits (as in SigLIP-style variants) would cancel in both softmaxes, so there is none.
    """
    online, target = F.normalize(online.float(), dim=-1), F.normalize(target.float(), dim=-1)
    scale = log_temperature.float().exp().clamp(0, max_temperature)
    logits = online @ target.T * scale
    labels = torch.arange(len(logits), device=logits.device)
    instance = F.cross_entropy(logits, labels)
    log_p = F.log_softmax(logits, dim=1)
    log_q = F.log_softmax(logits, dim=0).T
    invariance = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    return instance + alpha * invariance


def nt_xent_loss(z1, z2, temperature=0.5):
    """SimCLR's NT-Xent: each of the 2n embeddings must pick its other view among the 2n - 1 others, by cosine
    similarity / temperature; mean cross-entropy over all 2n."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    n = len(z1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, positives)


def byol_loss(prediction, target):
    """BYOL's normalized mean squared error, 2 - 2 cos(prediction, target), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()
