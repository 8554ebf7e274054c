import pytest
import torch
import torch.nn as nn

from mrl import UserError
from mrl.matryoshka import MatryoshkaClassifier, MatryoshkaHeads, default_dims, training_dims
from mrl.models.backbones import CNN4, build_backbone


def test_cnn4_matches_the_blog_shapes_and_has_no_nonlinearity():
    model = build_backbone("cnn4", 256)
    # 256 -> conv12/pool3 81 -> conv5/pool3 25 -> conv3/pool2 11 -> conv3/pool2 4: 512 * 4 * 4 = 8192 -> 1024
    assert model.fc.in_features == 8192 and model.embed_dim == 1024
    kinds = {type(m) for m in model.modules()} - {CNN4, nn.Sequential}
    assert kinds == {nn.Conv2d, nn.MaxPool2d, nn.Flatten, nn.Linear}
    assert [m.kernel_size for m in model.modules() if isinstance(m, nn.Conv2d)] == [(12, 12), (5, 5), (3, 3), (3, 3)]
    with torch.no_grad():
        z = model(torch.randn(1, 3, 256, 256))
    assert z.shape == (1, 1024)


def test_cnn4_bn_adds_batchnorm_and_relu_and_cnn4_is_linear():
    bn = build_backbone("cnn4_bn", 128)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 4
    assert sum(isinstance(m, nn.ReLU) for m in bn.modules()) == 4
    # Without nonlinearities and with max-pool positions fixed, cnn4 is positively homogeneous: f(2x) - f(0)
    # equals 2 (f(x) - f(0)).
    torch.manual_seed(0)
    plain = build_backbone("cnn4", 128).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        zero = plain(torch.zeros_like(x))
        torch.testing.assert_close(plain(2 * x) - zero, 2 * (plain(x) - zero), rtol=1e-4, atol=1e-4)


def test_cnn4_rejects_images_too_small_with_the_minimum():
    assert CNN4.min_image_size() == 113
    build_backbone("cnn4", 113)
    with pytest.raises(UserError, match="at least 113 px"):
        build_backbone("cnn4", 112)


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_resnets_report_their_embedding_dim(name, dim):
    model = build_backbone(name, 32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    assert model.embed_dim == dim


def test_cifar_stem_is_automatic_for_small_images_and_can_be_overridden():
    assert build_backbone("resnet18", 32).net.conv1.kernel_size == (3, 3)
    assert isinstance(build_backbone("resnet18", 32).net.maxpool, nn.Identity)
    assert build_backbone("resnet18", 224).net.conv1.kernel_size == (7, 7)
    assert build_backbone("resnet18", 32, cifar_stem=False).net.conv1.kernel_size == (7, 7)
    assert build_backbone("resnet18", 224, cifar_stem=True).net.conv1.kernel_size == (3, 3)


def test_cifar_stem_conv_is_initialized_like_the_other_convs():
    # kaiming normal, fan_out, ReLU gain: std sqrt(2 / (64 * 3 * 3)) = 0.059 (nn.Conv2d's default would give
    # a uniform with std 1 / sqrt(3 * 27) = 0.111)
    torch.manual_seed(0)
    conv1 = build_backbone("resnet18", 32).net.conv1.weight
    assert conv1.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.05)
    assert conv1.abs().max().item() > 3 ** 0.5 * 0.111  # beyond the default uniform bound: a normal


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(UserError, match="cnn4, cnn4_bn, resnet18"):
        build_backbone("vit", 32)


def test_dims_are_sorted_and_validated_and_repeats_refused():
    assert training_dims([[64, 8], [512, 16]], 512) == [8, 16, 64, 512]
    with pytest.raises(UserError, match="--dims lists 8 more than once"):
        training_dims([[64, 8, 512, 16, 8]], 512)
    with pytest.raises(UserError, match="1..512"):
        training_dims([[8, 1024]], 512)
    with pytest.raises(UserError, match="empty"):
        training_dims([[]], 512)
    with pytest.warns(UserWarning, match="below the embedding dim"):
        training_dims([[8, 16]], 512)
    assert training_dims(None, 512) == default_dims(512)  # --dims not given
    assert default_dims(1024) == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert default_dims(100) == [8, 16, 32, 64, 100]


@pytest.fixture
def embedding():
    torch.manual_seed(0)
    return torch.randn(5, 64)


def test_separate_heads_equal_independent_linear_layers(embedding):
    heads = MatryoshkaHeads([8, 16, 64], num_classes=3)
    independent = [nn.Linear(d, 3) for d in (8, 16, 64)]
    for layer, head in zip(independent, heads.classifiers):
        layer.load_state_dict(head.state_dict())
    expected = torch.stack([layer(embedding[:, :d]) for layer, d in zip(independent, (8, 16, 64))])
    torch.testing.assert_close(heads(embedding), expected)
    assert len({p.data_ptr() for p in heads.parameters()}) == 6  # weight and bias per head, nothing shared


def test_tied_heads_equal_the_loop_formulation_and_share_one_matrix(embedding):
    heads = MatryoshkaHeads([8, 16, 40, 64], num_classes=3, tied=True)
    w, b = heads.classifier.weight, heads.classifier.bias
    expected = torch.stack([embedding[:, :d] @ w[:, :d].T + b for d in (8, 16, 40, 64)])
    torch.testing.assert_close(heads(embedding), expected, rtol=1e-5, atol=1e-5)
    assert [name for name, _ in heads.named_parameters()] == ["classifier.weight", "classifier.bias"]
    # The head for d=8 is a slice of the one matrix: its loss moves only the first 8 columns.
    heads(embedding)[0].sum().backward()
    assert w.grad[:, :8].abs().sum() > 0 and w.grad[:, 8:].abs().sum() == 0


@pytest.mark.parametrize("tied", [False, True])
def test_head_for_d_ignores_features_beyond_d(embedding, tied):
    heads = MatryoshkaHeads([8, 16, 64], num_classes=3, tied=tied)
    changed = embedding.clone()
    changed[:, 16:] += 10.0
    before, after = heads(embedding), heads(changed)
    torch.testing.assert_close(before[:2], after[:2])
    assert not torch.allclose(before[2], after[2])


def test_classifier_returns_embedding_and_all_heads():
    model = MatryoshkaClassifier(build_backbone("resnet18", 16), MatryoshkaHeads([8, 512], 10)).eval()
    with torch.no_grad():
        z, logits = model(torch.randn(3, 3, 16, 16))
    assert z.shape == (3, 512) and logits.shape == (2, 3, 10)
