"""The self-supervised methods train_ssl.py can train, one record each.

A method is a base loss (mrl/ssl/losses.py) and a `Method` record registered here: what its model needs (an EMA
target, a predictor, learnable scalars), how its loss is called (its own flags, symmetrized over the two view orders
or not), its projector's defaults, the loss level of a network that tells no image from another, what it logs
beyond the loss, and its paper. mrl/ssl/model.py builds the model and applies the loss from the record, and
train_ssl.py takes its flags, checks and help from here: neither names a method.

How the loss is called (SSLModel.prefix_loss), for the prefix z[:, :d] of the two views' embeddings:
  online    p = projector(prefix), then predictor(p) where the method has a predictor (BYOL's q)
  other     the EMA target's projection of the same prefix where the method has a target, else p itself
  loss      loss(online of view 1, other of view 2, **flags, **learnable scalars); with `symmetrized` the mean of
            that and the same with the views swapped
so a method with neither target nor predictor gets the two views' projections: loss(p1, p2).

On several processes a loss must mean what it means on one (tests/test_methods.py checks every registered method
on 2 processes against 1): a loss that compares images across the batch, or takes statistics over it, gathers the
other processes' embeddings with mrl.utils.distributed.gather (differentiable) -- the global batch, not this process's
share.

Adding a method: write its loss in mrl/ssl/losses.py and register a Method below; its tests are the parametrized ones
(tests/test_methods.py), and docs/train_ssl.md's method table is checked against `markdown_table()`.
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from mrl.ssl.losses import barlow_twins_loss, byol_loss, nt_xent_loss, relic_loss, vicreg_loss
from mrl.utils import script


@dataclass(frozen=True)
class Flag:
    """A method's own hyperparameter: `--<name>`, passed to its loss as the keyword `name`."""
    name: str
    default: float
    help: str
    type: type = float
    check: Callable[[float], bool] = lambda value: value > 0
    must: str = "must be positive"  # what `check` requires, for the error message


@dataclass(frozen=True)
class Method:
    name: str
    loss: Callable
    summary: str  # one line: what the loss does (--help, the method table of docs/train_ssl.md)
    paper: str
    ema_target: bool = False  # an EMA copy of the online encoder provides the other view's embedding
    predictor: bool = False  # an MLP on the online projection (BYOL's q), --proj_hidden_dim wide
    symmetrized: bool = True  # the mean of the loss over both view orders (else the loss is symmetric itself)
    learnable: dict = field(default_factory=dict)  # name -> initial value of learnable scalars, passed to the loss
    flags: tuple = ()
    projector: dict = field(default_factory=dict)  # defaults of --proj_hidden_dim/out_dim/layers/batchnorm
    loss_at_chance: Optional[Callable[[int], float]] = None  # of the global batch size; None: no such level
    logs: Optional[Callable[..., dict]] = None  # (**learnable, **flags) -> {W&B key: tensor}, at each train log


METHODS = {}
DEFAULT = "relic"
PROJECTOR = {"hidden_dim": 512, "out_dim": 64, "layers": 2, "batchnorm": True}  # mrl-pytorch's widths, SimCLR's BN
# The EMA target's schedule (mrl/ssl/ema.py), for methods with one: mrl-pytorch's (its --gamma, --update_gamma_*)
EMA_FLAGS = (Flag("ema_momentum", 0.995, "target EMA momentum gamma at the start, raised to 1 on a cosine schedule "
                  "(mrl-pytorch: --gamma 0.995, its run_training.py default)", check=lambda v: 0 <= v <= 1,
                  must="must be in [0, 1]"),
             Flag("ema_copy_until", 1, "the target is a copy of the online network up to this optimizer step",
                  type=int, check=lambda v: v >= 0, must="must be at least 0"),
             Flag("ema_every", 1, "move the target every N optimizer steps", type=int, check=lambda v: v >= 1,
                  must="must be at least 1"))


def register(method):
    """Add `method` to METHODS (checked: a flag name belongs to one method)."""
    taken = {flag.name: other.name for other in METHODS.values() for flag in other.flags}
    taken.update({flag.name: "the EMA target" for flag in EMA_FLAGS})
    for flag in method.flags:
        if flag.name in taken:
            raise ValueError(f"{method.name}: --{flag.name} is already {taken[flag.name]}'s flag")
    unknown = set(method.projector) - set(PROJECTOR)
    if unknown:
        raise ValueError(f"{method.name}: unknown projector settings {sorted(unknown)}")
    METHODS[method.name] = method
    return method


register(Method(
    "relic", relic_loss, "online vs EMA-target projections: instance discrimination with a learnable temperature "
    "+ a KL invariance term", "Mitrovic et al., ReLIC (ICLR 2021); mrl-pytorch's setup",
    ema_target=True, learnable={"log_temperature": 0.0},  # mrl-pytorch's t': the logit scale exp(t') starts at 1
    flags=(Flag("alpha", 1.0, "weight of the KL invariance term", check=lambda v: v >= 0, must="must be at least 0"),
           Flag("max_temperature", 5.0, "clamp of the learnable logit scale exp(t), which starts at 1 "
                "(mrl-pytorch: 5)")),
    projector={"batchnorm": False},  # mrl-pytorch's head has none
    loss_at_chance=math.log,  # each image's other view among the batch's B candidates
    logs=lambda log_temperature, max_temperature, **_: {
        "train/logit_scale": log_temperature.detach().exp().clamp(0, max_temperature)}))

register(Method(
    "simclr", nt_xent_loss, "NT-Xent between the two views' projections, no target network",
    "Chen et al., SimCLR (ICML 2020)", symmetrized=False,  # NT-Xent already counts both views as queries
    flags=(Flag("temperature", 0.5, "NT-Xent temperature (SimCLR's CIFAR-10 setting)"),),
    loss_at_chance=lambda batch_size: math.log(2 * batch_size - 1)))  # the other view among 2B - 1 candidates

register(Method(
    "byol", byol_loss, "the online predictor regresses the EMA target's projection (normalized MSE)",
    "Grill et al., BYOL (NeurIPS 2020)", ema_target=True, predictor=True))

register(Method(
    "vicreg", vicreg_loss, "invariance (MSE) + variance hinge + covariance penalty over the global batch, "
    "3-layer expander", "Bardes, Ponce and LeCun, VICReg (ICLR 2022)", symmetrized=False,
    flags=(Flag("sim_coeff", 25.0, "invariance weight lambda (the paper's 25)", check=lambda v: v >= 0,
                must="must be at least 0"),
           Flag("std_coeff", 25.0, "variance weight mu (the paper's 25)", check=lambda v: v >= 0,
                must="must be at least 0"),
           Flag("cov_coeff", 1.0, "covariance weight nu (the paper's 1)", check=lambda v: v >= 0,
                must="must be at least 0")),
    # The paper's expander is 3 layers of 8192 for ImageNet; 2048 is solo-learn's CIFAR setting
    projector={"hidden_dim": 2048, "out_dim": 2048, "layers": 3}))

register(Method(
    "barlow_twins", barlow_twins_loss, "the cross-correlation of the two views' standardized projections over the "
    "global batch driven to the identity, 3-layer projector", "Zbontar et al., Barlow Twins (ICML 2021)",
    symmetrized=False,
    flags=(Flag("lambd", 0.0051, "weight of the off-diagonal (redundancy) term (the authors' code: 0.0051; the "
                "paper: 5e-3)"),),
    # The paper's projector is 3 layers of 8192 for ImageNet; 2048 is solo-learn's CIFAR setting
    projector={"hidden_dim": 2048, "out_dim": 2048, "layers": 3}))


# ---- the command line: every method's flags, each with its own default, refused with another --method

def add_method_args(group):
    """--method, the projector's shape and every method's own flags (argparse default None: `resolve` fills in the
    chosen method's defaults, so that a flag given for another method can be told from an absent one)."""
    group.add_argument("--method", default=DEFAULT, choices=list(METHODS),
                       help="the self-supervised loss: " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    group.add_argument("--proj_hidden_dim", type=int, default=None,
                       help="projector (and BYOL predictor) hidden width (default: the method's, " + _defaults("hidden_dim") + ")")
    group.add_argument("--proj_out_dim", type=int, default=None,
                       help="projector output width (default: the method's, " + _defaults("out_dim") + ")")
    group.add_argument("--proj_layers", type=int, default=None,
                       help="projector linear layers, the prefixes nested at the first (default: the method's, "
                            + _defaults("layers") + ")")
    group.add_argument("--proj_batchnorm", default="auto", choices=("auto", "on", "off"),
                       help="BatchNorm in the projector's hidden layers; auto = the method's (" + _defaults("batchnorm") + ")")
    for method in METHODS.values():
        for flag in method.flags:
            group.add_argument(f"--{flag.name}", type=flag.type, default=None,
                               help=f"{method.name}: {flag.help} (default: {flag.default})")
    with_target = ", ".join(m.name for m in METHODS.values() if m.ema_target)
    for flag in EMA_FLAGS:
        group.add_argument(f"--{flag.name}", type=flag.type, default=None,
                           help=f"{with_target}: {flag.help} (default: {flag.default})")


def _defaults(setting):
    value = lambda v: {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # noqa: E731
    return ", ".join(f"{m.name} {value(projector_settings(m)[setting])}" for m in METHODS.values())


def projector_settings(method):
    return {**PROJECTOR, **method.projector}


def own_flags(method):
    """The flags `method` uses: its own and, with a target, the EMA schedule's."""
    return method.flags + (EMA_FLAGS if method.ema_target else ())


class ArgumentParser(script.ArgumentParser):
    """The scripts' parser that, after parsing, gives the chosen --method's flags their defaults and refuses another
    method's flags (an argparse error: one line)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if hasattr(parsed, "method"):
            try:
                resolve(parsed)
            except ValueError as e:
                self.error(str(e))
        return parsed, extras


def resolve(args):
    """Fill in `args.method`'s defaults (its flags, the projector's shape) and check its flags; a flag of another
    method, or a value out of range, raises ValueError."""
    method = METHODS[args.method]
    used = {flag.name for flag in own_flags(method)}
    for other in METHODS.values():
        for flag in own_flags(other):
            if flag.name not in used and getattr(args, flag.name, None) is not None:
                users = [m.name for m in METHODS.values() if flag in own_flags(m)]
                raise ValueError(f"--{flag.name} is a flag of {' and '.join(users)}; --method {method.name} does not "
                                 "use it")
    for flag in own_flags(method):
        value = getattr(args, flag.name)
        if value is None:
            setattr(args, flag.name, flag.default)
        elif not flag.check(value):
            raise ValueError(f"--{flag.name} {flag.must}, got {value}")
    settings = projector_settings(method)
    for setting in ("hidden_dim", "out_dim", "layers"):
        name = f"proj_{setting}"
        if getattr(args, name) is None:
            setattr(args, name, settings[setting])
        elif getattr(args, name) < (2 if setting == "layers" else 1):
            raise ValueError(f"--{name} must be at least {2 if setting == 'layers' else 1}")


def hyperparameters(method, args):
    """The values of `method`'s own flags in `args`, as its loss takes them."""
    return {flag.name: getattr(args, flag.name) for flag in method.flags}


def projector_batchnorm(method, choice="auto"):
    return projector_settings(method)["batchnorm"] if choice == "auto" else choice == "on"


def markdown_table():
    """docs/train_ssl.md's method table, from the records."""
    rows = ["| `--method` | loss | EMA target | predictor | projector (default) | paper |",
            "|---|---|---|---|---|---|"]
    for m in METHODS.values():
        p = projector_settings(m)
        shape = " -> ".join([str(p["hidden_dim"])] * (p["layers"] - 1) + [str(p["out_dim"])])
        rows.append(f"| `{m.name}` | {m.summary} | {'yes' if m.ema_target else 'no'} | "
                    f"{'yes' if m.predictor else 'no'} | {shape}{', BN' if p['batchnorm'] else ''} | {m.paper} |")
    return "\n".join(rows)
