"""The two-view augmentation of self-supervised training (mrl-pytorch's, which is SimCLR's), in two forms.

`ssl_augmentation` is the per-image PIL pipeline that DataLoader workers run (through `ImageTransform(views=2)`, which
calls it twice per image with the sample's own seed). `BatchAugment` is the same recipe as batched tensor ops with
per-sample random parameters, run on the accelerator after the batch has been moved there: on a fast GPU the CPU
workers cannot keep up with the training step (reference.md E: 3,240 img/s of CPU augmentation with 8 workers vs
6,000-11,600 img/s of training step), while the batched version costs a few percent of the step.

The recipe (mrl-pytorch `aug.get_training_transforms`): RandomResizedCrop(scale 0.08-1), horizontal flip,
ColorJitter(0.8, 0.8, 0.8, 0.2) with p=0.8, grayscale with p=0.2, Gaussian blur (always; kernel ~10% of the side,
sigma 0.1-2) and solarize with p=0.5. mrl-pytorch fed the network [0, 1] pixels without normalization; here both
paths normalize with the dataset's mean/std by default, because evaluate.py preprocesses with the mean/std saved in
config.json and the network must see the same input distribution in training and evaluation (train_ssl.py
`--normalize none` saves mean 0 / std 1 instead, which is the seed's behaviour end to end).

`strength` scales the colour jitter (brightness, contrast, saturation by 0.8 * strength, hue by 0.2 * strength).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale


def blur_kernel_size(image_size):
    """mrl-pytorch's kernel: int(10% of the side) rounded up to odd (3 px at 32, 9 px at 96; 1 px = no blur)."""
    return int(image_size * 0.1) // 2 * 2 + 1


def jitter_factors(strength):
    return 0.8 * strength, 0.8 * strength, 0.8 * strength, min(0.2 * strength, 0.5)


def ssl_augmentation(image_size, crop_scale=(0.08, 1.0), strength=1.0, jitter_prob=0.8, gray_prob=0.2,
                     blur_prob=1.0, solarize_prob=0.5):
    """One random view of a PIL image, as a PIL image (ToTensor and Normalize follow in transforms.build_transform)."""
    steps = [T.RandomResizedCrop((image_size, image_size), scale=tuple(crop_scale)), T.RandomHorizontalFlip(),
             T.RandomApply([T.ColorJitter(*jitter_factors(strength))], p=jitter_prob), T.RandomGrayscale(p=gray_prob)]
    kernel = blur_kernel_size(image_size)
    if kernel > 1 and blur_prob > 0:
        steps.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob))
    steps.append(T.RandomSolarize(127, p=solarize_prob))  # PIL: pixels >= 127 are inverted, as in the seed
    return T.Compose(steps)


class BatchAugment:
    """`ssl_augmentation` for a whole batch at once, on whatever device the batch is on.

    Input: images (B, C, H, W), uint8 in 0..255 or float in [0, 1], all of one size (the loader resizes). Output: one
    augmented view, float32 (B, C, image_size, image_size), normalized with `mean`/`std`. Every random parameter is
    drawn per sample from `generator`, so the result is a function of (input, generator state): seed the generator
    per batch and a resumed run augments exactly as the uninterrupted one.

    Differences from the PIL pipeline, all in distribution only: the crop box is drawn once and clipped to the image
    (torchvision redraws up to 10 times) and its corners are not rounded to whole pixels (bilinear sampling with
    `grid_sample`). Nothing is read back to the host, so the device's queue never drains here.
    """

    def __init__(self, image_size, mean, std, crop_scale=(0.08, 1.0), strength=1.0, jitter_prob=0.8, gray_prob=0.2,
                 blur_prob=1.0, solarize_prob=0.5, ratio=(3 / 4, 4 / 3)):
        self.image_size, self.crop_scale, self.log_ratio = image_size, tuple(crop_scale), (math.log(ratio[0]),
                                                                                          math.log(ratio[1]))
        self.brightness, self.contrast, self.saturation, self.hue = jitter_factors(strength)
        self.jitter_prob, self.gray_prob, self.blur_prob, self.solarize_prob = jitter_prob, gray_prob, blur_prob, solarize_prob
        self.kernel = blur_kernel_size(image_size)
        self.mean, self.std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, images, generator):
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        n, device = x.shape[0], x.device
        rand = lambda *shape: torch.rand(*shape, generator=generator, device=device)  # noqa: E731
        uniform = lambda low, high: low + (high - low) * rand(n)  # noqa: E731

        x = self.resized_crop_flip(x, uniform(*self.crop_scale), uniform(*self.log_ratio).exp(), rand(n), rand(n),
                                   rand(n) < 0.5)
        jitter = rand(n) < self.jitter_prob
        factors = {"brightness": uniform(max(0.0, 1 - self.brightness), 1 + self.brightness),
                   "contrast": uniform(max(0.0, 1 - self.contrast), 1 + self.contrast),
                   "saturation": uniform(max(0.0, 1 - self.saturation), 1 + self.saturation),
                   "hue": uniform(-self.hue, self.hue)}
        # each sample's own order of the four adjustments (torchvision draws one per image), applied without reading
        # it on the host, which would wait for the device: at every stage all four are computed and each sample
        # takes the one its order names there
        order = torch.rand(n, 4, generator=generator, device=device).argsort(1)
        samples = torch.arange(n, device=device)
        jittered = x
        for stage in range(4):
            candidates = torch.stack([getattr(self, f"adjust_{name}")(jittered, factors[name]) for name in factors])
            jittered = candidates[order[:, stage], samples]
        x = torch.where(jitter[:, None, None, None], jittered, x)
        x = torch.where((rand(n) < self.gray_prob)[:, None, None, None], grayscale(x).expand_as(x), x)
        if self.kernel > 1 and self.blur_prob > 0:
            blurred = gaussian_blur(x, self.kernel, uniform(0.1, 2.0))
            x = torch.where((rand(n) < self.blur_prob)[:, None, None, None], blurred, x)
        x = torch.where((rand(n) < self.solarize_prob)[:, None, None, None] & (x >= 127 / 255), 1 - x, x)
        if self.mean.device != x.device:  # moved once, not copied to the device on every call
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean[:, None, None]) / self.std[:, None, None]

    def resized_crop_flip(self, x, area, aspect, u, v, flip):
        """Crop boxes of `area` (fraction of the image) and `aspect` (w/h), placed at (u, v) in [0, 1) of the free
        room, resized to image_size with bilinear sampling; `flip` mirrors horizontally."""
        w = torch.sqrt(area * aspect).clamp(max=1.0)  # box width and height as fractions of the image side
        h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx, cy = (1 - w) * u + w / 2, (1 - h) * v + h / 2  # box centre in [0, 1]
        theta = torch.zeros(len(x), 2, 3, device=x.device)
        theta[:, 0, 0] = torch.where(flip, -w, w)
        theta[:, 0, 2] = 2 * cx - 1
        theta[:, 1, 1] = h
        theta[:, 1, 2] = 2 * cy - 1
        size = (len(x), x.shape[1], self.image_size, self.image_size)
        grid = F.affine_grid(theta, size, align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    @staticmethod
    def adjust_brightness(x, f):
        return (x * f[:, None, None, None]).clamp(0, 1)

    @staticmethod
    def adjust_contrast(x, f):
        mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return blend(x, mean, f)

    @staticmethod
    def adjust_saturation(x, f):
        return blend(x, grayscale(x), f)

    @staticmethod
    def adjust_hue(x, f):
        h, s, v = rgb_to_hsv(x)
        return hsv_to_rgb((h + f[:, None, None]) % 1.0, s, v)


def blend(x, other, f):
    f = f[:, None, None, None]
    return (f * x + (1 - f) * other).clamp(0, 1)


def grayscale(x):
    """(B, 3, H, W) -> (B, 1, H, W) luma; single-channel input is returned as is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def rgb_to_hsv(x):
    """(B, 3, H, W) in [0, 1] -> hue in [0, 1), saturation, value, each (B, H, W)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return h, s, maxc


def hsv_to_rgb(h, s, v):
    """Inverse of rgb_to_hsv: (B, H, W) each -> (B, 3, H, W)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)  # r, g, b
    s, v = s.unsqueeze(1), v.unsqueeze(1)
    return v - v * s * (torch.minimum(k, 4 - k).clamp(0, 1))


def gaussian_blur(x, kernel, sigma):
    """Separable Gaussian blur with one `sigma` per sample (B,), reflect padding as torchvision's GaussianBlur."""
    n, c, height, width = x.shape
    radius = kernel // 2
    offsets = torch.arange(kernel, device=x.device, dtype=x.dtype) - radius
    weights = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (B * C, kernel)
    y = F.pad(x.reshape(1, n * c, height, width), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, weights[:, None, None, :], groups=n * c)
    y = F.conv2d(y, weights[:, None, :, None], groups=n * c)
    return y.reshape(n, c, height, width)


def batch_seed(seed, epoch, batch, process):
    """A 63-bit seed for the augmentation of one batch on one process (stable across runs and resumes)."""
    return int(np.random.SeedSequence([seed, epoch, batch, process]).generate_state(1, np.uint64)[0] >> np.uint64(1))
