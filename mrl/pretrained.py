"""A trained run as a model to use: load it from a run folder or the Hugging Face Hub, embed images at any prefix
size, classify with a supervised run's heads, save it and share it on the Hub.

    from mrl.pretrained import MatryoshkaEncoder

    model = MatryoshkaEncoder.from_pretrained("runs/supervised_mrl_digits_resnet18")   # or "user/repo" on the Hub
    embeddings = model.encode(images, dim=64)   # (n, 64): the first 64 dims, each row L2-renormalized

A run folder already is a model in the Hub's layout: `model.safetensors` (keys `backbone.*`, and `heads.*` or
`projector.*`) and `config.json` (architecture and preprocessing, mrl/run_folder/final_model.py). huggingface_hub's
PyTorchModelHubMixin gives the class `from_pretrained`, `save_pretrained` and `push_to_hub` over that layout, and
downloads and caches Hub repos; this module supplies how the model is rebuilt from its config, which files travel
with it (the model card, metrics and plots), and errors that say in one line what went wrong (an unreachable Hub,
a folder that is not a run). Files written by save_pretrained are read by evaluate.py like any run folder.

Putting a training run on the Hub at its end (the card, the upload, checkpoint uploads) is mrl/train/publish.py.
"""

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from huggingface_hub import PyTorchModelHubMixin, constants, snapshot_download
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import datasets
from mrl import UserError
from mrl.batches.decode import open_image
from mrl.batches.transforms import eval_transform
from mrl.hub.model_card import CARD_FILE, LIBRARY, PAPER, PLOTS, TAGS, build_card
from mrl.matryoshka import check_range, default_dims
from mrl.run_folder.config import read_config, write_config
from mrl.run_folder.final_model import build_model, without_wrapper_prefixes
from mrl.run_folder.layout import CONFIG_FILE, MODEL_FILE
from mrl.utils import hub_access

# What travels with a model to the Hub and back, besides the weights and config: its card, the training metrics and
# plots, and evaluate.py's results when they were written inside the run folder (its default). Never checkpoints/
# or features/ (large, and for this machine only).
CARRIED = ("README.md", "metrics.json", "*.png", "eval/results.json", "eval/results.md", "eval/*.png")
HUB_FILES = [MODEL_FILE, CONFIG_FILE, *CARRIED]
IMAGE_EXTENSIONS = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


class MatryoshkaEncoder(nn.Module, PyTorchModelHubMixin, library_name=LIBRARY, tags=TAGS[:3],
                        pipeline_tag="image-feature-extraction", paper_url=PAPER):
    """A trained backbone (and a supervised run's Matryoshka heads) with its own preprocessing.

    `encode(images, dim)` embeds and cuts to the first `dim` dims; `classify(images, dim)` uses the head trained on
    that prefix; `forward(pixel_values)` is the full embedding of already preprocessed pixels (`self.preprocess`
    is the run's evaluation transform: PIL image -> normalized tensor).
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.backbone, self.heads = build_model(config)
        self.preprocess = eval_transform(config)
        self.extra = {}  # weights encoding does not use (an SSL run's projector.*): saved back unchanged
        self.card = None  # the run's README.md, saved back as it is (None: save_pretrained writes a fresh one)
        self.source = None  # the folder the model was loaded from, whose CARRIED files save_pretrained copies
        self.eval()

    # ---- loading and saving (huggingface_hub's mixin calls these)

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """Load a run folder, or a model repo from the Hub (downloaded once into the Hugging Face cache).
        `device`: where the model runs (default: the best available, CUDA > MPS > CPU); other keyword arguments
        are huggingface_hub's (revision, token, cache_dir, force_download, local_files_only)."""
        name = str(name_or_path)
        if not os.path.isdir(name) and not kwargs.get("local_files_only") and not constants.HF_HUB_OFFLINE:
            problem = hub_access.hub_unreachable()
            if problem:  # a cached copy still works; downloading would retry for half a minute before failing
                kwargs["local_files_only"] = True
        else:
            problem = None
        try:
            return super().from_pretrained(name, **kwargs)
        except UserError:
            raise
        except Exception as e:  # huggingface_hub and the network raise many types
            where = f"{name} is not a local folder, and "
            why = (f"{problem}, and the model is not in the local Hugging Face cache" if problem
                   else f"the Hub could not provide it ({hub_access.one_line(e)})")
            raise UserError(where + why) from None

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token, device=None,
                         **unused):
        folder = model_id
        if not os.path.isdir(folder):
            folder = snapshot_download(model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                                       token=token, local_files_only=local_files_only, allow_patterns=HUB_FILES)
        config = read_config(folder)  # the format check, with a one-line error
        weights = os.path.join(folder, MODEL_FILE)
        if not os.path.isfile(weights):
            raise UserError(f"{model_id} has {CONFIG_FILE} but no {MODEL_FILE}: the run did not finish saving")
        model = cls(config)
        state = without_wrapper_prefixes(load_file(weights))
        own = model.state_dict().keys()
        missing = sorted(set(own) - state.keys())
        if missing:
            raise UserError(f"{weights} does not match its {CONFIG_FILE}: {len(missing)} weights are missing "
                            f"({', '.join(missing[:3])}...)")
        model.load_state_dict({k: state[k] for k in own})
        model.extra = {k: v for k, v in state.items() if k not in own}
        model.source = folder
        card = os.path.join(folder, CARD_FILE)
        if os.path.isfile(card):
            model.card = Path(card).read_text()
        return model.to(device or best_device())

    def _save_pretrained(self, save_directory):
        """model.safetensors (the keys and tensors of the run's file, bit for bit), config.json, the model card and
        the files the run carried (metrics, plots, evaluation results)."""
        save_directory = Path(save_directory)
        state = {k: v.detach().cpu().contiguous() for k, v in {**self.state_dict(), **self.extra}.items()}
        save_file(state, save_directory / MODEL_FILE, metadata={"format": "pt"})
        write_config(save_directory, self.config)  # as save_model writes it
        for relative in carried_files(self.source) if self.source is not None else []:
            source, target = Path(self.source) / relative, save_directory / relative
            if relative != CARD_FILE and not (target.exists() and os.path.samefile(source, target)):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        (save_directory / CARD_FILE).write_text(self.card or str(self.generate_model_card(save_directory)))

    def generate_model_card(self, save_directory=None, **unused):
        """A fresh card from the config (and the metrics and plot in `save_directory`, when there)."""
        folder = Path(save_directory) if save_directory is not None else None
        found = lambda name: folder is not None and (folder / name).is_file()  # noqa: E731
        metrics = json.loads((folder / "metrics.json").read_text()) if found("metrics.json") else None
        plot = PLOTS.get(self.config.get("kind"), PLOTS["supervised"])
        return build_card(self.config, metrics, None, folder.name if folder else None, has_plot=found(plot))

    def push_to_hub(self, repo_id, **kwargs):
        """Upload what save_pretrained writes to the model repo `repo_id` (created when missing); returns the commit
        URL. Fails in seconds, in one line (UserError), when the Hub cannot be reached or refuses the upload."""
        problem = hub_access.hub_unreachable()
        if problem:
            raise UserError(f"cannot push to {repo_id}: {problem}")
        try:
            return super().push_to_hub(repo_id, **kwargs)
        except Exception as e:
            raise UserError(f"cannot push to {repo_id}: {hub_access.one_line(e)}") from None

    # ---- using the model

    @property
    def device(self):
        return next(self.parameters()).device

    @property
    def embed_dim(self):
        return self.config["model"]["embed_dim"]

    @property
    def dims(self):
        """The prefix dims the model was trained on (any dim in 1..embed_dim can be encoded)."""
        if self.heads is not None:
            return list(self.heads.dims)
        ssl = self.config.get("ssl") or {}
        nested = ssl.get("nest", "backbone") == "backbone" and ssl.get("dims")  # else the dims are the projector's
        return list(ssl["dims"]) if nested else default_dims(self.embed_dim)

    @property
    def class_names(self):
        """A supervised run's class names (what `classify` indices mean); None for self-supervised runs."""
        return (self.config.get("heads") or {}).get("class_names")

    def forward(self, pixel_values):
        """The full embedding of a batch of preprocessed pixels."""
        return self.backbone(pixel_values)

    @torch.no_grad()
    def encode(self, images, dim=None, normalize=True, batch_size=256, num_workers=0, progress=False):
        """Embeddings of `images` cut to their first `dim` dims, as a float32 CPU tensor (n, dim), each row
        L2-renormalized after the cut unless `normalize=False`.

        `images`: one or a list of PIL images or image paths, an image folder (every image under it, sorted by
        path; see `list_images`), a `datasets.Dataset` with an image column, or a tensor of pixels (n, C, H, W)
        or (C, H, W), float in [0, 1] or uint8 (resized and normalized like the run's images, with tensor ops).
        `dim`: an int in 1..embed_dim (default: all of it) or a list of them, which returns {dim: tensor} from one
        forward pass.
        """
        dims = self._check_dims(dim)
        full = self._embed(images, batch_size, num_workers, progress)
        out = {d: F.normalize(full[:, :d], dim=1) if normalize else full[:, :d].clone() for d in dims}
        return out if isinstance(dim, (list, tuple)) else out[dims[0]]

    @torch.no_grad()
    def classify(self, images, dim=None, return_probs=False, batch_size=256, num_workers=0, progress=False):
        """Class indices (n,) predicted by the head trained on the first `dim` dims (default: the largest head), or
        their softmax probabilities (n, classes) with `return_probs`; `model.class_names` names them. `dim` may be
        a list of head dims ({dim: result}). Supervised runs only."""
        if self.heads is None:
            raise UserError("this model has no classification heads (a self-supervised run): use encode() and a "
                            "probe, or evaluate.py")
        dims = [self.heads.dims[-1]] if dim is None else list(dim) if isinstance(dim, (list, tuple)) else [dim]
        unknown = [d for d in dims if d not in self.heads.dims]
        if unknown:
            raise UserError(f"no head at dim {unknown[0]}: this model's heads are at dims {self.heads.dims}")
        full = self._embed(images, batch_size, num_workers, progress)
        logits = self.heads(full.to(self.device)).float().cpu()  # (heads, n, classes)
        out = {}
        for d in dims:
            z = logits[self.heads.dims.index(d)]
            out[d] = z.softmax(-1) if return_probs else z.argmax(-1)
        return out if isinstance(dim, (list, tuple)) else out[dims[0]]

    def _check_dims(self, dim):
        dims = [self.embed_dim] if dim is None else list(dim) if isinstance(dim, (list, tuple)) else [dim]
        return check_range(dims, self.embed_dim, name="dim", whose="this model's embedding dim")

    def _embed(self, images, batch_size, num_workers, progress):
        """Full embeddings (n, embed_dim), float32 on the CPU, in the order of `images`."""
        self.eval()
        if torch.is_tensor(images):
            images = images[None] if images.dim() == 3 else images
            batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
            prepare = self._tensor_pixels
        else:
            dataset = ImageList(images, self.preprocess)
            batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                                  collate_fn=dataset.collate, pin_memory=self.device.type == "cuda")
            prepare = None
        out = [self((prepare(x) if prepare else x).to(self.device, non_blocking=True)).float().cpu()
               for x in tqdm(batches, desc="embedding", disable=not progress, dynamic_ncols=True)]
        if not out:
            raise UserError("no images to embed")
        return torch.cat(out)

    def _tensor_pixels(self, x):
        """Pixels given as a tensor, preprocessed like PIL images (the same resize and normalization)."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"an image tensor must be (n, C, H, W) or (C, H, W) with C 1 or 3, got {tuple(x.shape)}")
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        steps = [step for step in self.preprocess.transforms if not isinstance(step, T.ToTensor)]
        return T.Compose(steps)(x)


class ImageList(torch.utils.data.Dataset):
    """The images `encode` accepts, as a map-style dataset of preprocessed tensors (read lazily, so DataLoader
    workers decode in parallel). `names[i]` says where item i came from (a path, or its position)."""

    def __init__(self, images, transform):
        self.transform = transform
        self.column = None
        if isinstance(images, datasets.Dataset):
            self.column = next((c for c, f in images.features.items() if isinstance(f, datasets.Image)),
                               next((c for c in ("image", "img") if c in images.column_names), None))
            if self.column is None:
                raise UserError(f"the dataset has no image column (columns: {', '.join(images.column_names)})")
            # undecoded cells, opened by mrl.batches.transforms.open_image like every other image here (EXIF rotation, RGB)
            self.items = (images.with_format(None).select_columns([self.column])
                          .cast_column(self.column, datasets.Image(decode=False)))
            self.names = list(range(len(images)))
        elif isinstance(images, (str, Path)) and os.path.isdir(images):
            self.items = self.names = list_images(images)
        elif isinstance(images, (str, Path, Image.Image)):
            self.items = [images]
            self.names = [str(images) if not isinstance(images, Image.Image) else 0]
        else:
            self.items = list(images)
            self.names = [str(x) if isinstance(x, (str, Path)) else i for i, x in enumerate(self.items)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        if self.column is not None:
            image = open_image(item[self.column])
        elif isinstance(item, Image.Image):
            image = ImageOps.exif_transpose(item).convert("RGB")
        elif isinstance(item, (str, Path)):
            image = open_image({"path": str(item)})
        else:
            raise UserError(f"cannot embed item {i} of type {type(item).__name__}: give PIL images, image paths, an "
                            "image folder, a datasets.Dataset or a tensor")
        if image is None:
            raise UserError(f"cannot read image {self.names[i]}")
        return self.transform(image)

    @staticmethod
    def collate(batch):
        return torch.stack(batch)


def list_images(folder):
    """Every image file under `folder` (by extension, recursively), sorted by path."""
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
    if not found:
        raise UserError(f"no image files under {folder}")
    return found


def best_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def carried_files(folder):
    """The CARRIED files present in a run folder, relative to it."""
    found = []
    for pattern in CARRIED:
        sub, name = os.path.split(pattern)
        base = os.path.join(folder, sub)
        if os.path.isdir(base):
            found += [os.path.join(sub, f) for f in sorted(os.listdir(base))
                      if Path(f).match(name) and os.path.isfile(os.path.join(base, f))]
    return found
