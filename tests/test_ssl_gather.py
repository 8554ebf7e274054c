"""What gathering the global batch fixes in a contrastive loss (that 2 gloo processes give the one-process loss and
gradients of every registered method is tests/test_methods.py's), and that the losses' logits stay float32 under
bf16 autocast."""

import math

import pytest
import torch
from test_methods import build, views

from mrl.ssl.losses import nt_xent_loss, relic_loss


def test_without_gathering_the_split_loss_would_be_another_objective():
    # What the gather fixes: each half on its own compares an image with 3 negatives instead of 7.
    model = build("simclr")
    v1, v2 = views()
    with torch.no_grad():
        full = model(v1, v2)[0].item()
        halves = [model(v1[i:i + 4], v2[i:i + 4])[0].item() for i in (0, 4)]
    assert abs(sum(halves) / 2 - full) > 0.05


@pytest.mark.parametrize("loss", ["relic", "nt_xent"])
def test_similarity_logits_are_float32_under_bf16_autocast(loss):
    g = torch.Generator().manual_seed(5)
    # bf16-representable inputs, so only the loss's own arithmetic can differ
    x, y = (torch.randn(16, 32, generator=g).bfloat16().float() for _ in range(2))
    fn = (lambda a, b: relic_loss(a, b, torch.tensor(math.log(5.0)))) if loss == "relic" else nt_xent_loss
    plain = fn(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fn(x, y)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(plain.item(), rel=2e-6)
