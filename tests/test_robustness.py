"""The robustness evaluation (mrl/eval/robustness.py, evaluate.py --robustness): ImageNet-1k heads on shifted test sets
read from class folders, with ImageNet-A's 200-class restriction, on a run trained here."""

import json

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image
from sklearn.datasets import load_digits

import datasets
import evaluate
from mrl import UserError
from mrl.batches.transforms import build_transform
from mrl.eval.robustness import class_subset, heads_top1, load_shifted, parse_paths, read_synsets, restricted_top1
from mrl.matryoshka import MatryoshkaHeads
from mrl.run_folder.final_model import load_model

pytestmark = pytest.mark.xdist_group("test_robustness")

SYNSETS = read_synsets()
A_CLASSES = class_subset("imagenet_a").tolist()
OUTSIDE_A = [i for i in range(1000) if i not in set(A_CLASSES)]
# digits 0-4 are five ImageNet-A classes, 5-9 five classes outside it
DIGIT_CLASS = A_CLASSES[:5] + OUTSIDE_A[:5]


def test_restriction_to_the_covered_classes_changes_the_argmax():
    """Three images of ImageNet-A classes. The first one's largest logit is a class outside the 200 (so wrong over
    1,000 classes), its largest among the 200 is its label; the second is wrong either way; the third right."""
    a, b = A_CLASSES[0], A_CLASSES[1]
    outside = OUTSIDE_A[0]
    logits = torch.zeros(2, 3, 1000)  # two heads
    logits[:, 0, outside], logits[:, 0, a] = 5.0, 4.0
    logits[:, 1, b], logits[:, 1, outside] = 3.0, 2.0
    logits[:, 2, a] = 1.0
    labels = torch.tensor([a, a, a])
    classes = class_subset("imagenet_a")
    assert restricted_top1(logits, labels) == pytest.approx([1 / 3, 1 / 3])
    assert restricted_top1(logits, labels, classes) == pytest.approx([2 / 3, 2 / 3])
    # the same as masking every other class out
    masked = torch.full_like(logits, float("-inf"))
    masked[..., classes] = logits[..., classes]
    assert restricted_top1(logits, labels, classes) == (masked.argmax(-1) == labels).float().mean(-1).tolist()


def test_heads_top1_in_chunks_equals_all_at_once():
    torch.manual_seed(0)
    heads = MatryoshkaHeads([4, 16], 1000)
    features = torch.randn(50, 16)
    with torch.no_grad():
        logits = heads(features)
    a = class_subset("imagenet_a")
    # half of the labels are what the 16-dim head predicts among the 200 classes: accuracies well above zero
    labels = torch.cat([a[logits[1, :25, a].argmax(-1)], torch.tensor(A_CLASSES[:25])])
    for name, classes in (("imagenet_a", a), ("imagenet_v2", None)):
        assert heads_top1(heads, features, labels, name, chunk=7) == pytest.approx(
            restricted_top1(logits, labels, classes), abs=1e-7)
    assert heads_top1(heads, features, labels, "imagenet_a")[1] >= 0.5
    with pytest.raises(UserError, match="1000 classes"):
        heads_top1(MatryoshkaHeads([4], 10), features, labels, "imagenet_a")


def test_class_lists():
    assert len(SYNSETS) == 1000 and SYNSETS[0] == "n01440764"
    for name in ("imagenet_a", "imagenet_r"):
        subset = class_subset(name)
        assert len(subset) == 200 and subset.tolist() == sorted(set(subset.tolist()))
    assert class_subset("imagenet_v2") is None and class_subset("imagenet_sketch") is None
    assert parse_paths(["imagenet_a=/x", "imagenet_v2=/y=z"]) == {"imagenet_a": "/x", "imagenet_v2": "/y=z"}
    for bad in ("imagenet_b=/x", "imagenet_a", "imagenet_a="):
        with pytest.raises(UserError, match="expected NAME=DIR"):
            parse_paths([bad])


def write_jpegs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, pixels in enumerate(images):
        Image.fromarray(np.uint8(pixels * 15)).convert("RGB").resize((16, 16)).save(folder / f"{i}.JPEG", quality=95)


def test_class_folders_by_wnid_or_index(tmp_path):
    digits = load_digits()
    write_jpegs(tmp_path / "v2" / str(DIGIT_CLASS[7]), digits.images[:2])
    write_jpegs(tmp_path / "v2" / SYNSETS[DIGIT_CLASS[1]], digits.images[2:5])
    (tmp_path / "v2" / SYNSETS[DIGIT_CLASS[1]] / "notes.txt").write_text("not an image")
    ds, source, version = load_shifted("imagenet_v2", str(tmp_path / "v2"))
    assert source == str(tmp_path / "v2") and len(ds) == 5
    assert sorted(ds["label"]) == sorted([DIGIT_CLASS[7]] * 2 + [DIGIT_CLASS[1]] * 3)
    assert ds.column_names == ["image", "label", "index"]
    (tmp_path / "v2" / str(DIGIT_CLASS[7]) / "0.JPEG").write_bytes(b"changed")  # the cache key follows the files
    assert load_shifted("imagenet_v2", str(tmp_path / "v2"))[2] != version
    with pytest.raises(UserError, match="not one of the 200 classes of ImageNet-A"):
        load_shifted("imagenet_a", str(tmp_path / "v2"))  # class DIGIT_CLASS[7] is outside ImageNet-A
    write_jpegs(tmp_path / "bad" / "cats", digits.images[:1])
    with pytest.raises(UserError, match="WordNet id"):
        load_shifted("imagenet_sketch", str(tmp_path / "bad"))
    with pytest.raises(UserError, match="no such folder"):
        load_shifted("imagenet_sketch", str(tmp_path / "missing"))


def test_unreachable_hub_is_one_line(monkeypatch):
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UserError) as error:
        load_shifted("imagenet_r")
    assert "ImageNet-R" in str(error.value) and "--robustness_path imagenet_r=DIR" in str(error.value)
    assert "\n" not in str(error.value)


def predict(backbone, heads, config, files):
    """Each head's logits for image files, through the run's evaluation preprocessing, in float32."""
    data = config["data"]
    transform = build_transform(data["augment"], data["image_size"], data["mean"], data["std"], train=False)
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return heads(backbone(x))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A run trained on a tiny ImageNet-labelled dataset (digits as 10 of the 1,000 synsets, 5 of them ImageNet-A
    classes), and two shifted sets built for it: an ImageNet-A folder (by WordNet id) where 20 of 30 images sit in
    the class the 8-dim head predicts among the 200, the other 10 in another A class; and an ImageNetV2 folder (by
    class index) with the digits' own classes. Then evaluate.py with both."""
    tmp = tmp_path_factory.mktemp("robust")
    digits = load_digits()
    label = datasets.ClassLabel(names=SYNSETS)
    features = datasets.Features({"image": datasets.Image(), "label": label})

    def split(rows):
        return datasets.Dataset.from_dict({"image": [Image.fromarray(np.uint8(digits.images[i] * 15)) for i in rows],
                                           "label": [DIGIT_CLASS[digits.target[i]] for i in rows]}, features=features)
    datasets.DatasetDict({"train": split(range(300)), "validation": split(range(300, 400)),
                          "test": split(range(400, 500))}).save_to_disk(tmp / "data")
    run_script("train_supervised.py", "--dataset", "custom", "--dataset_path", tmp / "data", "--image_size", 8,
               "--dims", "8,64,512", "--epochs", 1, "--batch_size", 64, "--lr", "2e-3", "--num_workers", 0,
               "--output_dir", tmp / "run", tmp_path=tmp)

    backbone, heads, config = load_model(tmp / "run")
    backbone.eval()
    write_jpegs(tmp / "staging", digits.images[500:530])
    files = [tmp / "staging" / f"{i}.JPEG" for i in range(30)]
    a = class_subset("imagenet_a")
    restricted = a[predict(backbone, heads, config, files)[0][:, a].argmax(-1)]
    for i, path in enumerate(files):
        target = restricted[i].item() if i < 20 else A_CLASSES[(A_CLASSES.index(restricted[i].item()) + 1) % 200]
        (tmp / "a" / SYNSETS[target]).mkdir(parents=True, exist_ok=True)
        path.rename(tmp / "a" / SYNSETS[target] / path.name)
    for digit in range(10):
        write_jpegs(tmp / "v2" / str(DIGIT_CLASS[digit]), digits.images[530:600][digits.target[530:600] == digit])

    out = tmp / "out"
    args = ["--checkpoint", tmp / "run", "--robustness_path", f"imagenet_a={tmp / 'a'}", f"imagenet_v2={tmp / 'v2'}",
            "--dims", 8, "--no-pca", "--probe_l2", "1e-3", "--probe_max_iter", 5, "--shortlist", 20, "--num_workers",
            0, "--output_dir", out, "--report_to", "none", "--no-retrieval_grid"]
    evaluate.main(evaluate.get_args_parser().parse_args([str(a) for a in args]))  # in this process: no second start
    return tmp, (backbone, heads, config), json.loads((out / "results.json").read_text())


def test_heads_on_shifted_sets_equal_a_direct_computation(evaluated):
    tmp, (backbone, heads, config), results = evaluated
    (run,) = results["runs"]
    assert run["heads"]["dims"] == [8, 64, 512]
    assert results["robustness"]["imagenet_a"]["n"] == 30
    assert results["robustness"]["imagenet_a"]["restricted_to_classes"]
    assert results["robustness"]["imagenet_v2"]["source"] == str(tmp / "v2")
    a = class_subset("imagenet_a")
    for name, folder, restrict in (("imagenet_a", "a", True), ("imagenet_v2", "v2", False)):
        files = sorted((tmp / folder).glob("*/*.JPEG"))
        labels = torch.tensor([SYNSETS.index(f.parent.name) if f.parent.name.startswith("n") else int(f.parent.name)
                               for f in files])
        logits = predict(backbone, heads, config, files)
        expected = restricted_top1(logits, labels, a if restrict else None)
        # evaluate.py caches float16 features: at most one image in a near-tie may go the other way
        assert run["robustness"][name]["top1"] == pytest.approx(expected, abs=1.01 / len(files)), name
        if restrict:
            # by construction, 20 of the 30 are where the 8-dim head points among the 200 classes ...
            assert run["robustness"][name]["top1"][0] == pytest.approx(20 / 30, abs=1.01 / 30)
            # ... which over all 1,000 classes it often does not: the restriction changed the argmax
            unrestricted = logits[0].argmax(-1)
            assert (~torch.isin(unrestricted, a)).sum() > 0
            assert restricted_top1(logits, labels)[0] < expected[0]


def test_robustness_table(evaluated):
    tmp, _, results = evaluated
    markdown = (tmp / "out" / "results.md").read_text()
    assert "| run | dim | test | ImageNet-A | ImageNetV2 |" in markdown
    run = results["runs"][0]
    for i, d in enumerate(run["heads"]["dims"]):
        row = f"| run | {d} | {run['heads']['top1'][i]:.4f} | {run['robustness']['imagenet_a']['top1'][i]:.4f} | " \
              f"{run['robustness']['imagenet_v2']['top1'][i]:.4f} |"
        assert row in markdown
    assert "robustness" in results["protocols"]
