"""The model a self-supervised run trains: the online encoder, what its method adds (an EMA target, a predictor,
learnable scalars; see mrl/ssl/methods.py), and the Matryoshka loss over nested prefixes.

The submodule names are the checkpoint's key layout, which mrl/run_folder/config.py owns and runs already on disk use:
`online.backbone.*`, `online.projector.*`, `predictor.*`, `target.module.*`, `target.num_updates` and each learnable
scalar by its name (ReLIC's `log_temperature`).
"""

import torch
import torch.nn as nn

from mrl.matryoshka import MatryoshkaLoss
from mrl.ssl.ema import EMA
from mrl.ssl.methods import METHODS, hyperparameters, projector_batchnorm
from mrl.ssl.projectors import Projector, predictor


class Encoder(nn.Module):
    """Backbone + the projector's trunk (the part before the nesting point): image -> what the prefixes are cut of."""

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector

    def forward(self, x):
        return self.projector.trunk(self.backbone(x))


class SSLModel(nn.Module):
    """forward(view1, view2) -> (weighted Matryoshka loss, per-dim losses).

    The two views go through the backbone as one batch (one forward per network); the Matryoshka wrapper slices the
    embeddings at every d and calls prefix_loss, which projects each prefix and applies the method's loss as its
    record says (mrl/ssl/methods.py). The EMA target is a frozen submodule (no gradients, not in the optimizer, not
    reduced by DDP), so accelerator.save_state saves its weights and update counter with the model's and a resume
    restores them exactly. `method`: a registered name or a Method record; `hyperparameters`: the method's flags
    (its defaults where not given).
    """

    def __init__(self, method, backbone, projector, dims, weights, ema_momentum=(), ema_copy_until=1, ema_every=1,
                 predictor_hidden=512, **hyperparameters):
        super().__init__()
        self.method = METHODS[method] if isinstance(method, str) else method
        defaults = {flag.name: flag.default for flag in self.method.flags}
        unknown = set(hyperparameters) - set(defaults)
        if unknown:
            raise TypeError(f"{self.method.name} has no hyperparameters {sorted(unknown)}")
        self.hyperparameters = {**defaults, **hyperparameters}
        self.online = Encoder(backbone, projector)
        width = projector.fc2.out_features
        self.predictor = predictor(width, predictor_hidden) if self.method.predictor else None
        for name, value in self.method.learnable.items():
            self.register_parameter(name, nn.Parameter(torch.tensor(float(value))))
        self.target = EMA(self.online, ema_momentum, ema_copy_until, ema_every) if self.method.ema_target else None
        self.loss = MatryoshkaLoss(self.prefix_loss, dims, weights)

    def learnable(self):
        return {name: getattr(self, name) for name in self.method.learnable}

    def forward(self, view1, view2):
        views = torch.cat([view1, view2])
        embeddings = [self.online(views)]
        if self.target is not None:
            with torch.no_grad():
                embeddings.append(self.target(views))
        return self.loss(*embeddings)

    def prefix_loss(self, online, target=None):
        """The method's loss on prefixes of width d: the online (and target) embeddings of view 1 stacked over
        view 2. See mrl/ssl/methods.py for what each argument of the loss is."""
        projected = self.online.projector(online)
        queries = (self.predictor(projected) if self.predictor is not None else projected).chunk(2)
        if self.target is not None:
            with torch.no_grad():
                others = self.target.module.projector(target).chunk(2)
        else:
            others = projected.chunk(2)
        loss = lambda a, b: self.method.loss(a, b, **self.hyperparameters, **self.learnable())  # noqa: E731
        if self.method.symmetrized:
            return (loss(queries[0], others[1]) + loss(queries[1], others[0])) / 2
        return loss(queries[0], others[1])

    def update_target(self, step):
        """After optimizer step `step` (once per step, not per micro-batch); returns the gamma used (None: no target)."""
        return self.target.update(self.online, step) if self.target is not None else None

    def after_optimizer_step(self, step):
        """The EMA target's move after optimizer step `step`, and what to log about it."""
        gamma = self.update_target(step)
        return {"train/ema_gamma": gamma} if gamma is not None else {}

    def logs(self):
        """The method's own values for the train log (device tensors, read when logged)."""
        return self.method.logs(**self.learnable(), **self.hyperparameters) if self.method.logs else {}


class Exported(nn.Module):
    """What model.safetensors holds: `backbone.*` (what evaluate.py loads) and `projector.*`."""

    def __init__(self, backbone, projector):
        super().__init__()
        self.backbone, self.projector = backbone, projector


def build_projector(args, backbone):
    """The projector --method and the --proj_* flags describe, nested at --nest."""
    method = METHODS[args.method]
    return Projector(backbone.embed_dim, args.proj_hidden_dim, args.proj_out_dim, args.nest,
                     projector_batchnorm(method, args.proj_batchnorm), layers=args.proj_layers)


def build_model(args, backbone, projector, dims, weights, ema_schedule, sync_bn=False):
    """The SSLModel the flags describe (--method and its flags), in --memory_format. With `sync_bn` every BatchNorm
    in it -- the backbone's, the projector's, BYOL's predictor's and those of the EMA target's copy -- normalizes
    over the global batch (SyncBatchNorm, which runs on GPUs only)."""
    method = METHODS[args.method]
    model = SSLModel(method, backbone, projector, dims, weights, ema_schedule, args.ema_copy_until, args.ema_every,
                     args.proj_hidden_dim, **hyperparameters(method, args))
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model


def exported_encoder(model, choice="auto"):
    """The backbone a run saves and monitors (--export_encoder): the EMA target's where there is one (as mrl-pytorch
    saves and evaluates it) unless `choice` is "online"; with the online projector. Returns (module, "target" or
    "online")."""
    use_target = model.target is not None and choice != "online"
    backbone = model.target.module.backbone if use_target else model.online.backbone
    return Exported(backbone, model.online.projector), "target" if use_target else "online"
