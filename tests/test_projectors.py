"""Nested projections: each prefix goes through the projector on its own, and gradients reach only its dims."""

import pytest
import torch

from mrl.ssl.projectors import Projector, predictor


def loss_at(projector, z, d):
    return projector(projector.trunk(z)[:, :d]).pow(2).sum()


@pytest.mark.parametrize("batchnorm", [False, True])
def test_nest_backbone_loss_at_d_reads_and_trains_only_the_first_d_dims(batchnorm):
    torch.manual_seed(0)
    projector = Projector(16, 12, 5, nest="backbone", batchnorm=batchnorm).train()
    z = torch.randn(6, 16, requires_grad=True)
    loss_at(projector, z, 4).backward()
    assert z.grad[:, 4:].abs().max() == 0 and z.grad[:, :4].abs().min() > 0
    assert projector.fc1.weight.grad[:, 4:].abs().max() == 0 and projector.fc1.weight.grad[:, :4].abs().max() > 0
    assert projector.fc2.weight.grad.abs().max() > 0
    # Changing dims >= d leaves the projection of the prefix unchanged.
    z2 = z.detach().clone()
    z2[:, 4:] += 10
    torch.testing.assert_close(projector(z2[:, :4]), projector(z.detach()[:, :4]))


def test_nest_backbone_prefix_projection_equals_the_full_projector_on_the_zero_padded_input():
    torch.manual_seed(1)
    projector = Projector(16, 12, 5, nest="backbone", bias=True)
    z = torch.randn(6, 16)
    padded = z.clone()
    padded[:, 8:] = 0
    torch.testing.assert_close(projector(z[:, :8]), projector(padded))


def test_every_projector_layer_affects_the_output():
    torch.manual_seed(2)
    for nest in ("backbone", "projector"):
        projector = Projector(16, 12, 5, nest=nest)
        z = torch.randn(6, 16)
        before = projector(projector.trunk(z)[:, :8])
        for layer in (projector.fc1, projector.fc2):
            with torch.no_grad():
                layer.weight[:, :4] += 1.0
            after = projector(projector.trunk(z)[:, :8])
            assert (after - before).abs().max() > 1e-3, (nest, layer)
            before = after


def test_nest_projector_is_the_seeds_layout_prefixes_of_the_hidden_layer():
    """mrl-pytorch 0.1.1: hidden = relu(W1 z) on the full z; the loss at d reads hidden[:, :d] and W2[:, :d]."""
    torch.manual_seed(3)
    projector = Projector(16, 12, 5, nest="projector")
    assert projector.nested_width == 12
    z = torch.randn(6, 16, requires_grad=True)
    hidden = projector.trunk(z)
    hidden.retain_grad()
    out = projector(hidden[:, :4])
    expected = torch.relu(z @ projector.fc1.weight.T)[:, :4] @ projector.fc2.weight[:, :4].T
    torch.testing.assert_close(out, expected)
    out.pow(2).sum().backward()
    assert hidden.grad[:, 4:].abs().max() == 0 and projector.fc2.weight.grad[:, 4:].abs().max() == 0
    assert z.grad[:, 8:].abs().max() > 0  # every backbone dim feeds the nested loss: z itself is not nested


def test_shared_batchnorm_does_not_mix_prefixes_in_train_mode():
    torch.manual_seed(4)
    projector = Projector(16, 12, 5, batchnorm=True).train()
    z = torch.randn(6, 16)
    alone = projector(z[:, :4])
    projector(z[:, :16])  # another dim's call in between
    torch.testing.assert_close(projector(z[:, :4]), alone)


def test_predictor_maps_projection_width_to_itself():
    head = predictor(5, 9)
    assert head(torch.randn(4, 5)).shape == (4, 5)
