"""The Matryoshka core, used by every script: which prefix sizes d (parsed, validated, defaulted in one place), the
linear heads on the prefixes z[:, :d] (MRL, MRL-E), and the loss summed over them with per-dim weights.

Everything else in mrl/ is about getting an embedding z (models/, ssl/), data to it (data/, batches/), training it
(train/) or measuring its prefixes (eval/); what makes it a Matryoshka embedding is here.
"""

import argparse
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from mrl import UserError

# ---- the prefix sizes

def parse_dims(text):
    """argparse's type for `--dims 8,16,32` (or `--dims 8 16 32`, nargs="+": each group parsed, see flat_dims)."""
    try:
        return [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"dims must be integers, got {text!r}") from None


def flat_dims(groups):
    """The dims of a `--dims` flag (a list of parsed groups) as one list in the order given; None when not given."""
    return None if groups is None else [d for group in groups for d in group]


def default_dims(embed_dim, smallest=8):
    """Powers of two from `smallest` up to the embedding dim, which is always included."""
    dims, d = [], smallest
    while d < embed_dim:
        dims.append(d)
        d *= 2
    return dims + [embed_dim]


def check_range(dims, embed_dim, name="--dims", whose="the backbone's embedding dim"):
    """Refuse prefix sizes outside 1..embed_dim (or none, or not whole numbers), naming the flag and the width."""
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= embed_dim for d in dims):
        raise UserError(f"{name} must lie in 1..{embed_dim} ({whose}), got {dims}")
    return dims


def training_dims(groups, embed_dim, name="--dims", whose="the backbone's embedding dim"):
    """The dims a run trains heads or a loss on: the `--dims` groups given (or the defaults), sorted, each once
    (with --dim_weights, which weight would a repeated one get?), within the embedding; a warning when the largest is
    below its width (the rest gets no signal)."""
    dims = default_dims(embed_dim) if groups is None else flat_dims(groups)
    if not dims:
        raise UserError(f"{name} is empty: give at least one prefix size")
    repeated = sorted({int(d) for d in dims if list(dims).count(d) > 1})
    if repeated:
        raise UserError(f"{name} lists {', '.join(map(str, repeated))} more than once")
    dims = check_range(sorted(int(d) for d in dims), embed_dim, name, whose)
    if dims[-1] != embed_dim:
        warnings.warn(f"the largest Matryoshka dim {dims[-1]} is below the embedding dim {embed_dim}: "
                      f"dims {dims[-1] + 1}..{embed_dim} get no training signal", stacklevel=2)
    return dims


def evaluation_dims(groups, embed_dim, default=None, also=(), name="--dims", whose="the embedding dim"):
    """The dims to measure a trained embedding at: those given (`--dims` groups, repeats allowed), else `default`
    (None: the powers of two up to the width), with `also` added (an index dim); sorted, each once, within
    1..embed_dim."""
    chosen = flat_dims(groups) or (default_dims(embed_dim) if default is None else default)
    return check_range(sorted(set(chosen) | set(also)), embed_dim, name, whose)


def dim_weights(dims, spec="uniform", given=None):
    """Per-dim loss weights c_m for `dims`: "uniform" (all 1, the paper's and the blog's choice) or a comma list of
    floats, one per dim in the order the dims were `given` on the command line (default: `dims`' own order)."""
    if spec == "uniform":
        return [1.0] * len(dims)
    given = list(given or dims)
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise UserError(f"--dim_weights must be 'uniform' or comma-separated numbers, got {spec!r}") from None
    if len(weights) != len(given):
        raise UserError(f"--dim_weights has {len(weights)} values for {len(given)} dims {given}")
    if any(w < 0 for w in weights):
        raise UserError(f"--dim_weights must be non-negative, got {spec!r}")
    weight_of = dict(zip(given, weights))
    return [weight_of[d] for d in dims]



# ---- the heads and the loss

class MatryoshkaHeads(nn.Module):
    """One linear classifier per prefix `z[:, :d]` of the embedding, for every d in `dims`.

    `tied=False` gives each dim its own weights (the blog and the MRL paper's default). `tied=True` is MRL-E:
    one weight matrix W and bias b, and the head for d uses the first d columns of W. Its logits are computed
    from one full-width product: the embedding is cut at the dims into chunks, each chunk is multiplied by its
    slice of W, and a cumulative sum over chunks gives every prefix's logits.

    forward returns logits of shape (len(dims), batch, num_classes).
    """

    def __init__(self, dims, num_classes, tied=False):
        super().__init__()
        self.dims, self.num_classes, self.tied = list(dims), num_classes, tied
        if tied:
            self.classifier = nn.Linear(self.dims[-1], num_classes)
        else:
            self.classifiers = nn.ModuleList(nn.Linear(d, num_classes) for d in self.dims)

    def forward(self, z):
        if not self.tied:
            return torch.stack([head(z[:, :d]) for d, head in zip(self.dims, self.classifiers)])
        w, starts = self.classifier.weight, [0] + self.dims[:-1]
        partial = torch.stack([z[:, a:b] @ w[:, a:b].T for a, b in zip(starts, self.dims)])
        return partial.cumsum(0) + self.classifier.bias


class MatryoshkaClassifier(nn.Module):
    """Backbone + Matryoshka heads. forward returns (embedding, per-head logits).

    `freeze_net(True)` freezes the backbone's network (`backbone.net`: the pretrained part; a --embed_dim projection
    and the heads keep training): no gradients, and eval mode whatever `train()` says, so that its BatchNorm
    statistics and dropout stay as they were -- the linear-probe phase of a fine-tuning run.
    """

    def __init__(self, backbone, heads):
        super().__init__()
        self.backbone, self.heads = backbone, heads
        self.net_frozen = False

    def freeze_net(self, frozen):
        self.net_frozen = frozen
        self.backbone.net.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if self.net_frozen:
            self.backbone.net.eval()
        return self

    def forward(self, x):
        z = self.backbone(x)
        return z, self.heads(z)


class MatryoshkaLoss(nn.Module):
    """Wraps any base loss: `base_loss(*prefixes, **kwargs)` is evaluated on `e[..., :d]` of every embedding
    for every d in `dims`, from one forward pass of the encoder, and the results are summed with `weights`.

    forward returns (weighted total, per-dim unweighted losses detached for logging). Positional arguments are the
    embeddings to slice; pass everything else (labels, temperatures) by keyword. The embeddings are sliced, never
    truncated in place, so the caller's tensors are left intact whatever order the dims came in.
    """

    def __init__(self, base_loss, dims, weights=None):
        super().__init__()
        weights = [1.0] * len(dims) if weights is None else list(weights)
        if len(weights) != len(dims):
            raise ValueError(f"{len(weights)} weights for {len(dims)} dims")
        order = sorted(range(len(dims)), key=lambda i: dims[i])  # each weight stays with its dim
        self.base_loss, self.dims = base_loss, [dims[i] for i in order]
        self.register_buffer("weights", torch.tensor([float(weights[i]) for i in order]), persistent=False)

    def forward(self, *embeddings, **kwargs):
        per_dim = torch.stack([self.base_loss(*(e[..., :d] for e in embeddings), **kwargs) for d in self.dims])
        return (self.weights.to(per_dim.dtype) * per_dim).sum(), per_dim.detach()


def per_head_cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean cross-entropy of every head at once: logits (heads, batch, classes) -> losses (heads,)."""
    heads = logits.shape[0]
    losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(heads), reduction="none",
                             label_smoothing=label_smoothing)
    return losses.view(heads, -1).mean(1)
