"""The model card of a trained run: the README.md that the Hugging Face Hub shows on a model's page.

Its YAML header is the Hub's metadata (library, pipeline tag, tags such as `matryoshka`, the training dataset, and a
`model-index` with accuracy per prefix dim, which the Hub turns into an evaluation widget); its text says what the
model is, how to use it at a chosen dim, the per-dim accuracy table and plot the training script measured, the
exact training command, and, once `evaluate.py --update_model_card` has run, the offline evaluation. The card is
written from the run folder's config.json and metrics.json, so it can be regenerated for any finished run.
"""

import json
import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mrl.data.presets import PRESETS
from mrl.run_folder.layout import ACCURACY_PLOT, CARD_FILE, CONFIG_FILE, KNN_PLOT, METRICS_FILE

LIBRARY = "mrl"
PAPER = "https://arxiv.org/abs/2205.13147"
# The class-level tags PyTorchModelHubMixin adds to every card it writes, so a card written here looks alike.
TAGS = ["matryoshka", "mrl", "image-feature-extraction", "pytorch_model_hub_mixin", "model_hub_mixin"]
PLOTS = {"supervised": ACCURACY_PLOT, "ssl": KNN_PLOT}
# evaluate.py --update_model_card replaces what lies between these lines; everything else in the card stays
EVAL_BEGIN, EVAL_END = "<!-- evaluate.py results: begin -->", "<!-- evaluate.py results: end -->"
EVAL_METRICS = ("linear probe", "kNN")  # the model-index entries evaluate.py owns (metric names start with these)


def build_card(config, metrics=None, command=None, model_id=None, has_plot=False):
    """A ModelCard for a run with this config.json and metrics.json (either may lack keys: older or newer runs).

    `command`: the exact training command line (None when unknown); `model_id`: the name to load it by in the
    usage snippet (a Hub id, or a folder); `has_plot`: whether the run's accuracy-vs-dim PNG travels with the card.
    """
    kind = config.get("kind", "supervised")
    data, model = config.get("data") or {}, config.get("model") or {}
    dataset, backbone = data.get("dataset", "unknown"), model.get("backbone", "unknown")
    embed_dim = model.get("embed_dim")
    name = model_id or "a trained run"
    rows, table, protocol = _training_table(config, metrics or {})
    card_data = ModelCardData(
        library_name=LIBRARY, pipeline_tag="image-feature-extraction", metrics=["accuracy"],
        tags=TAGS + [t for t in (backbone, "supervised" if kind == "supervised" else "self-supervised",
                                 (config.get("ssl") or {}).get("method"), dataset) if t],
        datasets=[_hub_dataset(dataset)] if _hub_dataset(dataset) else None,
        model_name=name, eval_results=_results(config, rows, "head top-1") or None)

    heads = config.get("heads") or {}
    if kind == "supervised":
        trained = (f"one linear classifier per prefix dim ({_dims(heads.get('dims'))})"
                   + (", all sharing one weight matrix (MRL-E)" if heads.get("tied") else "")
                   + ", trained on the sum of their cross-entropies"
                   if not heads.get("baseline") else "a single classifier on the full embedding (the non-MRL baseline)")
    else:
        ssl = config.get("ssl") or {}
        trained = (f"self-supervised {ssl.get('method', '')} with the Matryoshka loss over the prefix dims "
                   f"{_dims(ssl.get('dims'))} of the {ssl.get('nest', 'backbone')} output")
    size = data.get("image_size")
    lines = [
        f"# {name}", "",
        f"A {backbone} image encoder ({embed_dim}-dim embedding) trained with [Matryoshka Representation "
        f"Learning]({PAPER}) on {dataset} at {size}x{size} px: {trained}. Every prefix `z[:d]` of the embedding is "
        "an embedding on its own, so an application can cut it to the size it can afford: search with a few dims, "
        "re-rank with all of them.", "",
        "## Use", "",
        "With this repository's `mrl` package on the Python path:", "",
        "```python",
        "from mrl.pretrained import MatryoshkaEncoder",
        "",
        f'model = MatryoshkaEncoder.from_pretrained("{name}")',
        "embeddings = model.encode(images, dim=64)  # the first 64 dims, L2-renormalized",
    ]
    if kind == "supervised" and heads.get("dims"):
        lines.append(f"labels = model.classify(images, dim={heads['dims'][0]})  # that dim's head")
    lines += [
        "```", "",
        "`images` may be PIL images, a tensor of pixels in [0, 1], an image folder or a `datasets.Dataset`; the "
        f"model applies its own preprocessing (resize to {size}x{size}, normalization with mean {data.get('mean')} "
        f"and std {data.get('std')}). `dim` may be a list, for several prefixes from one forward pass. "
        "`embed.py` embeds a whole folder and builds a search index over a small prefix with full-dim re-ranking.",
        ""]
    if heads.get("class_names"):
        names = [str(c) for c in heads["class_names"]]
        lines += [f"Classes ({len(names)}): " + ", ".join(names[:20]) + (", ..." if len(names) > 20 else ""), ""]
    lines += ["## Accuracy per dim", "", protocol, ""]
    lines += table + [""]
    if has_plot:
        lines += [f"![accuracy against embedding dim]({PLOTS.get(kind, PLOTS['supervised'])})", ""]
    lines += ["## Evaluation", "", EVAL_BEGIN,
              "Not evaluated offline yet: `python evaluate.py --checkpoint <this folder> --update_model_card` adds "
              "linear-probe, kNN and retrieval accuracy per dim here.", EVAL_END, "",
              "## Training", ""]
    lines += (["```bash", command, "```", ""] if command else
              ["The training command was not recorded; `config.json` holds the run's settings.", ""])
    epochs = len((metrics or {}).get("history") or [])
    if metrics and metrics.get("steps"):
        lines += [f"{epochs} epoch(s), {metrics['steps']} optimizer steps."]
    lines += ["`config.json` holds the architecture and preprocessing the model is rebuilt from"
              + (", and every training flag." if config.get("args") else "."), ""]
    return ModelCard("---\n" + card_data.to_yaml() + "\n---\n\n" + "\n".join(lines))


def write_card(run_dir, command=None, model_id=None):
    """Write `<run_dir>/README.md` from the run's config.json and metrics.json; returns its path."""
    config, metrics = _read_json(run_dir, CONFIG_FILE), _read_json(run_dir, METRICS_FILE)
    plot = PLOTS.get(config.get("kind"), PLOTS["supervised"])
    card = build_card(config, metrics, command, model_id or os.path.basename(os.path.normpath(run_dir)),
                      has_plot=os.path.isfile(os.path.join(run_dir, plot)))
    path = os.path.join(run_dir, CARD_FILE)
    card.save(path)
    return path


def update_card_with_evaluation(run_dir, markdown, per_dim, eval_split, plots_dir=None):
    """Put evaluate.py's results for this run into its card (written first if the run has none): `markdown` (its
    results.md for this run) between the evaluation markers, its plots when they live inside the run folder (so
    they travel with it to the Hub), and the per-dim probe and kNN accuracy in the metadata's model-index."""
    path = os.path.join(run_dir, CARD_FILE)
    if not os.path.isfile(path):
        write_card(run_dir)
    card = ModelCard.load(path)
    config = _read_json(run_dir, CONFIG_FILE)
    # its headings go below the card's "## Evaluation"
    body = [line if not line.startswith("#") else "##" + line for line in markdown.strip().splitlines()]
    if plots_dir is not None:
        relative = os.path.relpath(os.path.join(plots_dir, ACCURACY_PLOT), run_dir)
        if not relative.startswith("..") and os.path.isfile(os.path.join(run_dir, relative)):
            body += ["", f"![evaluation: accuracy against dim]({relative.replace(os.sep, '/')})"]
    section = "\n".join([EVAL_BEGIN, *body, EVAL_END])
    text = card.text
    if EVAL_BEGIN in text and EVAL_END in text:
        start, end = text.index(EVAL_BEGIN), text.index(EVAL_END) + len(EVAL_END)
        text = text[:start] + section + text[end:]
    else:  # a card edited by hand: append the section
        text = text.rstrip() + "\n\n## Evaluation\n\n" + section + "\n"
    card.text = text
    results = [r for r in card.data.eval_results or [] if not (r.metric_name or "").startswith(EVAL_METRICS)]
    for key, metric in (("probe", "linear probe top-1"), ("knn", "kNN top-1")):
        results += _results(config, [(r["dim"], r[key]) for r in per_dim if r.get(key) is not None], metric, eval_split)
    card.data.eval_results = results or None
    if card.data.eval_results and not card.data.model_name:
        card.data.model_name = os.path.basename(os.path.normpath(run_dir))
    card.save(path)
    return path


def _training_table(config, metrics):
    """(rows [(dim, accuracy)] for the metadata, markdown table lines, the sentence saying what was measured)."""
    dims = metrics.get("dims") or []
    if config.get("kind", "supervised") == "supervised":
        val = (metrics.get("val") or {}).get("accuracy") or []
        test = (metrics.get("test") or {}).get("accuracy") or []
        if not dims or not val:
            return [], [], "No per-dim accuracy was recorded for this run."
        lines = ["| dim | val top-1 | test top-1 |", "|---:|---:|---:|"]
        lines += [f"| {d} | {v:.4f} | " + (f"{test[i]:.4f}" if i < len(test) else "") + " |"
                  for i, (d, v) in enumerate(zip(dims, val))]
        rows = list(zip(dims, test)) if test else []
        return rows, lines, ("Each Matryoshka head's own top-1 accuracy on the prefix `z[:d]` (no probe), measured "
                             "by the training script on its validation and test splits:")
    knn = metrics.get("knn_accuracy") or []
    if not dims or not knn:
        return [], [], "No per-dim accuracy was recorded for this run."
    lines = ["| dim | online kNN top-1 |", "|---:|---:|"] + [f"| {d} | {a:.4f} |" for d, a in zip(dims, knn)]
    return [], lines, ("Online weighted kNN top-1 on the L2-renormalized prefix `z[:d]` (validation images against "
                       "a labeled train bank), measured at the end of training; not a linear probe:")


def _results(config, rows, metric, split="test"):
    """model-index entries: one accuracy per (dim, value)."""
    dataset = (config.get("data") or {}).get("dataset", "unknown")
    return [EvalResult(task_type="image-classification", dataset_type=_hub_dataset(dataset) or dataset,
                       dataset_name=dataset, dataset_split=split, metric_type="accuracy",
                       metric_value=round(float(value), 4), metric_name=f"{metric}, d={d}")
            for d, value in rows]


def _hub_dataset(name):
    preset = PRESETS.get(name)
    return preset.hub_id if preset is not None else None


def _dims(dims):
    return ", ".join(map(str, dims)) if dims else "?"


def _read_json(folder, name):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
