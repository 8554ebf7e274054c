"""The heads between a backbone and a self-supervised loss: the projector MLP, BYOL's predictor, and how the
Matryoshka prefixes feed them.

A self-supervised loss is not computed on the representation z itself but on a projection g(z). With Matryoshka
training every prefix z[:, :d] must be a representation on its own, so the loss at dim d must see g applied to the
prefix -- not to the full z (a peer projected the full vector at every "nested" dim, so the small dims learned
nothing), and without the projector's hidden layer being skipped (mrl-pytorch's git head computes the hidden layer
and then discards it).

Choice: one projector whose input is the zero-padded prefix, rather than one projector per dim. g_d(z) =
W2 act(norm(W1[:, :d] z[:, :d] + b1)), which is exactly the full projector applied to z with z[:, d:] set to zero,
computed on the prefix and the first d columns of W1 (the MRL-E idea, and what mrl-pytorch does to its nested layer).
Why: the parameter count does not grow with the number of dims (seven 512 -> 512 first layers would be 1.6M
parameters more for ResNet-18, 4x that for ResNet-50), every dim trains the same projector so the prefixes are pushed
towards one shared projection space (the property that makes z[:, :d] a prefix of z[:, :D] and not just another
embedding), and by construction the loss at dim d neither reads nor sends gradient to z[:, d:] or to W1[:, d:]
(tests/test_projectors.py checks this). The BatchNorm of the hidden layer (SimCLR/BYOL; mrl-pytorch's ReLIC head has
none) is shared too: heads only ever run in train mode, where BN normalizes each call -- one call per dim -- with that
call's own batch statistics, so sharing it does not mix dims.

`nest="projector"` is mrl-pytorch 0.1.1's (the released wheel's) behaviour instead: the backbone output z is projected
in full by the first layer, and the prefixes are taken of the hidden activation h = act(W1 z): g_d = W2[:, :d] h[:, :d].
Then every backbone dim feeds every nested loss, so truncating z at evaluation time was never trained for; it is kept
to reproduce the seed.

Both are written as `trunk` (what runs once on the full backbone output, before the nesting point) and `forward`
(what runs on each prefix), so that the Matryoshka loss wrapper slices trunk(z) and calls the projector per prefix.
"""

import torch.nn as nn
import torch.nn.functional as F

NEST = ("backbone", "projector")


class Projector(nn.Module):
    """MLP in_dim -> hidden_dim (x layers - 1) -> out_dim over nested prefixes; see the module docstring. With
    nest="projector" the prefixes are taken of the last hidden layer."""

    def __init__(self, in_dim, hidden_dim=512, out_dim=64, nest="backbone", batchnorm=False, bias=False, layers=2):
        super().__init__()
        if nest not in NEST:
            raise ValueError(f"nest must be one of {NEST}, got {nest!r}")
        if layers < 2:
            raise ValueError(f"a projector has at least 2 layers, got {layers}")
        self.nest = nest
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=bias and not batchnorm)
        self.norm = nn.BatchNorm1d(hidden_dim) if batchnorm else nn.Identity()
        # More hidden layers (VICReg's and Barlow Twins' 3-layer expander) run after the nesting point, on full-width
        # activations; a 2-layer projector has none, so its state-dict keys are what they always were.
        self.hidden = nn.Sequential(*(module for _ in range(layers - 2) for module in (
            nn.Linear(hidden_dim, hidden_dim, bias=bias and not batchnorm),
            nn.BatchNorm1d(hidden_dim) if batchnorm else nn.Identity(), nn.ReLU())))
        self.fc2 = nn.Linear(hidden_dim, out_dim, bias=bias)

    @property
    def nested_width(self):
        """The width the Matryoshka dims are prefixes of: the backbone output, or the hidden layer."""
        return self.fc1.in_features if self.nest == "backbone" else self.fc1.out_features

    def trunk(self, z):
        """The part before the nesting point, once on the full backbone output."""
        return z if self.nest == "backbone" else self.hidden(F.relu(self.norm(self.fc1(z))))

    def forward(self, prefix):
        """The projection of a prefix of trunk(z), reading only its first d = prefix.shape[-1] columns of weights."""
        d = prefix.shape[-1]
        if self.nest == "projector":
            return F.linear(prefix, self.fc2.weight[:, :d], self.fc2.bias)
        hidden = F.linear(prefix, self.fc1.weight[:, :d], self.fc1.bias)
        return self.fc2(self.hidden(F.relu(self.norm(hidden))))


def predictor(dim, hidden_dim):
    """BYOL's predictor q: dim -> hidden (BN, ReLU) -> dim, applied to every dim's projection (shared, as the
    projector; it only runs in train mode, so its BatchNorm uses each call's own batch)."""
    return nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, dim))
