"""The self-supervised base losses against direct implementations, and the Matryoshka wrapper on them."""

import math

import pytest
import torch
import torch.nn.functional as F

from mrl.matryoshka import MatryoshkaLoss
from mrl.models.backbones import build_backbone
from mrl.ssl.losses import byol_loss, nt_xent_loss, relic_loss
from mrl.ssl.model import SSLModel
from mrl.ssl.projectors import Projector


def direct_relic(x, y, log_t, alpha, max_t=5.0):
    """ReLIC written out element by element in float64: CE on the diagonal + alpha * mean_i KL(q_i || p_i), with
    p_i the softmax of row i of the logits and q_i the softmax of column i."""
    x, y = x.double(), y.double()
    x = x / x.norm(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True)
    scale = min(math.exp(float(log_t)), max_t)
    n = len(x)
    logits = [[scale * float(x[i] @ y[j]) for j in range(n)] for i in range(n)]
    ce, kl = 0.0, 0.0
    for i in range(n):
        row = logits[i]
        col = [logits[j][i] for j in range(n)]
        row_lse = math.log(sum(math.exp(v) for v in row))
        col_lse = math.log(sum(math.exp(v) for v in col))
        ce += row_lse - row[i]
        for j in range(n):
            log_p, log_q = row[j] - row_lse, col[j] - col_lse
            kl += math.exp(log_q) * (log_q - log_p)
    return ce / n + alpha * kl / n


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)


@pytest.mark.parametrize("log_t,alpha", [(0.0, 1.0), (1.2, 0.5), (math.log(40.0), 2.0), (-1.0, 0.0)])
def test_relic_matches_direct_computation_including_clamp_and_kl(pair, log_t, alpha):
    x, y = pair
    got = relic_loss(x, y, torch.tensor(log_t), alpha)
    assert got.item() == pytest.approx(direct_relic(x, y, log_t, alpha), rel=1e-5, abs=1e-6)


def test_relic_kl_term_equals_mrl_pytorch_formula_and_not_the_easy_mistakes(pair):
    x, y = pair
    logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T * 2.0
    seed_kl = F.kl_div(F.log_softmax(logits, 1), F.softmax(logits, 0).t(), reduction="batchmean")
    kl = relic_loss(x, y, torch.tensor(math.log(2.0)), 1.0) - relic_loss(x, y, torch.tensor(math.log(2.0)), 0.0)
    assert kl.item() == pytest.approx(seed_kl.item(), rel=1e-5) and kl.item() > 1e-4
    # Passing probabilities where kl_div wants log-probabilities, or softmaxing the wrong axis, gives other values.
    wrong_input = F.kl_div(F.softmax(logits, 1), F.softmax(logits, 0).t(), reduction="batchmean")
    wrong_axis = F.kl_div(F.log_softmax(logits, 1), F.softmax(logits, 1), reduction="batchmean")
    assert abs(wrong_input.item() - kl.item()) > 1e-3 and abs(wrong_axis.item() - kl.item()) > 1e-3


def test_relic_kl_term_vanishes_for_symmetric_logits_and_alpha_scales_it(pair):
    x, _ = pair
    t = torch.tensor(0.7)
    assert relic_loss(x, x, t, 1.0).item() == pytest.approx(relic_loss(x, x, t, 0.0).item(), abs=1e-6)
    _, y = pair
    l0, l1, l3 = (relic_loss(x, y, t, a).item() for a in (0.0, 1.0, 3.0))
    assert l3 - l0 == pytest.approx(3 * (l1 - l0), rel=1e-5)


def test_relic_temperature_gradient_stops_at_the_clamp(pair):
    x, y = pair
    below = torch.tensor(math.log(2.0), requires_grad=True)
    relic_loss(x, y, below, 1.0).backward()
    above = torch.tensor(math.log(50.0), requires_grad=True)
    relic_loss(x, y, above, 1.0).backward()
    assert below.grad.abs().item() > 1e-4 and above.grad.item() == 0.0
    # the clamped scale is exactly max_temperature
    assert relic_loss(x, y, torch.tensor(math.log(50.0)), 1.0).item() == pytest.approx(
        relic_loss(x, y, torch.tensor(math.log(5.0)), 1.0).item(), rel=1e-6)


def test_nt_xent_matches_direct_computation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    z = F.normalize(torch.cat([a, b]).double(), dim=1)
    n, tau, total = 5, 0.3, 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i]
        total += -float(z[i] @ z[positive]) / tau + math.log(sum(others))
    assert nt_xent_loss(a, b, tau).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_byol_loss_is_normalized_mse():
    g = torch.Generator().manual_seed(2)
    p, t = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    direct = ((F.normalize(p, dim=1) - F.normalize(t, dim=1)) ** 2).sum(1).mean()
    assert byol_loss(p, t).item() == pytest.approx(direct.item(), rel=1e-5)
    assert byol_loss(3 * t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_matryoshka_weights_follow_their_dims_when_sorted():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)
    t = torch.tensor(0.0)
    total, _ = MatryoshkaLoss(relic_loss, [32, 8], weights=[1.0, 0.0])(x, y, log_temperature=t)
    assert total.item() == pytest.approx(relic_loss(x, y, t).item(), rel=1e-6)  # only d = 32 counts
    assert total.item() != pytest.approx(relic_loss(x[:, :8], y[:, :8], t).item(), rel=1e-3)


def test_matryoshka_wrapper_on_relic_sums_prefix_losses_and_ignores_later_dims():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    t = torch.tensor(0.5)
    wrapper = MatryoshkaLoss(relic_loss, [16, 4, 8], weights=[1.0, 2.0, 0.5])  # unsorted on purpose
    total, per_dim = wrapper(x, y, log_temperature=t)
    expected = [relic_loss(x[:, :d], y[:, :d], t).item() for d in (4, 8, 16)]
    assert per_dim.tolist() == pytest.approx(expected, rel=1e-6)
    # each weight follows its own dim through the sort: 16 -> 1.0, 4 -> 2.0, 8 -> 0.5
    assert wrapper.dims == [4, 8, 16] and wrapper.weights.tolist() == [2.0, 0.5, 1.0]
    assert total.item() == pytest.approx(sum(w * e for w, e in zip([2.0, 0.5, 1.0], expected)), rel=1e-6)
    # The loss at d = 4 must not change when dims 4.. change.
    x2 = x.clone()
    x2[:, 4:] = torch.randn(8, 12, generator=g)
    assert wrapper(x2, y, log_temperature=t)[1][0].item() == pytest.approx(per_dim[0].item(), abs=1e-7)
    assert x.shape == (8, 16)  # the caller's tensor is sliced, not truncated


@pytest.mark.parametrize("method", ["relic", "simclr", "byol"])
def test_ssl_model_loss_is_the_symmetrized_base_loss_on_projected_prefixes(method):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", 8)
    projector = Projector(512, 32, 16, batchnorm=method != "relic")
    dims = [8, 64, 512]
    model = SSLModel(method, backbone, projector, dims, [1.0, 1.0, 1.0], ema_momentum=[0.99] * 10,
                     predictor_hidden=32).train()
    v1, v2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        total, per_dim = model(v1, v2)
        swapped_total, _ = model(v2, v1)
        z = model.online(torch.cat([v1, v2]))
        zt = model.target(torch.cat([v1, v2])) if model.target is not None else None
        expected = []
        for d in dims:
            p1, p2 = model.online.projector(z[:, :d]).chunk(2)
            if method == "simclr":
                expected.append(nt_xent_loss(p1, p2, 0.5))
                continue
            t1, t2 = model.target.module.projector(zt[:, :d]).chunk(2)
            if method == "relic":
                expected.append((relic_loss(p1, t2, model.log_temperature) + relic_loss(p2, t1, model.log_temperature)) / 2)
            else:
                q1, q2 = model.predictor(torch.cat([p1, p2])).chunk(2)
                expected.append((byol_loss(q1, t2) + byol_loss(q2, t1)) / 2)
    assert per_dim.tolist() == pytest.approx(torch.stack(expected).tolist(), rel=1e-4)
    assert total.item() == pytest.approx(sum(per_dim.tolist()), rel=1e-6)
    assert swapped_total.item() == pytest.approx(total.item(), rel=1e-4)  # symmetric in the two views
    assert (per_dim > 0).all()


def test_similarities_are_float32_where_accelerate_turned_tf32_on(monkeypatch):
    # Accelerate turns TF32 matrix products on for runs with a dynamo backend and no mixed precision; the losses'
    # similarities must stay float32 there (checked where they are computed), and the setting is restored after.
    import mrl.ssl.losses as losses

    seen = []

    def spy(function):
        def wrapped(*args, **kwargs):
            seen.append(torch.backends.cuda.matmul.allow_tf32)
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(losses, "gather", spy(losses.gather))  # relic's and NT-Xent's products follow it
    monkeypatch.setattr(losses.F, "cosine_similarity", spy(losses.F.cosine_similarity))  # BYOL's
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        relic_loss(a, b, torch.zeros(()))
        nt_xent_loss(a, b)
        byol_loss(a, b)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert len(seen) == 4 and not any(seen)
