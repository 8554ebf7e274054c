"""The two-view augmentation: the per-image CPU pipeline (mrl-pytorch's recipe) and the batched GPU path, on CPU."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from mrl.batches.ssl_augment import (
    BatchAugment,
    batch_seed,
    blur_kernel_size,
    gaussian_blur,
    grayscale,
    hsv_to_rgb,
    rgb_to_hsv,
    ssl_augmentation,
)
from mrl.batches.transforms import ImageTransform, build_transform
from mrl.data.sources import load_splits


def images(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g)


def test_cpu_recipe_is_mrl_pytorchs():
    steps = ssl_augmentation(32).transforms
    crop, flip, jitter, gray, blur, solarize = steps
    assert isinstance(crop, T.RandomResizedCrop) and crop.scale == (0.08, 1.0) and crop.size == (32, 32)
    assert isinstance(flip, T.RandomHorizontalFlip)
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], T.ColorJitter)
    cj = jitter.transforms[0]
    for factor in (cj.brightness, cj.contrast, cj.saturation):
        assert factor == pytest.approx((0.2, 1.8))
    assert cj.hue == pytest.approx((-0.2, 0.2))
    assert gray.p == 0.2 and blur.p == 1.0 and blur.transforms[0].kernel_size == (3, 3)
    assert solarize.p == 0.5 and solarize.threshold == 127
    assert [blur_kernel_size(s) for s in (8, 32, 64, 96, 224)] == [1, 3, 7, 9, 23]


def test_two_views_per_sample_are_seeded_per_sample_and_epoch():
    splits = load_splits("digits", max_train_samples=4)
    transform = ImageTransform(build_transform("ssl", 16, (0.5,) * 3, (0.5,) * 3, train=True), seed=0, views=2)
    batch = splits.train[:4]
    first = transform(batch)["pixel_values"]
    again = transform(batch)["pixel_values"]
    assert all(len(views) == 2 and views[0].shape == (3, 16, 16) for views in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert all(not torch.equal(v[0], v[1]) for v in first)  # the two views differ
    transform.epoch = 1
    assert not torch.equal(transform(batch)["pixel_values"][0][0], first[0][0])
    assert all(v.min() >= -1 - 1e-6 and v.max() <= 1 + 1e-6 for views in first for v in views)  # [0,1] normalized


def test_batch_augment_is_random_per_sample_and_reproducible_from_the_generator():
    x = images(1).expand(16, 3, 16, 16).contiguous()  # the same image 16 times
    augment = BatchAugment(16, (0.0,) * 3, (1.0,) * 3)
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == (16, 3, 16, 16) and out.dtype == torch.float32
    flat = out.flatten(1)
    distinct = torch.cdist(flat, flat) + torch.eye(16) * 1e9
    assert distinct.min() > 1e-3  # every sample got its own parameters
    torch.testing.assert_close(augment(x, torch.Generator().manual_seed(0)), out)
    assert not torch.allclose(augment(x, torch.Generator().manual_seed(1)), out)
    assert out.min() >= 0 and out.max() <= 1  # unnormalized values stay in [0, 1]


def test_batch_augment_normalizes_and_accepts_uint8():
    x = images(32, seed=1)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    plain = BatchAugment(16, (0.0,) * 3, (1.0,) * 3)(x, torch.Generator().manual_seed(3))
    normalized = BatchAugment(16, mean, std)(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(normalized, (plain - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    as_uint8 = (x * 255).round().to(torch.uint8)
    from_uint8 = BatchAugment(16, (0.0,) * 3, (1.0,) * 3)(as_uint8, torch.Generator().manual_seed(3))
    assert (from_uint8 - plain).abs().max() < 0.02 and from_uint8.min() >= 0 and from_uint8.max() <= 1


def test_batch_augment_probabilities_match_the_recipe():
    n = 2000
    x = images(n, size=8, seed=2)
    augment = BatchAugment(8, (0.0,) * 3, (1.0,) * 3, blur_prob=0.0, solarize_prob=0.0, strength=0.0)
    out = augment(x, torch.Generator().manual_seed(4))
    gray = (out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 1e-6
    assert abs(gray.float().mean().item() - 0.2) < 0.04  # grayscale with p = 0.2
    # With a full-image crop and no jitter, grayscale or blur, each output is the image, its mirror, or one of those
    # solarized (pixels >= 127/255 inverted).
    solarize_only = BatchAugment(8, (0.0,) * 3, (1.0,) * 3, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), strength=0.0,
                                 gray_prob=0.0, blur_prob=0.0)
    out = solarize_only(x, torch.Generator().manual_seed(5))
    solar = lambda v: torch.where(v >= 127 / 255, 1 - v, v)  # noqa: E731
    same = lambda v: (out - v).abs().flatten(1).amax(1) < 1e-5  # noqa: E731
    plain, solarized = same(x) | same(x.flip(-1)), same(solar(x)) | same(solar(x.flip(-1)))
    assert (plain ^ solarized).all()
    assert abs(solarized.float().mean().item() - 0.5) < 0.05  # solarized with p = 0.5
    assert abs(same(x.flip(-1)).float().mean().item() - 0.25) < 0.05  # flipped with p = 0.5, not solarized


def test_full_crop_without_flip_is_the_identity_and_flip_mirrors():
    x = images(2, size=8)
    augment = BatchAugment(8, (0.0,) * 3, (1.0,) * 3)
    one, half = torch.ones(2), torch.full((2,), 0.5)
    torch.testing.assert_close(augment.resized_crop_flip(x, one, one, half, half, torch.tensor([False, True])),
                               torch.stack([x[0], x[1].flip(-1)]), atol=1e-5, rtol=0)
    # a quarter-area box in the top-left corner, upsampled 2x
    corner = augment.resized_crop_flip(x, torch.full((2,), 0.25), one, torch.zeros(2), torch.zeros(2),
                                       torch.tensor([False, False]))
    upsampled = torch.nn.functional.interpolate(x[:, :, :4, :4], scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(corner[:, :, 1:-1, 1:-1], upsampled[:, :, 1:-1, 1:-1], atol=1e-5, rtol=0)


def test_colour_ops_match_torchvision_per_sample():
    x = images(4, seed=3)
    factors = torch.tensor([0.3, 0.9, 1.4, 1.8])
    hues = torch.tensor([-0.2, -0.05, 0.1, 0.2])
    for name, tv in (("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
                     ("saturation", TF.adjust_saturation)):
        got = getattr(BatchAugment, f"adjust_{name}")(x, factors)
        expected = torch.stack([tv(x[i], float(factors[i])) for i in range(4)])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    got = BatchAugment.adjust_hue(x, hues)
    expected = torch.stack([TF.adjust_hue(x[i], float(hues[i])) for i in range(4)])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(hsv_to_rgb(*rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_gaussian_blur_matches_torchvision_per_sample():
    x = images(3, seed=4)
    sigmas = torch.tensor([0.3, 1.0, 2.0])
    got = gaussian_blur(x, 5, sigmas)
    expected = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(s), float(s)]) for i, s in enumerate(sigmas)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_batch_seeds_differ_by_epoch_batch_and_process():
    seeds = {batch_seed(0, e, b, p) for e in range(3) for b in range(3) for p in range(2)}
    assert len(seeds) == 18 and batch_seed(0, 1, 2, 0) == batch_seed(0, 1, 2, 0)
    assert all(0 <= s < 2**63 for s in seeds)


def test_pil_and_batched_paths_agree_in_distribution():
    """Mean pixel statistics of many views of one image agree between the two paths (same recipe)."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    pil = T.Compose([ssl_augmentation(16), T.ToTensor()])
    torch.manual_seed(0)
    cpu = torch.stack([pil(image) for _ in range(400)])
    gpu = BatchAugment(16, (0.0,) * 3, (1.0,) * 3)(TF.pil_to_tensor(image).expand(400, 3, 16, 16),
                                                   torch.Generator().manual_seed(0))
    assert cpu.mean().item() == pytest.approx(gpu.mean().item(), abs=0.03)
    assert cpu.std().item() == pytest.approx(gpu.std().item(), abs=0.03)


def test_batch_augmentation_reads_nothing_back_to_the_host(monkeypatch):
    # On an accelerator every read of a device tensor by the host (.item(), .tolist(), bool(), ...) waits for all the
    # work queued on the device. The augmentation runs at every step (--gpu_augment, --data_on_device): it must not
    # read one. (The jitter order used to be drawn with randperm(...).tolist().)
    augment = BatchAugment(16, (0.5,) * 3, (0.5,) * 3)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    expected_shape = augment(images, torch.Generator().manual_seed(1)).shape

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    assert augment(images, generator).shape == expected_shape == (8, 3, 16, 16)
