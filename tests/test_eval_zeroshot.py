"""`clipzsl eval DATA --protocol zeroshot`: CLIP_benchmark-style zero-shot metrics on a class-folder set."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from clipzsl import load_model
from clipzsl.backends.hf import HFBackend, save_random_clip
from clipzsl.classifier import ZeroShotClassifier
from clipzsl.cli import main
from clipzsl.metrics import accuracy, top_k_accuracy
from clipzsl.prompts import load_templates
from conftest import TINY

CLASSES = ("red_car", "green_apple", "blue_sky", "yellow_sun", "black_cat", "white_snow")
TEMPLATES = "photo_1"


def make_dataset(root, classes=CLASSES, per_class=4, seed=0):
    """DATA/<class>/<images>: noisy images, each class around its own colour."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 60, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def reference_metrics(probs: np.ndarray, y: np.ndarray) -> dict:
    """acc1 / acc5 / mean per-class recall by ranks and a confusion matrix, not by the library's metrics."""
    true_score = probs[np.arange(len(y)), y]
    rank = (probs > true_score[:, None]).sum(1)  # 0 = the true class scored highest
    n = probs.shape[1]
    confusion = np.zeros((n, n))
    np.add.at(confusion, (y, probs.argmax(1)), 1)
    present = confusion.sum(1) > 0
    return {"acc1": float(np.mean(rank < 1)), "acc5": float(np.mean(rank < 5)),
            "mean_per_class_recall": float(np.mean(np.diag(confusion)[present] / confusion.sum(1)[present]))}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPZSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run_eval(data, model_dir, *extra):
    return main(["eval", str(data), "--protocol", "zeroshot", "--model", f"hf:{model_dir}",
                 "--templates", TEMPLATES, "--batch-size", "5", *extra])


def test_metrics_match_an_independent_computation(tmp_path, tiny_clip, cache_dir, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "result.json"
    assert run_eval(data, tiny_clip, "--output", str(out)) == 0
    stdout = capsys.readouterr().out
    record = json.loads(out.read_text())

    clf = ZeroShotClassifier(f"hf:{tiny_clip}", labels=[c.replace("_", " ") for c in CLASSES],
                             templates=TEMPLATES, cache=False)
    paths = [str(data / c / f"{i}.png") for c in CLASSES for i in range(4)]
    y = np.repeat(np.arange(len(CLASSES)), 4)
    expected = reference_metrics(clf.predict_proba(paths), y)
    assert 0 < expected["acc5"] < 1 and expected["acc1"] < 1  # a random model: the metrics are not trivial
    assert record["metrics"] == pytest.approx(expected)

    assert set(record) == {"dataset", "model", "pretrained", "task", "metrics", "language", "templates",
                           "n_classes", "n_images", "n_unreadable"}
    assert record["task"] == "zeroshot_classification"
    assert record["dataset"] == str(data)
    assert record["model"] == f"hf:{tiny_clip}"
    assert record["pretrained"] == clf.model.fingerprint
    assert record["templates"] == load_templates(TEMPLATES)
    assert (record["n_classes"], record["n_images"], record["n_unreadable"]) == (6, 24, 0)
    for key in ("acc1", "acc5", "mean_per_class_recall"):
        assert f"{key} " in stdout and f"{100 * expected[key]:.2f}%" in stdout


def test_top_k_accuracy_agrees_with_ranks():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=gen)
    labels = torch.randint(0, 8, (50,), generator=gen)
    rank = (logits > logits[torch.arange(50), labels][:, None]).sum(1).numpy()
    for k in (1, 3, 5, 8):
        assert top_k_accuracy(logits, labels, k) == pytest.approx(np.mean(rank < k))
    assert top_k_accuracy(logits, labels, 1) == accuracy(logits, labels)


def test_saved_classifier_reloads_without_encoding_text(tmp_path, tiny_clip, cache_dir, monkeypatch):
    data = make_dataset(tmp_path / "data")
    saved, first, second = tmp_path / "clf.safetensors", tmp_path / "a.json", tmp_path / "b.json"
    assert run_eval(data, tiny_clip, "--output", str(first), "--save-classifier", str(saved)) == 0

    with safe_open(str(saved), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("class_embeddings").shape == (len(CLASSES), TINY["projection_dim"])
    assert meta["fingerprint"] == load_model(f"hf:{tiny_clip}").fingerprint
    assert meta["spec"] == f"hf:{tiny_clip}"
    assert [e["name"] for e in json.loads(meta["labels"])] == sorted(c.replace("_", " ") for c in CLASSES)
    assert json.loads(meta["templates"]) == load_templates(TEMPLATES)

    def no_text(self, texts):
        raise AssertionError("text was encoded although the classifier was loaded")

    monkeypatch.setattr(HFBackend, "encode_texts", no_text)
    assert run_eval(data, tiny_clip, "--output", str(second), "--load-classifier", str(saved),
                    "--cache-dir", str(tmp_path / "empty-cache")) == 0
    assert json.loads(second.read_text()) == json.loads(first.read_text())


def test_classifier_from_another_model_is_refused(tmp_path, tiny_clip, cache_dir, capsys):
    data = make_dataset(tmp_path / "data")
    other = save_random_clip(tmp_path / "other", seed=2, **TINY)
    saved = tmp_path / "clf.safetensors"
    assert run_eval(data, other, "--save-classifier", str(saved)) == 0
    capsys.readouterr()
    assert run_eval(data, tiny_clip, "--load-classifier", str(saved)) == 2
    err = capsys.readouterr().err
    message = err[err.index("clipzsl: error:"):]  # after transformers' own progress lines
    assert message.startswith(f"clipzsl: error: {saved}: class embeddings were built with model 'hf:{other}'")
    assert load_model(f"hf:{tiny_clip}").fingerprint in message and message.count("\n") == 1


def test_classifier_for_other_classes_is_refused(tmp_path, tiny_clip, cache_dir, capsys):
    data = make_dataset(tmp_path / "data")
    saved = tmp_path / "clf.safetensors"
    assert run_eval(data, tiny_clip, "--save-classifier", str(saved)) == 0
    (data / "black_cat").rename(data / "grey_dog")
    capsys.readouterr()
    assert run_eval(data, tiny_clip, "--load-classifier", str(saved)) == 2
    err = capsys.readouterr().err
    assert f"{saved}: built for other classes than the folders of {data}" in err
    assert "['grey dog']" in err and "['black cat']" in err


def test_classifier_with_other_templates_is_refused(tmp_path, tiny_clip, cache_dir, capsys):
    data = make_dataset(tmp_path / "data", per_class=1)
    saved = tmp_path / "clf.safetensors"
    assert run_eval(data, tiny_clip, "--save-classifier", str(saved)) == 0
    capsys.readouterr()
    code = main(["eval", str(data), "--protocol", "zeroshot", "--model", f"hf:{tiny_clip}",
                 "--load-classifier", str(saved)])  # the default templates, not photo_1
    assert code == 2
    assert f"{saved}: built with other templates" in capsys.readouterr().err


def test_not_a_classifier_file_is_a_clean_error(tmp_path, tiny_clip, cache_dir, capsys):
    data = make_dataset(tmp_path / "data", per_class=1)
    bogus = tmp_path / "clf.safetensors"
    bogus.write_text("not safetensors")
    assert run_eval(data, tiny_clip, "--load-classifier", str(bogus)) == 2
    assert f"clipzsl: error: {bogus}: not a readable safetensors file" in capsys.readouterr().err
    save_file({"class_embeddings": torch.zeros(6, TINY["projection_dim"])}, str(bogus))  # no metadata
    assert run_eval(data, tiny_clip, "--load-classifier", str(bogus)) == 2
    assert f"clipzsl: error: {bogus}: not a clipzsl classifier file" in capsys.readouterr().err


def test_unreadable_image_is_reported_and_left_out(tmp_path, tiny_clip, cache_dir, capsys):
    classes = CLASSES[:3]
    data = make_dataset(tmp_path / "data", classes=classes, per_class=3)
    bad = data / classes[1] / "broken.png"
    bad.write_bytes((data / classes[1] / "0.png").read_bytes()[:60])
    out = tmp_path / "result.json"
    assert run_eval(data, tiny_clip, "--output", str(out)) == 1
    err = capsys.readouterr().err
    assert f"clipzsl: skipped {bad}:" in err
    assert "1 of 10 images could not be read; the metrics are over the other 9" in err
    record = json.loads(out.read_text())
    assert (record["n_images"], record["n_unreadable"]) == (9, 1)
    assert record["metrics"]["acc5"] is None  # 3 classes: top-5 would be 1 by construction

    clf = ZeroShotClassifier(f"hf:{tiny_clip}", labels=[c.replace("_", " ") for c in classes],
                             templates=TEMPLATES, cache=False)
    good = [str(data / c / f"{i}.png") for c in classes for i in range(3)]
    expected = reference_metrics(clf.predict_proba(good), np.repeat(np.arange(3), 3))
    assert record["metrics"]["acc1"] == pytest.approx(expected["acc1"])
    assert record["metrics"]["mean_per_class_recall"] == pytest.approx(expected["mean_per_class_recall"])


def test_classifier_options_need_the_zeroshot_protocol(tmp_path, capsys):
    data = make_dataset(tmp_path / "data", per_class=1)
    code = main(["eval", str(data), "--protocol", "b2n", "--save-classifier", str(tmp_path / "c.safetensors")])
    assert code == 2
    assert "apply to --protocol zeroshot only" in capsys.readouterr().err


def test_given_weights_replace_text_encoding_and_must_fit(tiny_clip):
    model = load_model(f"hf:{tiny_clip}")
    built = ZeroShotClassifier(model, labels=["cat", "dog"], templates=TEMPLATES, cache=False)
    reused = ZeroShotClassifier(model, labels=["cat", "dog"], templates=TEMPLATES, class_embeddings=built.class_embeddings)
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    assert np.array_equal(reused.predict_proba([image]), built.predict_proba([image]))
    with pytest.raises(ValueError, match=r"class embeddings have shape \(3, 32\), but 2 labels"):
        ZeroShotClassifier(model, labels=["cat", "dog"], class_embeddings=torch.zeros(3, model.embed_dim))


def test_zeroshot_metrics_refuse_an_adapter(tiny_clip):
    from clipzsl.adapter import CrossAttentionAdapter
    from clipzsl.evaluation import zeroshot_classification

    model = load_model(f"hf:{tiny_clip}")
    clf = ZeroShotClassifier(model, labels=["cat", "dog"], templates=TEMPLATES, cache=False,
                             adapter=CrossAttentionAdapter(model.embed_dim))
    with pytest.raises(ValueError, match="this one has an adapter"):
        zeroshot_classification(clf, [], [])


def test_no_readable_image_writes_no_result(tmp_path, tiny_clip, cache_dir, capsys):
    data = tmp_path / "data"
    for name in CLASSES[:2]:
        (data / name).mkdir(parents=True)
        (data / name / "0.png").write_text("not an image")
    out = tmp_path / "result.json"
    assert run_eval(data, tiny_clip, "--output", str(out)) == 1
    assert "no image could be read; nothing to evaluate" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [((), "class sub-folders holds images"),
                                            (("--test", "elsewhere"), "--test does not apply")])
def test_bad_zeroshot_arguments_are_clean_errors(tmp_path, capsys, extra, message):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    assert main(["eval", str(tmp_path / "data"), "--protocol", "zeroshot", *extra]) == 2
    assert message in capsys.readouterr().err
