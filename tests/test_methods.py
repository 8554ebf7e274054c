"""Every registered self-supervised method (mrl/ssl/methods.py), tested by being registered: a finite loss and
gradients, a Matryoshka loss at dim d blind to z[:, d:], the same loss and gradients on 2 gloo processes as on 1 (a
method that forgets to gather its global-batch statistics fails that), and a one-epoch digits run that saves,
evaluates and resumes exactly. The command line: a method's flags get its defaults and are refused with another."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from test_train_ssl import run_main

import evaluate
import train_ssl
from mrl.run_folder.final_model import load_model
from mrl.ssl import losses, methods
from mrl.ssl.methods import METHODS
from mrl.ssl.model import SSLModel
from mrl.ssl.projectors import Projector

GLOBAL_BATCH, WORLD, DIMS = 8, 2, [4, 8, 16]
pytestmark = pytest.mark.xdist_group("test_methods")  # the 2-process results are computed once (a module fixture)


class TinyBackbone(nn.Module):
    """No BatchNorm: per-process BatchNorm statistics would differ from one process's by design (see --sync_bn)."""

    def __init__(self):
        super().__init__()
        self.net, self.embed_dim = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Tanh()), 16

    def forward(self, x):
        return self.net(x)


def build(name, batchnorm=False):
    """A small model of the method with its own projector shape; without any BatchNorm unless asked (BYOL's
    predictor has one), so that 2 processes can compute exactly what 1 does."""
    method = METHODS[name]
    layers = methods.projector_settings(method)["layers"]
    torch.manual_seed(0)
    model = SSLModel(method, TinyBackbone(), Projector(16, 12, 6, batchnorm=batchnorm, layers=layers), DIMS,
                     [1.0, 0.5, 1.0], ema_momentum=[0.9] * 4, predictor_hidden=12)
    if not batchnorm:
        for parent in model.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(parent, child_name, nn.Identity())
    for parameter in model.learnable().values():
        parameter.data.add_(0.3)  # away from the initial value (ReLIC: inside the clamp, whose gradient counts too)
    if model.target is not None:  # a target that differs from the online network, as after some training
        for p in model.target.module.parameters():
            p.data.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model


def views():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=g), torch.randn(GLOBAL_BATCH, 3, 4, 4, generator=g)


def loss_and_gradients(model, v1, v2):
    loss, _ = model(v1, v2)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(METHODS))
def test_loss_and_gradients_are_finite_and_reach_every_trained_parameter(name):
    model = build(name, batchnorm=True)
    loss, grads = loss_and_gradients(model, *views())
    # finite and a scalar, whatever its sign: a negative-cosine loss (SimSiam's, BYOL's without the constant) is
    # below zero; what matters is that it trains, which the gradients below check
    assert loss.dim() == 0 and torch.isfinite(loss)
    for parameter_name, grad in grads.items():
        assert torch.isfinite(grad).all(), parameter_name
    # what trains: the backbone, the projector, the predictor and the learnable scalars
    assert all(grad.abs().sum() > 0 for n, grad in grads.items() if "norm" not in n), \
        [n for n, g in grads.items() if g.abs().sum() == 0]


@pytest.mark.parametrize("name", list(METHODS))
def test_the_loss_at_dim_d_neither_reads_nor_trains_the_later_dims(name):
    model = build(name, batchnorm=True).train()
    v1, v2 = views()
    with torch.no_grad():
        z = model.online(torch.cat([v1, v2]))
        targets = [model.target(torch.cat([v1, v2]))] if model.target is not None else []
    z = z.clone().requires_grad_(True)
    _, per_dim = model.loss(z, *targets)
    g = torch.Generator().manual_seed(7)
    changed = [e.detach().clone() for e in [z, *targets]]
    for e in changed:
        e[:, 4:] = torch.randn(e[:, 4:].shape, generator=g)
    _, per_dim_changed = model.loss(*changed)
    assert per_dim_changed[0].item() == pytest.approx(per_dim[0].item(), rel=1e-6)  # d = 4
    assert abs(per_dim_changed[1].item() - per_dim[1].item()) > 1e-4  # d = 8 does read dims 4..7
    first = model.prefix_loss(z[:, :4], *(t[:, :4] for t in targets))
    (gradient,) = torch.autograd.grad(first, z)
    assert gradient[:, 4:].abs().max() == 0 and gradient[:, :4].abs().max() > 0


def worker(rank, names, rendezvous, results):
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    shared = losses.gather, losses.row_offset, losses.world_size
    try:
        for forget_gather in (False, True):
            if forget_gather:  # what a loss that compares within, or takes statistics over, this process's share gives
                losses.gather, losses.row_offset, losses.world_size = (lambda t: t), (lambda rows: 0), (lambda: 1)
            for name in names:
                model = nn.parallel.DistributedDataParallel(build(name))
                v1, v2 = views()
                rows = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)  # split_batches
                loss, grads = loss_and_gradients(model, v1[rows], v2[rows])
                dist.all_reduce(loss)  # what the scripts log: the mean over processes
                results[(name, forget_gather, rank)] = (loss.item() / WORLD,
                                                        {n.removeprefix("module."): g for n, g in grads.items()})
    finally:
        losses.gather, losses.row_offset, losses.world_size = shared
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every registered method's loss and gradients on 2 gloo processes, and those of the losses that gather with
    the gather taken out (one spawn for all)."""
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(worker, args=(list(METHODS), str(tmp_path_factory.mktemp("rendezvous") / "file"), shared),
                 nprocs=WORLD)
        return dict(shared)


def tolerances_used(one, two, rtol=1e-5, atol=1e-6):
    """How many times the allowed difference -- rtol relative, plus atol for float32 rounding near 0 -- the largest
    difference between the one-process loss and gradients and a process's is (at most 1: equal to that tolerance)."""
    (one_loss, one_grads), (loss, grads) = one, two
    assert grads.keys() == one_grads.keys()
    used = abs(loss - one_loss) / (rtol * abs(one_loss))
    for name, grad in one_grads.items():
        used = max(used, ((grads[name] - grad).abs() / (atol + rtol * grad.abs())).max().item())
    return used


@pytest.mark.parametrize("name", list(METHODS))
def test_two_processes_give_the_one_process_loss_and_gradients(name, two_processes):
    loss, grads = loss_and_gradients(build(name), *views())
    assert all(grad.abs().max() > 0 for grad in grads.values())
    for rank in range(WORLD):  # only the order of float32 sums differs
        assert tolerances_used((loss.item(), grads), two_processes[(name, False, rank)]) <= 1, rank


@pytest.mark.parametrize("name", ["simclr", "vicreg", "barlow_twins"])
def test_a_loss_that_forgets_to_gather_fails_the_two_process_comparison(name, two_processes):
    # the same check as above, on losses computed over each process's share of the batch
    loss, grads = loss_and_gradients(build(name), *views())
    assert tolerances_used((loss.item(), grads), two_processes[(name, True, 0)]) > 100


# ---- the command line

def test_each_method_gets_its_own_defaults_and_another_methods_flag_is_refused(capsys):
    parser = train_ssl.get_args_parser()
    relic = parser.parse_args([])
    assert (relic.method, relic.alpha, relic.temperature, relic.sim_coeff, relic.proj_layers) == \
        ("relic", 1.0, None, None, 2)
    vicreg = parser.parse_args(["--method", "vicreg", "--std_coeff", "10"])
    assert (vicreg.sim_coeff, vicreg.std_coeff, vicreg.cov_coeff, vicreg.ema_momentum, vicreg.alpha) == \
        (25.0, 10.0, 1.0, None, None)
    assert (vicreg.proj_hidden_dim, vicreg.proj_out_dim, vicreg.proj_layers) == (2048, 2048, 3)
    for argv, message in [(["--method", "relic", "--temperature", "0.1"],
                           "--temperature is a flag of simclr; --method relic does not use it"),
                          (["--method", "simclr", "--gamma", "0.9"],
                           "--ema_momentum is a flag of relic and byol; --method simclr does not use it"),
                          (["--method", "barlow_twins", "--lambd", "0"], "--lambd must be positive, got 0.0"),
                          (["--method", "byol", "--proj_layers", "1"], "--proj_layers must be at least 2")]:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert message in capsys.readouterr().err


def test_the_readme_method_table_is_the_registrys():
    readme = (train_ssl.__file__.rsplit("/", 1)[0] + "/docs/train_ssl.md")  # the README's page on train_ssl.py
    with open(readme) as f:
        assert methods.markdown_table() in f.read()


def test_a_method_is_one_loss_and_one_registration():
    # a new method's name, flags and projector reach the parser and the model with nothing else edited
    def cosine_loss(a, b, scale=1.0):
        return scale * (1 - nn.functional.cosine_similarity(a, b, dim=-1)).mean()

    cosine = methods.Method("cosine", cosine_loss, "cosine distance", "none",
                            flags=(methods.Flag("scale", 2.0, "loss scale"),), projector={"out_dim": 8, "batchnorm": False})
    methods.register(cosine)
    try:
        args = train_ssl.get_args_parser().parse_args(["--method", "cosine"])
        assert (args.scale, args.proj_out_dim, args.ema_momentum, args.temperature) == (2.0, 8, None, None)
        model = build("cosine")
        assert model.target is None and model.predictor is None and model.hyperparameters == {"scale": 2.0}
        assert torch.isfinite(model(*views())[0])
        with pytest.raises(ValueError, match="--scale is already cosine's flag"):
            methods.register(dataclasses.replace(cosine, name="other"))
    finally:
        METHODS.pop("cosine", None)


# ---- a real run per method: one digits epoch that saves, evaluates and resumes exactly

DIGITS = ["--dataset", "digits", "--image_size", "8", "--num_workers", "0", "--batch_size", "16",
          "--max_train_samples", "48", "--max_eval_samples", "60", "--knn_every", "0", "--knn_bank_samples", "100",
          "--epochs", "1", "--checkpointing_steps", "2", "--report_to", "none", "--norm", "group",
          "--proj_hidden_dim", "64", "--proj_out_dim", "32", "--dims", "8,64,512"]


@pytest.mark.parametrize("name", list(METHODS))
def test_a_digits_epoch_saves_evaluates_and_resumes_exactly(name, tmp_path, capsys):
    run_main([*DIGITS, "--method", name, "--output_dir", tmp_path / "full"])  # 3 steps, a checkpoint at step 2
    knn = json.loads((tmp_path / "full" / "metrics.json").read_text())["knn_accuracy"]
    assert len(knn) == 3 and all(0 <= a <= 1 for a in knn)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["ssl"]["method"] == name and config["args"]["proj_layers"] == args_layers(name)
    backbone, heads, _ = load_model(tmp_path / "full")
    assert heads is None and backbone(torch.zeros(2, 3, 8, 8)).shape == (2, 512)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    run_main([*DIGITS, "--method", name, "--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert "resumed from" in capsys.readouterr().out
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    args = evaluate.get_args_parser().parse_args(
        ["--checkpoint", str(resumed), "--dims", "8", "512", "--no-pca", "--max_train_samples", "200",
         "--max_eval_samples", "60", "--num_workers", "0", "--feature_cache", "none", "--report_to", "none",
         "--no-retrieval_grid", "--output_dir", str(tmp_path / "eval")])
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        evaluate.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    per_dim = json.loads((tmp_path / "eval" / "results.json").read_text())["runs"][0]["per_dim"]
    assert [r["dim"] for r in per_dim] == [8, 512] and all(0 < r["probe"] <= 1 and 0 < r["knn"] <= 1 for r in per_dim)


def args_layers(name):
    return methods.projector_settings(METHODS[name])["layers"]


def test_the_chance_levels_are_the_batch_sizes():
    assert METHODS["relic"].loss_at_chance(256) == pytest.approx(math.log(256))
    assert METHODS["simclr"].loss_at_chance(256) == pytest.approx(math.log(511))
    assert METHODS["byol"].loss_at_chance is None
