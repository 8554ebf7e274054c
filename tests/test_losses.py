import pytest
import torch
import torch.nn.functional as F

from mrl import UserError
from mrl.matryoshka import MatryoshkaHeads, MatryoshkaLoss, dim_weights, per_head_cross_entropy


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(6, 32, requires_grad=True), torch.tensor([0, 1, 2, 1, 0, 2])


def test_per_head_cross_entropy_equals_one_cross_entropy_per_head(batch):
    z, labels = batch
    logits = MatryoshkaHeads([4, 8, 32], 3)(z)
    expected = torch.stack([F.cross_entropy(logits[i], labels) for i in range(3)])
    torch.testing.assert_close(per_head_cross_entropy(logits, labels), expected)


@pytest.mark.parametrize("tied", [False, True])
def test_vectorized_supervised_loss_equals_the_wrapper_loop(batch, tied):
    """The training script's all-heads-at-once loss equals MatryoshkaLoss applied head by head, with weights."""
    z, labels = batch
    dims, weights = [4, 8, 32], [1.0, 0.5, 2.0]
    heads = MatryoshkaHeads(dims, 3, tied=tied)
    vectorized = (torch.tensor(weights) * per_head_cross_entropy(heads(z), labels)).sum()

    def head_loss(prefix, labels):
        i = dims.index(prefix.shape[-1])
        return F.cross_entropy(heads(F.pad(prefix, (0, 32 - prefix.shape[-1])))[i], labels)

    looped, per_dim = MatryoshkaLoss(head_loss, dims, weights)(z, labels=labels)
    torch.testing.assert_close(vectorized, looped)
    assert per_dim.shape == (3,) and not per_dim.requires_grad


def test_matryoshka_loss_sorts_dims_and_never_truncates_in_place(batch):
    z, _ = batch
    original = z.detach().clone()
    seen = []

    def base(a, b):
        seen.append(a.shape[-1])
        return (a * b).sum(-1).mean()

    total, per_dim = MatryoshkaLoss(base, [16, 4, 8])(z, z * 2)
    assert seen == [4, 8, 16]
    torch.testing.assert_close(z.detach(), original)
    expected = sum((z[:, :d] * z[:, :d] * 2).sum(-1).mean() for d in (4, 8, 16))
    torch.testing.assert_close(total, expected)


def test_loss_at_d_gets_no_gradient_from_features_beyond_d(batch):
    z, labels = batch
    heads = MatryoshkaHeads([4, 8], 3)
    loss = MatryoshkaLoss(lambda p, labels: F.cross_entropy(heads(F.pad(p, (0, 32 - p.shape[-1])))[0], labels), [4])
    total, _ = loss(z, labels=labels)
    total.backward()
    assert z.grad[:, :4].abs().sum() > 0 and z.grad[:, 4:].abs().sum() == 0


def test_dim_weights():
    assert dim_weights([8, 16], "uniform") == [1.0, 1.0]
    assert dim_weights([8, 16], "1,0.5") == [1.0, 0.5]
    with pytest.raises(UserError, match="2 dims"):
        dim_weights([8, 16], "1,2,3")
    with pytest.raises(UserError, match="comma-separated"):
        dim_weights([8, 16], "log")
    # --dims 32,8 --dim_weights 1,0: the weights belong to the dims in the order given, whatever order they train in
    assert dim_weights([8, 32], "1,0", given=[32, 8]) == [0.0, 1.0]
