#!/usr/bin/env python
"""Fidelity at the same budget: train_ssl.py against mrl-pytorch 0.1.1 and against an untrained network.

On one data subset, resolution, batch, number of epochs and training seed, it trains

  ours                 train_ssl.py --method relic (nested on the backbone, its default)
  ours-nest-projector  train_ssl.py --method relic --nest projector (mrl-pytorch 0.1.1's nesting)
  seed                 mrl-pytorch 0.1.1 itself, as benchmarks/mrl_pytorch.py runs it: its wheel's model, loss and
                       augmentation, its train.py loop, in a process of its own. The encoder it saves (the EMA
                       target's) is exported into this repo's model.safetensors + config.json, with mean 0 / std 1
                       in the config, so evaluation feeds it [0, 1] pixels as the seed did
  untrained            train_ssl.py --lr 0 --epochs 1: BatchNorm statistics calibrated on the training images,
                       weights untouched (tests/test_fidelity.py checks that lr 0 leaves them bit-identical)

and evaluates each with evaluate.py (linear probe, kNN, PCA of the full embedding per dim; probe and kNN bank on the
training subset, the test split as queries). Sides named in --two_seed_sides train once per --seeds entry; the others
at the first seed only. --seed picks the training subset too (load_splits), so the seeds differ in data order,
initialization, augmentation and subset: the seed-to-seed spread is the noise the table reports.

Diagnostic sides (add them to --sides): seed-bn-train (mrl-pytorch with its BatchNorm in train mode: the encoder's
eval() left on by its feature-size probe removed), seed-online and ours-online (the online encoder instead of the EMA
target, exported from the same runs, no extra training), seed-untrained (mrl-pytorch's network before its first step:
its initialization and its frozen BatchNorm, whose statistics stay at mean 0 / variance 1), and any
`--variant NAME="train_ssl.py flags"` of ours.

Every part (one training run, one evaluation) is skipped when its output exists, so the same command continues an
interrupted run; train_ssl.py runs also resume from their per-epoch checkpoints. Results: <output_dir>/fidelity.json,
fidelity.md, and the table on stdout; parts.json holds each part's wall-clock seconds.

  python benchmarks/fidelity_ssl.py                                   # CPU: 16 px, 5,000 images, batch 64, 3 epochs
  python benchmarks/fidelity_ssl.py --sides ours,seed,seed-bn-train,seed-online,ours-online --epochs 2
  python benchmarks/fidelity_ssl.py --dataset digits --dataset_path "" --image_size 8 --max_train_samples 256 \\
      --batch_size 32 --epochs 1 --output_dir runs/fidelity_smoke     # a quick check of the script
  bash benchmarks/gpu_fidelity.sh                                     # the GPU run (50,000 images, 32 px, batch 256)
"""

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/, also when a test imports this file
import mrl_pytorch  # noqa: E402  (imports neither our mrl nor the seed's)
from fidelity_table import markdown, per_dim, summarize  # noqa: E402
from mrl_pytorch import resnet_child_names, seed_to_ours  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN_SIDES = ("ours", "ours-nest-projector", "seed", "untrained", "seed-bn-train", "seed-online", "ours-online",
                 "seed-untrained")


def get_args_parser():
    parser = argparse.ArgumentParser("fidelity_ssl.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("what every side trains on")
    group.add_argument("--dataset", default="cifar10", help="dataset preset (train_ssl.py --dataset)")
    group.add_argument("--dataset_path", default=os.path.join(ROOT, "..", "shared", "data", "cifar10"),
                       help="local copy of the dataset ('' for none, e.g. digits)")
    group.add_argument("--image_size", type=int, default=16, help="square input side in px")
    group.add_argument("--max_train_samples", type=int, default=5000,
                       help="seeded training subset (also the probe's training set and the kNN bank); 0: all")
    group.add_argument("--epochs", type=int, default=3, help="training epochs of every trained side")
    group.add_argument("--batch_size", type=int, default=64, help="images per optimizer step, every side")
    group.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate, every side (both defaults: 3e-4)")
    group.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    group.add_argument("--sides", default="ours,seed,untrained,ours-nest-projector",
                       help=f"comma-separated, in training order; built in: {', '.join(BUILTIN_SIDES)}; and the "
                            "--variant names")
    group.add_argument("--two_seed_sides", default="ours,seed",
                       help="sides trained at every --seeds entry (the rest: the first seed only)")
    group.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                       help="an extra side: train_ssl.py --method relic with these extra flags (e.g. "
                            "ours-gamma995=\"--ema_momentum 0.995\"); repeatable")
    group = parser.add_argument_group("how")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    group.add_argument("--precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                       help="ours' mixed precision (auto: bf16 on cuda, none on the CPU); the seed uses fp16 on cuda "
                            "(its --fp16_precision, its only mixed precision) and fp32 on the CPU")
    group.add_argument("--gpu_augment", action="store_true",
                       help="ours: train_ssl.py --gpu_augment (the seed always augments with PIL in loader workers)")
    group.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="DataLoader workers, every side")
    group.add_argument("--monitor_samples", type=int, default=1000,
                       help="train_ssl.py's online kNN monitor (run once, after the last epoch) on this many bank and "
                            "query images: evaluate.py gives the numbers that count, so keep it cheap")
    group.add_argument("--checkpointing_steps", default="epoch",
                       help="train_ssl.py's checkpoint interval (N optimizer steps, or 'epoch'): what an interrupted "
                            "run of ours loses at most")
    group.add_argument("--max_eval_samples", type=int, default=None,
                       help="evaluate.py: cap the validation and test splits (default: all 10,000 test images)")
    group.add_argument("--output_dir", default=os.path.join(ROOT, "runs", "fidelity"), help="runs, results and table")
    group.add_argument("--seed_wheel_dir", default=os.path.join(ROOT, ".whl", "seed"),
                       help=f"where {mrl_pytorch.PACKAGE}'s wheel is (downloaded with pip download --no-deps if "
                            "missing)")
    group.add_argument("--table_only", action="store_true", help="print the table from the finished parts, run nothing")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run a seed job (JSON file)
    return parser


# ------------------------------------------------------------------------------------------------------------------
# The seed's side. Everything from here to `main` runs in the worker process with mrl-pytorch's wheel first on
# sys.path, so nothing here may import this repository's `mrl`.

def run_seed_job(job_file):
    """Train mrl-pytorch 0.1.1 as its train.py does, then save its target and online encoders in our key layout."""
    with open(job_file) as f:
        job = json.load(f)
    package = mrl_pytorch.import_wheel(job["seed_wheel_dir"])
    import numpy as np
    import torch
    from safetensors.torch import save_file

    random.seed(job["seed"])  # train.py seeds random, numpy and torch (with 42) at import
    np.random.seed(job["seed"])
    torch.manual_seed(job["seed"])
    device = torch.device(job["device"])
    images = np.load(job["images"])  # (n, h, w, 3) uint8: the same training subset as ours, decoded once
    loader = torch.utils.data.DataLoader(mrl_pytorch.TwoViews(package, images, job["image_size"]),
                                         batch_size=job["batch_size"], shuffle=True, drop_last=True,
                                         num_workers=job["num_workers"], pin_memory=device.type == "cuda",
                                         persistent_workers=job["num_workers"] > 0)
    # train.py modifies the model (the CIFAR stem) for CIFAR; here: for small images
    trainer = mrl_pytorch.Trainer(package, job["cifar_stem"], device, job["fp16"],
                                  mrl_pytorch.gamma_steps(len(loader), job["epochs"]), job["lr"],
                                  bn_train=job["bn_train"])
    history = trainer.train(loader, job["epochs"])

    # what the seed saves (save_encoder: the target's encoder) and the online one, in our key layout, with a
    # reference batch so the importing side can check that our ResNet computes the same embeddings
    model, names = trainer.model, resnet_child_names()
    probe = torch.rand(4, 3, job["image_size"], job["image_size"], generator=torch.Generator().manual_seed(0))
    for which, sequential in (("target", model.target_encoder), ("online", model.online_encoder)):
        encoder = sequential[0].eval()
        with torch.no_grad():
            reference = encoder(probe.to(device)).float().cpu()
        tensors = seed_to_ours(encoder.state_dict(), names)
        tensors.update({"reference.input": probe, "reference.output": reference})
        save_file(tensors, os.path.join(job["out_dir"], f"seed_{which}.safetensors"))
    with open(os.path.join(job["out_dir"], "seed_run.json"), "w") as f:
        json.dump({"steps": trainer.steps, "total_steps_of_gamma_schedule": trainer.total_steps,
                   "final_gamma": trainer.gamma,
                   "bn_mode_while_training": "train" if job["bn_train"] else "eval (as shipped)",
                   "logit_scale": model.t_prime.detach().exp().clamp(0, mrl_pytorch.MAX_TAU).item(),
                   "history": history}, f, indent=2)


# ------------------------------------------------------------------------------------------------------------------
# The orchestrating process (this repository's `mrl`).

def main(args):
    from mrl import UserError

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = parse_variants(args.variant)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = [s for s in sides if s not in BUILTIN_SIDES and s not in variants]
    if unknown or not seeds:
        raise UserError(f"unknown side(s) {unknown} (built in: {', '.join(BUILTIN_SIDES)}; or define --variant)"
                        if unknown else "--seeds is empty")
    two_seed = {s.strip() for s in args.two_seed_sides.split(",")}
    device = args.device if args.device != "auto" else ("cuda" if cuda_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device == "cuda" else "no")
    os.makedirs(args.output_dir, exist_ok=True)
    parts = Parts(os.path.join(args.output_dir, "parts.json"))

    runs = [(side, seed) for seed in seeds for side in sides if seed == seeds[0] or side in two_seed]
    if not args.table_only:
        for side, seed in runs:
            folder = run_folder(args, side, seed)
            if not is_model(folder):
                parts.timed(f"train {side} seed {seed}",
                            lambda: train_side(args, side, seed, folder, variants, device, precision))
            if not os.path.isfile(os.path.join(folder, "eval", "results.json")):
                parts.timed(f"evaluate {side} seed {seed}", lambda: evaluate_side(args, folder, side))
    table = collect(args, runs, seeds, parts)
    print(table)


def parse_variants(texts):
    from mrl import UserError

    variants = {}
    for text in texts:
        name, _, flags = text.partition("=")
        if not name or not flags:
            raise UserError(f'--variant needs NAME="train_ssl.py flags", got {text!r}')
        variants[name.strip()] = shlex.split(flags)
    return variants


def cuda_available():
    import torch

    return torch.cuda.is_available()


class Parts:
    """Wall-clock seconds of every finished part, kept in a JSON file across invocations."""

    def __init__(self, path):
        self.path = path
        self.seconds = json.load(open(path)) if os.path.isfile(path) else {}

    def timed(self, name, work):
        print(f"=== {name}", flush=True)
        start = time.perf_counter()
        work()
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"=== {name}: {self.seconds[name]:.0f} s", flush=True)
        with open(self.path, "w") as f:
            json.dump(self.seconds, f, indent=2)


def run_folder(args, side, seed):
    return os.path.join(args.output_dir, f"{side}_s{seed}")


def is_model(folder):
    return all(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "model.safetensors"))


def data_flags(args, seed):
    flags = ["--dataset", args.dataset, "--image_size", str(args.image_size), "--seed", str(seed)]
    flags += ["--dataset_path", args.dataset_path] if args.dataset_path else []
    return flags + (["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else [])


def run(command, **kwargs):
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, **kwargs)


def train_side(args, side, seed, folder, variants, device, precision):
    if side.startswith("seed"):
        seed_folder = run_folder(args, "seed" if side == "seed-online" else side, seed)
        if not os.path.isfile(os.path.join(seed_folder, "seed_target.safetensors")):
            train_seed(args, seed, seed_folder, device, bn_train=side == "seed-bn-train",
                       epochs=0 if side == "seed-untrained" else args.epochs)
        import_seed_encoder(args, seed, seed_folder, folder, which="online" if side == "seed-online" else "target")
    elif side == "ours-online":
        source = run_folder(args, "ours", seed)
        if not is_model(source):
            train_side(args, "ours", seed, source, variants, device, precision)
        export_online(source, folder)
    else:
        train_ours(args, side, seed, folder, variants.get(side, []), device, precision)


def train_ours(args, side, seed, folder, extra, device, precision):
    """train_ssl.py --method relic; resumes from its last per-epoch checkpoint when an earlier call was cut off."""
    flags = {"ours": [], "ours-nest-projector": ["--nest", "projector"],
             "untrained": ["--lr", "0", "--epochs", "1"]}.get(side, extra)
    launcher = [sys.executable]
    if device == "cuda":
        launcher += ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                     "--mixed_precision", precision, "--dynamo_backend", "no"]
    elif precision != "no":
        launcher += ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
                     "--mixed_precision", precision]
    command = [*launcher, "train_ssl.py", "--method", "relic", *data_flags(args, seed), "--epochs", str(args.epochs),
               "--batch_size", str(args.batch_size), "--lr", str(args.lr), "--num_workers", str(args.num_workers),
               "--knn_every", "0", "--knn_bank_samples", str(args.monitor_samples),
               "--max_eval_samples", str(args.monitor_samples), "--report_to", "none", "--checkpointing_steps",
               args.checkpointing_steps, "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest",
               "--overwrite", "--output_dir", folder,
               *(["--gpu_augment"] if args.gpu_augment else []), *flags]  # later flags win: --lr 0 --epochs 1
    run(command, env=dict(os.environ, WANDB_MODE="disabled"))


def train_seed(args, seed, folder, device, bn_train, epochs):
    """The seed's training run in its own process, on the same decoded training subset as ours."""
    import numpy as np

    from mrl.batches.decode import open_image
    from mrl.data.sources import load_splits

    splits = load_splits(args.dataset, args.dataset_path or None, seed=seed,
                         max_train_samples=args.max_train_samples or None)
    pixels = [np.asarray(open_image(item)) for item in splits.train.with_format(None)["image"]]
    if len({p.shape for p in pixels}) != 1:
        from mrl import UserError
        raise UserError("the seed's side needs training images of one size (they are stacked into one array)")
    os.makedirs(folder, exist_ok=True)
    images = os.path.join(folder, "train_images.npy")
    np.save(images, np.stack(pixels))
    job = {"images": images, "out_dir": folder, "seed": seed, "image_size": args.image_size, "epochs": epochs,
           "batch_size": args.batch_size, "lr": args.lr, "num_workers": args.num_workers, "device": device,
           "fp16": device == "cuda", "bn_train": bn_train, "cifar_stem": args.image_size < 64,
           "seed_wheel_dir": os.path.abspath(args.seed_wheel_dir)}
    job_file = os.path.join(folder, "job.json")
    with open(job_file, "w") as f:
        json.dump(job, f, indent=2)
    mrl_pytorch.wheel(job["seed_wheel_dir"])
    run([sys.executable, os.path.abspath(__file__), "--worker", job_file])
    os.remove(images)


def seed_config(args, splits, source, which, seed_run):
    """config.json of an exported mrl-pytorch encoder: the seed's settings, in train_ssl.py's flag names, and inputs
    (mean 0 / std 1: its encoder saw ToTensor's [0, 1] pixels, in training and in its own evaluation)."""
    from mrl.data.splits import SPLIT_FLAGS
    from mrl.matryoshka import default_dims
    from mrl.models.backbones import build_backbone
    from mrl.run_folder.config import run_config

    cifar_stem = args.image_size < 64
    settings = argparse.Namespace(
        **{key: splits.record[key] for key in SPLIT_FLAGS}, image_size=args.image_size, model="resnet18",
        cifar_stem="on" if cifar_stem else "off", method="relic", nest="projector", normalize="none",
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=mrl_pytorch.WEIGHT_DECAY,
        ema_momentum=mrl_pytorch.GAMMA, alpha=mrl_pytorch.ALPHA, max_temperature=mrl_pytorch.MAX_TAU,
        proj_hidden_dim=mrl_pytorch.PROJ_HIDDEN, proj_out_dim=mrl_pytorch.PROJ_OUT, output_dir=source)
    ssl = {"method": "relic", "nest": "projector", "dims": default_dims(512), "exported": which,
           "projector": {"hidden_dim": mrl_pytorch.PROJ_HIDDEN, "out_dim": mrl_pytorch.PROJ_OUT}}
    config = run_config(settings, build_backbone("resnet18", args.image_size, cifar_stem), splits, (0.0,) * 3,
                        (1.0,) * 3, "ssl", ssl=ssl)
    config["ssl"]["trained_by"] = (f"{mrl_pytorch.PACKAGE}: its wheel's model, loss and augmentation, its train.py "
                                   "loop as benchmarks/mrl_pytorch.py restates it; BatchNorm "
                                   f"{seed_run['bn_mode_while_training']}")
    return config


def import_seed_encoder(args, seed, seed_folder, folder, which):
    """The seed's saved encoder as this repo's model folder, checked to compute the seed's own embeddings."""
    from safetensors.torch import load_file, save_file

    from mrl.data.sources import load_splits
    from mrl.models.backbones import build_backbone
    from mrl.run_folder.config import write_config

    tensors = load_file(os.path.join(seed_folder, f"seed_{which}.safetensors"))
    with open(os.path.join(seed_folder, "seed_run.json")) as f:
        seed_run = json.load(f)
    reference_in, reference_out = tensors.pop("reference.input"), tensors.pop("reference.output")
    backbone = build_backbone("resnet18", args.image_size, args.image_size < 64)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items()}, strict=True)
    check_same_embeddings(backbone.eval(), reference_in, reference_out)
    splits = load_splits(args.dataset, args.dataset_path or None, seed=seed,
                         max_train_samples=args.max_train_samples or None)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    write_config(folder, seed_config(args, splits, seed_folder, which, seed_run))


def check_same_embeddings(backbone, reference_in, reference_out, tolerance=1e-4):
    """Our ResNet with the imported weights must reproduce the seed's embeddings of the reference batch (up to
    float rounding: the seed may have run on a GPU); relative to the largest value, since its frozen-BatchNorm
    network's activations are not of unit scale."""
    import torch

    with torch.no_grad():
        ours = backbone(reference_in)
    error = (ours - reference_out).abs().max().item() / max(reference_out.abs().max().item(), 1e-12)
    if ours.shape != reference_out.shape or not error < tolerance:
        raise AssertionError(f"the imported seed encoder does not reproduce the seed's embeddings (max relative "
                             f"error {error:.2e}, shapes {tuple(ours.shape)} vs {tuple(reference_out.shape)})")
    return error


def export_online(source, folder):
    """ours-online: the online backbone of a finished train_ssl.py run (its last checkpoint), same config."""
    from safetensors.torch import load_file, save_file

    from mrl.run_folder.config import ONLINE, write_config
    from mrl.run_folder.layout import CONFIG_FILE, list_checkpoints

    checkpoint = list_checkpoints(source)[-1]
    with open(os.path.join(source, "metrics.json")) as f:
        steps = json.load(f)["steps"]
    if not checkpoint.endswith(f"step_{steps:08d}"):  # --checkpointing_steps N need not land on the last step
        raise AssertionError(f"{source}'s last checkpoint {checkpoint} is not its final step {steps}: pick a "
                             "--checkpointing_steps that divides the run's steps, or 'epoch'")
    state = load_file(os.path.join(checkpoint, "model.safetensors"))
    prefix = f"{ONLINE}.backbone."
    backbone = {"backbone." + k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}
    with open(os.path.join(source, CONFIG_FILE)) as f:
        config = json.load(f)
    config["ssl"]["exported"] = "online"
    os.makedirs(folder, exist_ok=True)
    save_file(backbone, os.path.join(folder, "model.safetensors"))
    write_config(folder, config)


def evaluate_side(args, folder, side):
    command = [sys.executable, "evaluate.py", "--checkpoint", folder, "--labels", side, "--output_dir",
               os.path.join(folder, "eval"), "--num_workers", str(args.num_workers), "--report_to", "none"]
    command += ["--max_train_samples", str(args.max_train_samples)] if args.max_train_samples else []
    command += ["--max_eval_samples", str(args.max_eval_samples)] if args.max_eval_samples else []
    run(command, env=dict(os.environ, WANDB_MODE="disabled"))


def collect(args, runs, seeds, parts):
    results, dims = {}, set()
    for side, seed in runs:
        found = per_dim(run_folder(args, side, seed))
        if found is not None:
            results.setdefault(side, {})[seed] = found
            dims |= set(found["probe"])
    dims = sorted(dims)
    sides = [s for s in dict.fromkeys(side for side, _ in runs) if s in results]
    summary, comparison = summarize(results, seeds, dims)
    seed_runs = {}
    for side, seed in runs:
        path = os.path.join(run_folder(args, side, seed), "seed_run.json")
        if os.path.isfile(path):
            seed_runs[f"{side} seed {seed}"] = json.load(open(path))
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "table_only")}
    with open(os.path.join(args.output_dir, "fidelity.json"), "w") as f:
        json.dump({"settings": settings, "dims": dims, "results": {s: {str(k): v for k, v in r.items()}
                                                                   for s, r in results.items()},
                   "summary": summary, "comparison": comparison, "part_seconds": parts.seconds,
                   "seed_runs": seed_runs}, f, indent=2)
    text = markdown(summary, comparison, sides, dims)
    with open(os.path.join(args.output_dir, "fidelity.md"), "w") as f:
        f.write(text + "\n")
    total = sum(parts.seconds.values())
    return f"\n{text}\n\nparts: " + ", ".join(f"{k} {v:.0f} s" for k, v in parts.seconds.items()) + \
        f"\ntotal {total:.0f} s; written {os.path.join(args.output_dir, 'fidelity.md')} and fidelity.json"


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    if parsed.worker:
        run_seed_job(parsed.worker)
    else:
        sys.path.insert(0, ROOT)
        from mrl.utils import script  # ours, in this process only (the seed's jobs import the seed's mrl)

        script.run(main, parsed)
