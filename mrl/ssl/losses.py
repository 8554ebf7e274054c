"""The self-supervised base losses: each compares two batches of embeddings row by row (ReLIC, SimCLR's NT-Xent,
BYOL, VICReg, Barlow Twins), and mrl.matryoshka.MatryoshkaLoss applies it to every nested prefix."""

import contextlib

import torch
import torch.nn.functional as F

from mrl.utils.distributed import gather, row_offset, world_size


@contextlib.contextmanager
def float32_similarities(device_type):
    """Similarities computed in real float32: autocast off, and on CUDA no TF32 for matrix products (10 mantissa
    bits, a third of a percent off for a logit of 5). Accelerate turns TF32 on for runs with a dynamo backend and no
    mixed precision; it is restored on the way out."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


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

    On several processes the logits span the global batch: this process's rows against every process's targets
    (the row softmax) and its targets against every process's online embeddings (the column softmax), gathered with
    gradients (mrl.utils.distributed), so the loss is the one-process loss of the whole batch. The similarities are
    computed in float32 even under autocast (in bf16 the logits, up to 5, lose about three decimal digits) and TF32.
    """
    with float32_similarities(online.device.type):
        online, target = F.normalize(online.float(), dim=-1), F.normalize(target.float(), dim=-1)
        scale = log_temperature.float().exp().clamp(0, max_temperature)
        logits = online @ gather(target).T * scale  # (n, N): rows of the global logits
        labels = row_offset(len(online)) + torch.arange(len(online), device=logits.device)
        instance = F.cross_entropy(logits, labels)
        log_p = F.log_softmax(logits, dim=1)
        # columns of the global logits, transposed: target i against every online embedding
        columns = logits.T if world_size() == 1 else target @ gather(online).T * scale
        log_q = F.log_softmax(columns, dim=1)
        invariance = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    return instance + alpha * invariance


def nt_xent_loss(z1, z2, temperature=0.5):
    """SimCLR's NT-Xent: each of the 2n embeddings must pick its other view among the 2n - 1 others, by cosine
    similarity / temperature; mean cross-entropy over all 2n. On several processes the candidates are every
    process's embeddings, gathered with gradients (see relic_loss); the similarities are float32 (no autocast, no
    TF32)."""
    with float32_similarities(z1.device.type):
        z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
        n, device = len(z1), z1.device
        candidates = torch.cat([gather(z1), gather(z2)])  # all view-1 rows, then all view-2 rows
        total = len(candidates) // 2
        logits = torch.cat([z1, z2]) @ candidates.T / temperature
        rows = row_offset(n) + torch.arange(n, device=device)
        own = torch.cat([rows, total + rows])  # each embedding's own column: not a candidate
        logits = logits.masked_fill(F.one_hot(own, 2 * total).bool(), float("-inf"))
        positives = torch.cat([total + rows, rows])
        return F.cross_entropy(logits, positives)


def byol_loss(prediction, target):
    """BYOL's normalized mean squared error, 2 - 2 cos(prediction, target), averaged over the batch."""
    with float32_similarities(prediction.device.type):
        return (2 - 2 * F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()


def vicreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """VICReg (Bardes, Ponce and LeCun, ICLR 2022): invariance (the mean squared error between the two views'
    embeddings) + variance (a hinge keeping every feature's standard deviation over the batch at least 1, each view)
    + covariance (the squared off-diagonal covariances over the batch divided by the width, each view), weighted
    sim_coeff / std_coeff / cov_coeff (the paper's lambda, mu, nu: 25, 25, 1).

    The statistics are the global batch's: on several processes both views are gathered with gradients (as the
    paper's code gathers before its variance and covariance terms), so every process computes the one-process loss
    of the whole batch. Float32, as the similarity losses above."""
    with float32_similarities(z1.device.type):
        z1, z2 = gather(z1.float()), gather(z2.float())
        invariance = F.mse_loss(z1, z2)
        variance = covariance = 0.0
        for z in (z1, z2):
            z = z - z.mean(0)
            variance = variance + F.relu(1 - torch.sqrt(z.var(0) + 1e-4)).mean() / 2  # eps: the paper's code
            cov = z.T @ z / (len(z) - 1)
            covariance = covariance + off_diagonal(cov).pow(2).sum() / z.shape[1]
        return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


def barlow_twins_loss(z1, z2, lambd=0.0051):
    """Barlow Twins (Zbontar et al., ICML 2021): the cross-correlation matrix C of the two views' embeddings, each
    feature standardized over the batch (BatchNorm without affine parameters), driven to the identity:
    sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 (lambd: the authors' code's 0.0051, the paper's 5e-3).

    Over the global batch: the paper's code standardizes with SyncBatchNorm and all-reduces C; gathering both views
    with gradients first gives the same C on every process (lightly standardizes each process's share on its own and
    averages the C's, which is another loss). Not divided by the width: every Matryoshka prefix reaches this loss
    through the projector, so C is --proj_out_dim wide at every d and the prefixes' losses are of one size."""
    with float32_similarities(z1.device.type):
        z1, z2 = gather(z1.float()), gather(z2.float())
        standardized = [(z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5) for z in (z1, z2)]
        c = standardized[0].T @ standardized[1] / len(z1)
        on_diagonal = (1 - c.diagonal()).pow(2).sum()
        return on_diagonal + lambd * off_diagonal(c).pow(2).sum()


def off_diagonal(matrix):
    """The off-diagonal entries of a square matrix, flattened."""
    return matrix[~torch.eye(len(matrix), dtype=torch.bool, device=matrix.device)]
