"""The ImageNet recipe's pieces against the MRL reference's definitions, restated here from its train_imagenet.py
(RAIVNLab/MRL, itself FFCV's): the learning rate at every step, the resolution at every epoch, the loss, weight
decay's exemptions, and what FF-K's gradient reaches."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_supervised
from mrl.matryoshka import MatryoshkaClassifier, MatryoshkaHeads, dim_weights, per_head_cross_entropy
from mrl.models.backbones import build_backbone
from mrl.train.optim import parameter_groups
from mrl.train.recipes import fill_recipe
from mrl.train.optim import exponential_schedule, progressive_resolution, warmup_then


def reference_lr_per_step(lr, epochs, peak_epoch, iters):
    """The reference: the per-epoch 'cyclic' value interp(epoch, [0, peak, epochs], [1e-4 lr, lr, 0]), and within
    epoch e the steps interpolate linearly from its value to epoch e+1's."""
    def at(epoch):
        return np.interp([epoch], [0, peak_epoch, epochs], [1e-4 * lr, lr, 0])[0]
    return np.concatenate([np.interp(np.arange(iters), [0, iters], [at(e), at(e + 1)]) for e in range(epochs)])


@pytest.mark.parametrize("epochs,iters", [(40, 3), (5, 7), (3, 1)])
def test_linear_schedule_is_the_reference_lr_at_every_step(epochs, iters):
    ours = warmup_then("linear", 0.425, epochs, iters, warmup_epochs=2)
    np.testing.assert_allclose(ours, reference_lr_per_step(0.425, epochs, 2, iters), rtol=1e-12, atol=1e-15)
    assert ours[0] == pytest.approx(0.425e-4) and ours.max() == pytest.approx(0.425)


def test_exponential_schedule_without_warmup_is_the_blogs_exactly():
    np.testing.assert_array_equal(warmup_then("exponential", 4e-4, 15, 11, 0.0, 0.85),
                                  exponential_schedule(4e-4, 0.85, 15, 11))


def test_warmup_leads_into_every_schedule():
    for name in ("linear", "cosine", "exponential", "constant"):
        lr = warmup_then(name, 1.0, 10, 4, warmup_epochs=2, gamma=0.5)
        assert np.all(np.diff(lr[:8]) > 0) and lr[8] == pytest.approx(1.0), name
        assert np.all(np.diff(lr[8:]) <= 1e-15), name


def reference_resolution(epoch, min_res=160, max_res=192, end_ramp=34, start_ramp=29):
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


def test_progressive_resolution_is_the_references_at_every_epoch():
    ours = [progressive_resolution(e, 160, 192, 29, 34) for e in range(40)]
    assert ours == [reference_resolution(e) for e in range(40)]
    assert ours[29] == 160 and ours[40 - 1] == 192 and sorted(set(ours)) == [160, 192]


def test_loss_is_the_reference_matryoshka_ce_with_label_smoothing():
    """The reference's Matryoshka_CE_Loss: the plain sum over the nesting dims of CrossEntropyLoss(label_smoothing)
    of each head's logits. Label-smoothed CE restated: (1 - eps) * CE(target) + eps * mean over classes of -log p."""
    torch.manual_seed(0)
    logits, labels, eps = torch.randn(9, 16, 1000), torch.randint(0, 1000, (16,)), 0.1
    log_p = logits.log_softmax(-1)
    reference = sum(((1 - eps) * -log_p[i].gather(1, labels[:, None]).squeeze(1) - eps * log_p[i].mean(-1)).mean()
                    for i in range(9))
    dims = [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    weights = torch.tensor(dim_weights(dims, "uniform", given=None))
    ours = (weights * per_head_cross_entropy(logits, labels, eps)).sum()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_fixed_feature_gradient_reaches_only_the_first_k_dims():
    torch.manual_seed(0)
    heads = MatryoshkaHeads([8], num_classes=5)
    z = torch.randn(4, 64, requires_grad=True)
    F.cross_entropy(heads(z)[0], torch.tensor([0, 1, 2, 3])).backward()
    assert z.grad[:, :8].abs().sum() > 0 and torch.all(z.grad[:, 8:] == 0)


def test_weight_decay_skips_the_bn_named_parameters_as_the_reference():
    model = MatryoshkaClassifier(build_backbone("resnet50", 64), MatryoshkaHeads([8, 2048], 10))
    decay, exempt = parameter_groups(model, 1e-4, "bn_named")
    names = dict((id(p), n) for n, p in model.named_parameters())
    exempt_names = {names[id(p)] for p in exempt["params"]}
    # the reference's filter on torchvision's names, restated: 'bn' in the parameter's name
    assert exempt_names == {n for n, _ in model.named_parameters() if "bn" in n.split("backbone.net.")[-1]}
    assert len(exempt_names) == 2 * (1 + 16 * 3)  # bn1 and the 16 bottlenecks' bn1-3, weight and bias each
    assert not any("downsample" in n for n in exempt_names)  # the downsample BatchNorms decay, as in the reference
    assert exempt["weight_decay"] == 0 and decay["weight_decay"] == 1e-4


def recipe_args(*flags):
    args = train_supervised.get_args_parser().parse_args(list(flags))
    fill_recipe(args)
    return args


def test_imagenet_recipe_defaults_and_the_blogs_elsewhere():
    args = recipe_args("--dataset", "imagenet")
    assert (args.optimizer, args.momentum, args.weight_decay, args.no_decay) == ("sgd", 0.9, 1e-4, "bn_named")
    assert (args.lr_schedule, args.warmup_epochs, args.label_smoothing, args.epochs) == ("linear", 2, 0.1, 40)
    assert (args.min_res, args.max_res, args.start_ramp, args.end_ramp) == (160, 192, 29, 34)
    assert args.blurpool and args.memory_format == "channels_last" and args.max_grad_norm == 0
    assert args.lr == pytest.approx(0.425) and args.batch_size == 1024  # the reference README's 2 x 512
    assert recipe_args("--dataset", "imagenet", "--batch_size", "512").lr == pytest.approx(0.2125)
    assert recipe_args("--dataset", "imagenet", "--lr", "0.475").lr == 0.475  # a given flag wins
    assert recipe_args("--dataset", "imagenet", "--epochs", "16").start_ramp == 12  # the ramp scales with the run
    blog = recipe_args("--dataset", "cifar10")
    assert (blog.optimizer, blog.lr, blog.lr_schedule, blog.batch_size, blog.epochs) == ("adamw", 4e-4, "exponential", 8, 15)
    assert blog.min_res is None and not blog.blurpool and blog.label_smoothing == 0


def test_bad_recipe_flags_are_one_line():
    for flags, message in ((("--fixed_feature", "8", "--tied"), "--fixed_feature"),
                           (("--label_smoothing", "1.5"), "--label_smoothing"),
                           (("--min_res", "64", "--max_res", "32"), "progressive resizing")):
        with pytest.raises(train_supervised.UserError, match=message):
            train_supervised.check_args(recipe_args(*flags))
