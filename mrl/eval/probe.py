"""Linear probes on frozen features, one per embedding prefix z[:, :d].

Two protocols, both on standardized features (mean and std of the train features):

- `torch_probe` (the default): multinomial logistic regression, mean cross-entropy + l2/2 * ||W||^2, fitted
  full-batch with L-BFGS in torch (on the GPU when the features are there). The L2 strength is picked per dim
  from a small grid by cross-entropy on a validation set (without one, on 10% of train, then refitted on all of
  train). Three things make the 7-dim sweep fast:
  1. Every grid value is fitted at once: K independent L-BFGS runs in lockstep, whose matmuls have K x C columns
     instead of C. That costs little more than one problem: the feature matrix is read once per pass either way.
  2. Preconditioning: L-BFGS runs in the variables V = L^T W, where L L^T = X^T X / n + l2 I is the Cholesky
     factor of the (regularized) feature covariance. In V the loss is nearly isotropic, so L-BFGS converges in
     tens of iterations where plain L-BFGS on correlated features hits its cap. (The objective is unchanged:
     this only re-parametrizes it.)
  3. Warm start across nested dims (the Matryoshka structure): the problem at d' > d restricted to the first d
     features is the problem at d, so the solution at d, padded with zeros, starts the fit at d'. The Cholesky
     factor of a leading block is the leading block of the factor, so one Gram matrix serves every dim.
- `sklearn_probe`: the seed's protocol exactly -- `CalibratedClassifierCV(LogisticRegression(max_iter=100))`
  (5-fold, sigmoid calibration), one fit per dim, no validation set. For parity checks; about 10-30x slower.

Both return, per dim, the accuracy and the class probabilities on the evaluation set, which `cascade`
(adaptive classification) runs over.

At ImageNet scale neither fits whole (1.28M x 2,048 features and 1.28M x 5 x 1,000 logits per pass): both fit on a
stratified random subset of at most `max_train_samples` train rows (`stratified_subset`; default
PROBE_MAX_TRAIN_SAMPLES, more than CIFAR-10's whole train split, so small datasets use all of it), and each
ProbeResult states how many rows it was fitted on.
"""

import contextlib
import time
import warnings
from dataclasses import dataclass, field

import torch

# L2 strengths tried per dim (per-sample scale: the loss is a mean). scikit-learn's default C = 1 is l2 = 1 / n.
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Train rows a probe is fitted on, at most (a stratified subset beyond): ~78 per class on ImageNet-1k, whose
# full-batch L-BFGS then needs ~4 GB of logits and features on the device instead of ~40 GB.
PROBE_MAX_TRAIN_SAMPLES = 100_000


@dataclass
class ProbeResult:
    dim: int
    accuracy: float  # top-1 on the evaluation set
    probs: torch.Tensor = field(repr=False)  # (n_eval, classes) softmax probabilities on the evaluation set
    l2: float | None = None  # the L2 strength picked on the validation set (torch probe)
    val_accuracy: float | None = None
    iterations: int | None = None  # L-BFGS iterations spent at this dim (all grid values fitted together)
    seconds: float = 0.0
    train_samples: int | None = None  # train rows the probe was fitted on (a stratified subset when fewer than all)


def standardize(train, *others):
    """(x - mean) / std with the train features' statistics, applied to train and every other set alike.

    Constant features keep scale 1 (as scikit-learn's StandardScaler), so they become zeros, not NaNs.
    """
    mean = train.mean(0)
    std = train.std(0)
    std = torch.where(std > 1e-12 * std.max().clamp_min(1e-30), std, torch.ones_like(std))
    return [(x - mean) / std for x in (train, *others)]


def stratified_split(labels, fraction, seed=0):
    """Indices (kept, held_out): `fraction` of every class held out, chosen at random with `seed`."""
    g = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten().cpu()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = round(len(idx) * fraction) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def stratified_subset(labels, max_samples, seed=0):
    """Sorted indices of at most `max_samples` rows, every class represented in proportion to its count (largest
    remainders round the quotas to exactly `max_samples`), each class's rows drawn at random with `seed`.
    All rows when there are no more than `max_samples` (or it is None or 0)."""
    labels = labels.cpu()
    n = len(labels)
    if not max_samples or n <= max_samples:
        return torch.arange(n)
    _, inverse, counts = labels.unique(return_inverse=True, return_counts=True)
    quota = counts.double() * max_samples / n
    take = quota.floor().long()
    take[(quota - take).argsort(descending=True, stable=True)[:max_samples - int(take.sum())]] += 1
    # a random order, then grouped by class (stable): each row's rank among its class's rows is random
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    order = order[inverse[order].argsort(stable=True)]
    first = torch.cumsum(counts, 0) - counts  # where each class's group starts in `order`
    rank = torch.arange(n) - first[inverse[order]]
    return order[rank < take[inverse[order]]].sort().values


def torch_probe(train_x, train_y, eval_x, eval_y, dims, num_classes, val_x=None, val_y=None, l2_grid=L2_GRID,
                max_iter=100, tolerance=1e-4, val_fraction=0.1, seed=0, device=None, log=None,
                max_train_samples=PROBE_MAX_TRAIN_SAMPLES):
    """The default probe at every d in `dims` (ascending); returns one ProbeResult per dim.

    Fitted on a stratified subset of at most `max_train_samples` train rows (None: all). Without a validation set,
    `val_fraction` of those (stratified) picks the L2 strength and the probe is then refitted on all of them with
    it, warm-started, so every train label is used (as in scikit-learn's protocol). With a validation set, the
    probe is fitted on train only. Features may be float16 (e.g. memory-mapped from the cache): the subset alone
    is copied, to float32, onto the device.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    subset = stratified_subset(train_y, max_train_samples, seed)
    if len(subset) < len(train_y):
        train_x, train_y = train_x[subset.to(train_x.device)], train_y[subset.to(train_y.device)]
    refit = val_x is None
    if refit:
        kept, held = stratified_split(train_y, val_fraction, seed)
        val_x, val_y = train_x[held], train_y[held]
    train_x, val_x, eval_x = standardize(*(x.to(device, torch.float32) for x in (train_x, val_x, eval_x)))
    train_y, val_y, eval_y = (t.to(device) for t in (train_y, val_y, eval_y))
    fit_x, fit_y = (train_x[kept.to(device)], train_y[kept.to(device)]) if refit else (train_x, train_y)
    # One Gram matrix gives every dim's preconditioner: the Cholesky factor of a leading block is the leading
    # block of the factor. A preconditioner need not be exact: 10k evenly spaced rows estimate it well enough.
    rows = train_x[::max(1, len(train_x) // 10000)]
    gram = rows.T @ rows / len(rows)
    grid = torch.tensor(l2_grid, dtype=torch.float32, device=device)
    weights = torch.zeros(len(grid), 0, num_classes, device=device)
    bias = torch.zeros(len(grid), num_classes, device=device)
    results = []
    for d in dims:
        start = time.perf_counter()
        # warm start from the previous prefix's solutions, with zero weights on the new features
        weights = torch.cat([weights, weights.new_zeros(len(grid), d - weights.shape[1], num_classes)], 1)
        with _threads_for(device, len(fit_x) * d * len(grid) * num_classes):
            weights, bias, iters = fit_logistic(fit_x[:, :d].contiguous(), fit_y, gram[:d, :d], grid, weights, bias,
                                                max_iter, tolerance)
        with torch.no_grad():
            z = logits(val_x[:, :d], weights, bias)
            val_acc = (z.argmax(-1) == val_y[:, None]).float().mean(0)
            # Pick by validation cross-entropy: on a few thousand samples it ranks L2 strengths far less noisily
            # than accuracy does (and it is what the L2 term trades off).
            val_loss = (z.logsumexp(-1) - z.gather(-1, val_y[:, None, None].expand(-1, len(grid), 1))[..., 0]).mean(0)
        best = int(val_loss.argmin())
        w, b = weights[best:best + 1], bias[best:best + 1]
        if refit:
            with _threads_for(device, len(train_x) * d * num_classes):
                w, b, more = fit_logistic(train_x[:, :d].contiguous(), train_y, gram[:d, :d], grid[best:best + 1], w,
                                          b, max_iter, tolerance)
            iters += more
        with torch.no_grad():
            probs = logits(eval_x[:, :d], w, b)[:, 0].softmax(-1)
        accuracy = (probs.argmax(-1) == eval_y).float().mean().item()
        results.append(ProbeResult(d, accuracy, probs.cpu(), float(l2_grid[best]), float(val_acc[best]), iters,
                                   time.perf_counter() - start, len(train_y)))
        if log:
            log(f"probe d={d}: accuracy {accuracy:.4f} (l2 {l2_grid[best]:.0e}, val {val_acc[best]:.4f}, "
                f"{iters} L-BFGS iterations, {results[-1].seconds:.2f} s)")
    return results


@contextlib.contextmanager
def _threads_for(device, work):
    """One CPU thread for small problems: their many tiny ops gain nothing from threads, and on a busy machine
    the threads' synchronization can cost 10-20x the work itself."""
    before = torch.get_num_threads()
    if device.type == "cpu" and work < 1e8:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def logits(x, weights, bias):
    """(n, K, C) logits of K linear classifiers, weights (K, d, C), bias (K, C), in one matmul."""
    k, d, c = weights.shape
    return torch.addmm(bias.reshape(-1), x, weights.transpose(0, 1).reshape(d, k * c)).view(-1, k, c)


def fit_logistic(x, y, gram, l2, weights, bias, max_iter=100, tolerance=1e-4):
    """Minimize mean cross-entropy + l2_k/2 ||W_k||^2 for K L2 strengths at once, from (weights, bias).

    Returns (weights (K, d, C), bias (K, C), iterations). The K problems are solved by K independent L-BFGS
    runs in lockstep, so that every pass over x serves all of them. Each runs in V_k = L_k^T W_k, with
    L_k L_k^T = gram + l2_k I, where its problem is well conditioned (see the module docstring).
    """
    n, d = x.shape
    k, _, c = weights.shape
    chol = preconditioner(gram, l2)  # (K, d, d)
    # W = L^-T V and grad_V = L^-1 grad_W as batched matmuls: much faster than triangular solves on the CPU
    inv_t = torch.linalg.solve_triangular(chol.transpose(1, 2), torch.eye(d, device=x.device).expand(k, d, d),
                                          upper=True)
    inv = inv_t.transpose(1, 2)
    target = y[:, None, None].expand(n, k, 1)
    penalty = l2[:, None, None]

    def split(params):  # params (K, d + 1, C) = [V; bias] -> (W, bias)
        return inv_t @ params[:, :d], params[:, d]

    def loss_and_grad(params):
        w, b = split(params)
        z = logits(x, w, b)
        # As few passes over the (n, K, C) logits as possible: they, not the matmuls, dominate at small d.
        picked = z.gather(-1, target)
        top = z.amax(-1, keepdim=True)
        p = z.sub_(top).exp_()  # unnormalized softmax, in place of the logits
        total = p.sum(-1, keepdim=True)
        loss = (top + total.log() - picked).sum((0, 2)) / n + 0.5 * (penalty * w * w).sum((1, 2))
        p.div_(total).scatter_add_(-1, target, p.new_full((n, k, 1), -1.0))  # p - onehot(y) = n * dloss/dlogits
        # (p^T x)^T rather than x^T p: the transposed-left matmul is several times slower on CPU
        grad_w = (p.view(n, k * c).T @ x).view(k, c, d).transpose(1, 2) / n + penalty * w
        return loss, torch.cat([inv @ grad_w, p.sum(0)[:, None] / n], 1)

    params = torch.cat([chol.transpose(1, 2) @ weights, bias[:, None]], 1)
    params, iterations = lbfgs(loss_and_grad, params, max_iter, tolerance)
    w, b = split(params)
    return w, b, iterations


def preconditioner(gram, l2):
    """The Cholesky factors L_k of gram + (l2_k + 1e-6) I, (K, d, d).

    With fewer train rows than dims (or heavy-tailed standardized features) the float32 Gram matrix is singular up
    to its rounding error, which can exceed the small L2 strengths of the grid and break the factorization. The
    factor only preconditions L-BFGS (the objective is unchanged), so it is then computed in float64 with a ridge
    growing tenfold from 1e-6 x the mean diagonal until the factorization succeeds."""
    d = gram.shape[0]
    eye = torch.eye(d, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram + (l2[:, None, None] + 1e-6) * eye)
    if not info.any():
        return chol
    scale = gram.diagonal().double().mean().clamp_min(1e-12)
    for exponent in range(-6, 3):
        ridge = l2[:, None, None].double() + scale * 10.0 ** exponent
        chol, info = torch.linalg.cholesky_ex(gram.double() + ridge * eye.double())
        if not info.any():
            return chol.float()
    raise FloatingPointError("the probe's feature covariance is not finite (NaN or infinite features?)")


def lbfgs(loss_and_grad, params, max_iter, tolerance, history=10):
    """K independent L-BFGS minimizations in lockstep: params (K, ...), loss_and_grad -> ((K,), (K, ...)).

    Every problem has its own curvature pairs, scaling and step size (the dot products are per problem), so
    running them together changes nothing but the cost. Backtracking (Armijo) line search from the unit step,
    which a well-conditioned problem nearly always accepts. A problem is done when an iteration lowers its loss
    by less than `tolerance`; all stop when every one is done or after `max_iter` iterations.
    """
    dot = lambda a, b: (a * b).flatten(1).sum(1)  # noqa: E731 -- one dot product per problem
    per = lambda t: t.view(-1, *[1] * (params.dim() - 1))  # noqa: E731 -- (K,) broadcast over params
    loss, grad = loss_and_grad(params)
    pairs = []  # (s, y, rho) newest last; rho = 0 leaves out a problem whose pair had no positive curvature
    scale = torch.ones_like(loss)  # s.y / y.y of each problem's newest usable pair: the initial inverse Hessian
    done = torch.zeros_like(loss, dtype=torch.bool)
    for iteration in range(1, max_iter + 1):
        direction = -grad
        alphas = []
        for s, y, rho in reversed(pairs):
            alpha = rho * dot(s, direction)
            direction = direction - per(alpha) * y
            alphas.append(alpha)
        direction = direction * per(scale)
        for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
            direction = direction + per(alpha - rho * dot(y, direction)) * s
        uphill = dot(grad, direction) >= 0  # cannot happen in exact arithmetic; restart from the gradient
        direction = torch.where(per(uphill), -grad * per(scale), direction)
        direction = torch.where(per(done), torch.zeros_like(direction), direction)
        slope = dot(grad, direction)
        step = torch.ones_like(loss)
        for _ in range(30):  # backtrack each problem until its loss drops enough
            new_params = params + per(step) * direction
            new_loss, new_grad = loss_and_grad(new_params)
            accepted = (new_loss <= loss + 1e-4 * step * slope) | done
            if accepted.all():
                break
            step = torch.where(accepted, step, step / 2)
        s, y = new_params - params, new_grad - grad
        curvature, y_norm = dot(s, y), dot(y, y)
        usable = curvature > 1e-12
        pairs = (pairs + [(s, y, torch.where(usable, 1 / curvature, torch.zeros_like(curvature)))])[-history:]
        scale = torch.where(usable, curvature / y_norm, scale)
        done |= (loss - new_loss) < tolerance
        params, loss, grad = new_params, new_loss, new_grad
        if done.all():
            break
    return params, iteration


def sklearn_probe(train_x, train_y, eval_x, eval_y, dims, log=None, max_iter=100,
                  max_train_samples=PROBE_MAX_TRAIN_SAMPLES, seed=0):
    """The seed's protocol at every d in `dims`: StandardScaler, then
    `CalibratedClassifierCV(LogisticRegression(max_iter=100))` (5-fold, sigmoid), fitted on all of train (a
    stratified subset of `max_train_samples` rows beyond that, as torch_probe).

    lbfgs often stops at its iteration cap without converging (d >= 256 on CIFAR-10 features); its
    ConvergenceWarning is silenced here, as in the seed's notebooks.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    subset = stratified_subset(train_y, max_train_samples, seed)
    if len(subset) < len(train_y):
        train_x, train_y = train_x[subset.to(train_x.device)], train_y[subset.to(train_y.device)]
    train_x, eval_x = train_x.float().cpu().numpy(), eval_x.float().cpu().numpy()
    train_y, eval_y = train_y.cpu().numpy(), eval_y.cpu().numpy()
    results = []
    for d in dims:
        start = time.perf_counter()
        scaler = StandardScaler().fit(train_x[:, :d])
        classifier = CalibratedClassifierCV(LogisticRegression(max_iter=max_iter))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(scaler.transform(train_x[:, :d]), train_y)
        # predict_proba's columns follow classifier.classes_; place them by class id (a class may be absent)
        probs = torch.zeros(len(eval_x), int(max(train_y.max(), eval_y.max())) + 1)
        probs[:, torch.as_tensor(classifier.classes_)] = torch.as_tensor(
            classifier.predict_proba(scaler.transform(eval_x[:, :d])), dtype=torch.float32)
        accuracy = float((probs.argmax(1).numpy() == eval_y).mean())
        results.append(ProbeResult(d, accuracy, probs, seconds=time.perf_counter() - start,
                                   train_samples=len(train_y)))
        if log:
            log(f"sklearn probe d={d}: accuracy {accuracy:.4f} ({results[-1].seconds:.2f} s)")
    return results


# Confidence thresholds of the adaptive-classification curve; 0 always stops at the smallest dim, and the curve
# also gets the point that always goes to the largest one.
CASCADE_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def cascade(probs, dims, labels, thresholds=CASCADE_THRESHOLDS):
    """Adaptive classification (MRL paper): per sample, go through the dims from the smallest up and stop at the
    first whose max softmax probability reaches the threshold (or at the largest dim); predict with that dim.

    probs: one (n, classes) tensor per dim (ascending). Returns one point per threshold -- its accuracy and
    expected dim (the mean over samples of the dim it stopped at: a nested embedding computed up to d costs d)
    -- and a last point with threshold None that always uses the largest dim. The paper picks a threshold per
    dim on validation data; one global threshold is the simpler policy used here.
    """
    probs = torch.stack([p.float() for p in probs])  # (dims, n, classes)
    confidence, prediction = probs.max(-1)
    dims_t = torch.as_tensor(dims, dtype=torch.float32)
    points = []
    for t in list(thresholds) + [None]:
        stop = confidence >= t if t is not None else torch.zeros_like(confidence, dtype=torch.bool)
        stop[-1] = True
        first = stop.float().argmax(0)  # the first dim that is confident enough
        chosen = prediction.gather(0, first[None])[0]
        points.append({"threshold": t, "accuracy": (chosen == labels).float().mean().item(),
                       "expected_dim": dims_t[first].mean().item()})
    return points
