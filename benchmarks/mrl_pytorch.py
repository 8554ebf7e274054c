"""mrl-pytorch 0.1.1 (the seed), as the benchmarks run it: its wheel, its two-view data, its model, its training step
and its EMA schedule, and its encoder's weights under our names. bench_ssl_step.py times its step,
bench_seed_epoch.py its epochs, fidelity_ssl.py trains it and evaluates its encoder as ours.

Its import package is also called `mrl`, like this repository's, so the seed runs in a process of its own:
`import_wheel` puts the unzipped wheel first on sys.path and imports it, and nothing in this module imports our `mrl`.
Its training loop lives in its git repository's train.py, not in the wheel, so `Trainer` restates that loop (with
run_training.py's defaults for what the benchmarks do not vary) around the wheel's ReLIC, relic_loss and ResNet-18.
"""

import glob
import os
import statistics
import subprocess
import sys
import time
import zipfile

import torch
from PIL import Image

PACKAGE = "mrl-pytorch==0.1.1"
# run_training.py's defaults (its git head)
GAMMA, ALPHA, MAX_TAU, PROJ_HIDDEN, PROJ_OUT = 0.995, 1.0, 5.0, 512, 64
COPY_UNTIL, EVERY = 1, 1  # --update_gamma_after_step, --update_gamma_every_n_steps
LR, WEIGHT_DECAY, EPOCHS = 3e-4, 1e-5, 100


def wheel(folder):
    """The unzipped mrl-pytorch 0.1.1 wheel in `folder` (downloaded with pip on first use)."""
    unpacked = os.path.join(folder, "unpacked")
    if not os.path.isfile(os.path.join(unpacked, "mrl", "mrl.py")):
        os.makedirs(folder, exist_ok=True)
        wheels = glob.glob(os.path.join(folder, "mrl_pytorch-0.1.1-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", folder],
                           check=True)
            wheels = glob.glob(os.path.join(folder, "mrl_pytorch-0.1.1-*.whl"))
        with zipfile.ZipFile(wheels[0]) as archive:
            archive.extractall(unpacked)
    return unpacked


def import_wheel(folder):
    """The seed's `mrl` package, imported from its wheel: call it in a process that has not imported ours."""
    sys.path.insert(0, wheel(folder))
    import mrl
    import mrl.aug
    import mrl.utils

    if not os.path.abspath(mrl.__file__).startswith(os.path.abspath(folder)):
        raise AssertionError(f"`mrl` comes from {mrl.__file__}, not from the seed's wheel in {folder}")
    return mrl


class TwoViews(torch.utils.data.Dataset):
    """uint8 images (n, h, w, 3) served as torchvision's CIFAR10 serves them to the seed's utils.get_dataset: each
    handed to PIL and the wheel's two-view transform, with a label train.py never reads."""

    def __init__(self, package, images, image_size):
        self.images = images
        self.transform = package.aug.ViewGenerator(package.aug.get_training_transforms(image_size), 2)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), 0


def gamma_steps(steps_per_epoch, epochs):
    """K, the length of the seed's gamma schedule, as its train.py computes it for a run:

        total_num_steps = (len(train_loader) * (args.num_epochs + 2)) - args.update_gamma_after_step

    two epochs longer than the run, so gamma never reaches 1. Every benchmark runs the seed with this length
    (bench_ssl_step.py gives ours the same one)."""
    return steps_per_epoch * (epochs + 2) - COPY_UNTIL


def gamma(k, total):
    """train.py's update_gamma(k, K, tau_base): the cosine from GAMMA up to 1 (ReLIC's, after BYOL), in float32."""
    k, total = torch.tensor(k, dtype=torch.float32), torch.tensor(total, dtype=torch.float32)
    return (1 - (1 - GAMMA) * (torch.cos(torch.pi * k / total) + 1) / 2).item()


class Trainer:
    """The seed's training as train.py runs it, from `package` (import_wheel's): the wheel's ReLIC (nesting on the
    projector) over ResNet-18, Adam over the online encoder and t', GradScaler fp16 (its --fp16_precision), the EMA
    target moved after every step.

    `bn_train`: put the model in train mode. ReLIC's feature-size probe leaves the encoder in eval mode and nothing
    in train.py puts it back, so as shipped the seed trains with frozen BatchNorm statistics (a bug; see the README).
    """

    def __init__(self, package, cifar_stem, device, fp16, total_steps, lr=LR, weight_decay=WEIGHT_DECAY, bn_train=True):
        self.relic_loss, self.device, self.fp16, self.total_steps = package.relic_loss, device, fp16, total_steps
        # train.py: modify_model (the CIFAR stem) when "cifar" is in the dataset name
        self.model = package.ReLIC(package.utils.get_encoder("resnet18", modify_model=cifar_stem),
                                   proj_out_dim=PROJ_OUT).to(device)
        if bn_train:
            self.model.train()
        self.optimizer = torch.optim.Adam(list(self.model.online_encoder.parameters()) + [self.model.t_prime], lr=lr,
                                          weight_decay=weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)
        self.gamma, self.steps = GAMMA, 0

    def step(self, x1, x2):
        """One iteration of train.py's loop on two views already on the device; returns the loss, which train.py
        reads on the host every step."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            o1, o2, t1, t2 = self.model(x1, x2)
            loss1 = torch.stack([self.relic_loss(o, t, self.model.t_prime, ALPHA, max_tau=MAX_TAU)
                                 for o, t in zip(o1, t2)]).sum()
            loss2 = torch.stack([self.relic_loss(o, t, self.model.t_prime, ALPHA, max_tau=MAX_TAU)
                                 for o, t in zip(o2, t1)]).sum()
            loss = (loss1 + loss2) / 2
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # train.py's order: move the target with the current gamma, then compute the next one (so each gamma is
        # applied one update late); up to update_gamma_after_step the target is a plain copy
        if self.steps > COPY_UNTIL and self.steps % EVERY == 0:
            self.model.update_params(self.gamma)
            self.gamma = gamma(self.steps, self.total_steps)
        if self.steps <= COPY_UNTIL:
            self.model.copy_params()
        self.steps += 1
        return loss.item()

    def train(self, loader, epochs):
        """train.py's loop over a loader of TwoViews, each view moved to the device as it does; per epoch a line on
        stdout and a row of the returned history."""
        history = []
        for epoch in range(epochs):
            start, losses, images = time.perf_counter(), [], 0
            for (x1, x2), _ in loader:
                losses.append(self.step(x1.to(self.device, non_blocking=True), x2.to(self.device, non_blocking=True)))
                images += len(x1)
            seconds = time.perf_counter() - start
            history.append({"epoch": epoch + 1, "seconds": seconds, "images_per_s": images / seconds,
                            "loss": statistics.fmean(losses), "gamma": self.gamma})
            print(f"seed epoch {epoch + 1}: {images} images in {seconds:.1f} s ({images / seconds:,.1f} img/s), "
                  f"loss {history[-1]['loss']:.4f}, gamma {self.gamma:.6f}", flush=True)
        return history


def resnet_child_names():
    """Names of the children of a torchvision ResNet that the seed's encoder keeps, in order: its encoder is
    nn.Sequential(*children[:-1] (all but fc), AdaptiveAvgPool2d(1), Squeeze()), so its state dict keys are
    `<index>.<rest>`, where ours (mrl.models.backbones.ResNet) are `net.<child name>.<rest>`."""
    import torchvision

    return [name for name, _ in torchvision.models.resnet18(weights=None).named_children()][:-1]


def seed_to_ours(state, names):
    """The seed's encoder state dict -> this repo's model.safetensors keys (`backbone.net.<child>.<rest>`)."""
    out = {}
    for key, value in state.items():
        index, rest = key.split(".", 1)
        out[f"backbone.net.{names[int(index)]}.{rest}"] = value.detach().float().cpu().contiguous() \
            if value.is_floating_point() else value.detach().cpu().contiguous()
    return out
