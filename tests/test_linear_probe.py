"""The linear probe (`clipzsl.linear_probe`, `evaluation.linear_probe_evaluation`, `clipzsl eval --protocol
linear-probe`): checked against CLIP_benchmark's own `linear_probe` code on the same features."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from clipzsl import linear_probe as lp
from clipzsl.errors import InputError
from clipzsl.evaluation import ClassFolders, linear_probe_evaluation
from clipzsl.metrics import classification_metrics

CONFIG = lp.ProbeConfig(epochs=4, batch_size=32)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: on a shared, loaded machine a second thread makes each step 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def features(count, classes=8, dim=24, noise=1.2, seed=0):
    """Normalised features around one centre per class, targets cycling over the classes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.arange(count) % classes
    return F.normalize(centres[y] + noise * torch.randn(count, dim, generator=g), dim=-1), y


@pytest.fixture
def clip_benchmark(monkeypatch):
    """CLIP_benchmark's linear_probe module, made to run on the CPU.

    Its code calls .cuda() and .to("cuda") unconditionally (it asserts device == "cuda"): those become
    no-ops here. Its `accuracy` converts a 1-element array with float(), which numpy 2.4 refuses
    (TypeError): it is replaced by the same formula with the sum taken as a scalar."""
    cb = pytest.importorskip("clip_benchmark.metrics.linear_probe")
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self if a[:1] == ("cuda",) else to(self, *a, **k))

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]
    monkeypatch.setattr(cb, "accuracy", accuracy)
    return cb


def their_evaluate(cb, tmp_path, x, y, x_test, y_test, shots, config=CONFIG):
    """CLIP_benchmark's `linear_probe.evaluate` on these features: they go into its feature cache (train and
    validation as `validation_split` cuts them, which its `random_split` would cut from its own random
    state), so its loaders are never read; the seed set first, as its command line sets it."""
    part, val = lp.validation_split(len(y), config.val_proportion, config.seed)
    (tmp_path / "m").mkdir()
    for split, xx, yy in (("train", x[part], y[part]), ("val", x[val], y[val]), ("test", x_test, y_test)):
        torch.save(xx, tmp_path / "m" / f"features_{split}.pt")
        torch.save(yy, tmp_path / "m" / f"targets_{split}.pt")
    torch.manual_seed(config.seed)
    return cb.evaluate(torch.nn.Module(), None, None, -1 if shots is None else shots, config.batch_size, 0,
                       config.lr, config.epochs, "m", config.seed, str(tmp_path), "cuda", val_dataloader=[],
                       amp=False)


@pytest.mark.parametrize("shots", [None, 4])
def test_weight_decay_and_metrics_equal_clip_benchmarks(clip_benchmark, tmp_path, shots):
    x_all, y_all = features(800)  # test images drawn around the same centres as the training ones
    x, y, x_test, y_test = x_all[:560], y_all[:560], x_all[560:], y_all[560:]

    probe = lp.fit_linear_probe(x, y, 8, shots, CONFIG)
    ours = lp.probe_metrics(probe, x_test, y_test)
    theirs = their_evaluate(clip_benchmark, tmp_path, x, y, x_test, y_test, shots)

    assert 0.3 < ours["lp_acc1"] < 1  # a probe that learned something, and not a trivial problem
    assert len(probe.val_acc1) > 7  # the search refined around the coarse points
    assert ours["weight_decay"] == theirs["weight_decay"]
    for key in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key  # ours float32, theirs count / n
    assert {k: ours[k] for k in ("epochs", "seed", "fewshot_k", "normalized")} == \
        {k: theirs[k] for k in ("epochs", "seed", "fewshot_k", "normalized")}
    assert probe.n_train == (len(x) if shots is None else 8 * shots)


def test_one_training_equals_clip_benchmarks_train(clip_benchmark):
    x, y = features(200)
    loader = torch.utils.data.DataLoader(clip_benchmark.FeatureDataset(x, y), batch_size=CONFIG.batch_size,
                                         shuffle=True)
    theirs = clip_benchmark.train(loader, x.shape[1], 8, 1e-3, CONFIG.lr, CONFIG.epochs, False, "cpu", CONFIG.seed)
    ours = lp.train_probe(x, y, 8, 1e-3, CONFIG)
    assert torch.equal(ours.weight, theirs.module.weight) and torch.equal(ours.bias, theirs.module.bias)
    changed = lp.train_probe(x, y, 8, 1.0, CONFIG)  # the weight decay is used
    assert not torch.equal(changed.weight, ours.weight)


def test_the_probe_is_reproducible_and_leaves_the_callers_random_state_alone():
    x, y = features(200)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = lp.fit_linear_probe(x, y, 8, 2, CONFIG)
    assert torch.equal(torch.get_rng_state(), state)
    again = lp.fit_linear_probe(x, y, 8, 2, CONFIG)
    assert first.weight_decay == again.weight_decay and torch.equal(first.linear.weight, again.linear.weight)
    other = lp.fit_linear_probe(x, y, 8, 2, lp.ProbeConfig(epochs=4, batch_size=32, seed=1))
    assert not torch.equal(first.linear.weight, other.linear.weight)


def test_separable_classes_are_learned_and_the_record_says_how():
    x, y = features(400, noise=0.05)
    probe = lp.fit_linear_probe(x[:300], y[:300], 8, None, CONFIG)
    metrics = lp.probe_metrics(probe, x[300:], y[300:])
    assert metrics["lp_acc1"] == 1.0 and metrics["lp_mean_per_class_recall"] == 1.0
    assert metrics["fewshot_k"] == -1 and metrics["normalized"] is True
    assert metrics["weight_decay"] == probe.weight_decay in lp.WEIGHT_DECAYS
    assert probe.n_train + probe.n_val == 300 + probe.n_val and probe.n_val == 60  # full: refit on train + val
    assert probe.settings()["val_acc1"] == max(probe.val_acc1.values())


def test_acc5_is_none_under_five_classes():
    x, y = features(120, classes=4)
    metrics = lp.probe_metrics(lp.fit_linear_probe(x, y, 4, None, CONFIG), x, y)
    assert metrics["lp_acc5"] is None and metrics["lp_acc1"] is not None


def test_the_grid_is_clip_benchmarks():
    assert len(lp.WEIGHT_DECAYS) == 97 and lp.WEIGHT_DECAYS[0] == pytest.approx(1e-6)
    assert lp.WEIGHT_DECAYS[-1] == pytest.approx(100.0)
    assert lp.COARSE == [0, 16, 32, 48, 64, 80, 96]


def test_validation_split_is_torchs_random_split():
    train, val = lp.validation_split(50, 0.2, 3)
    assert sorted(train + val) == list(range(50)) and len(val) == 10
    subsets = torch.utils.data.random_split(range(50), [0.8, 0.2], generator=torch.Generator().manual_seed(3))
    assert (train, val) == (list(subsets[0].indices), list(subsets[1].indices))
    with pytest.raises(InputError, match="between 0 and 1"):
        lp.validation_split(50, 1.0, 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=60), st.integers(1, 6), st.integers(0, 3))
def test_few_shot_takes_k_of_every_class_or_names_those_short(targets, shots, seed):
    counts = np.bincount(targets, minlength=6)
    present = np.flatnonzero(counts)
    if (counts[present] < shots).any():
        with pytest.raises(InputError, match="fewer shots") as error:
            lp.few_shot_indices(targets, shots, seed)
        short = int(present[counts[present] < shots][0])
        assert f"{short} has {counts[short]}" in str(error.value)
        return
    rows = lp.few_shot_indices(targets, shots, seed)
    assert len(set(rows)) == len(rows) and np.bincount(np.asarray(targets)[rows], minlength=6)[present].tolist() \
        == [shots] * len(present)
    assert sorted(lp.few_shot_indices(targets, None, seed)) == list(range(len(targets)))


def test_a_class_without_a_training_image_is_short_of_any_shots():
    rows = lp.few_shot_indices([0, 0, 2], 1, 0)  # the classes present: one image each
    assert len(rows) == 2 and 2 in rows
    with pytest.raises(InputError, match="1 has 0"):
        lp.few_shot_indices([0, 0, 2], 1, 0, classes=3)
    x, y = features(40, classes=4)
    part, val = lp.validation_split(40, CONFIG.val_proportion, CONFIG.seed)
    y[val[0]] = 4  # class 4's one image is in the validation split: none trains
    with pytest.raises(InputError, match="4 has 0"):
        lp.fit_linear_probe(x, y, 5, 1, CONFIG)
    assert lp.fit_linear_probe(x, y, 5, None, CONFIG).n_train == 40  # the full probe takes what there is


def test_check_shots_names_the_classes_before_anything_is_embedded():
    targets = [0] * 10 + [1] * 3
    lp.check_shots(targets, [None, 1, 2], CONFIG, ["cat", "dog"])
    with pytest.raises(InputError, match=r"8-shot probe needs 8 .*'dog' has \d.*ask for fewer shots"):
        lp.check_shots(targets, [1, 8], CONFIG, ["cat", "dog"])
    with pytest.raises(InputError, match="at least 1"):
        lp.check_shots(targets, [0], CONFIG)


def test_too_few_images_for_a_validation_split_are_refused():
    x, y = features(3)
    with pytest.raises(InputError, match="validation split"):
        lp.fit_linear_probe(x[:2], y[:2], 8, None, CONFIG)


# ------------------------------------------------------------------ on images, through a model


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPZSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_dataset(root, classes=6, per_class=10):
    from test_eval_zeroshot import make_dataset as folders
    from test_eval_zeroshot import CLASSES
    return folders(root, CLASSES[:classes], per_class)


def test_evaluation_scores_zero_shot_and_each_probe_on_the_same_test_half(tmp_path, tiny_clip, cache_dir):
    from clipzsl import load_model
    from clipzsl.classifier import ZeroShotClassifier
    from clipzsl.images import embed_images

    data = ClassFolders.read(make_dataset(tmp_path / "data"))
    model = load_model(f"hf:{tiny_clip}")
    records = linear_probe_evaluation(data, model, shots=[None, 2], config=CONFIG, templates="photo_1",
                                      progress=False)
    assert [r["task"] for r in records] == ["zeroshot_classification", "linear_probe", "linear_probe"]
    assert [r["metrics"].get("fewshot_k") for r in records] == [None, -1, 2]
    assert all(r["n_test"] == 30 and r["n_classes"] == 6 and r["model"] == f"hf:{tiny_clip}" for r in records)

    # the same halves as the base-to-novel split: the record's figures from the library's parts by hand
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(6):
        idx = rng.permutation([i for i, y in enumerate(data.targets) if y == c]).tolist()
        train += idx[:5]
        test += idx[5:]
    x = embed_images(model, [data.paths[i] for i in train]).embeddings
    x_test = embed_images(model, [data.paths[i] for i in test])
    y, y_test = [data.targets[i] for i in train], [data.targets[i] for i in test]
    clf = ZeroShotClassifier(model, labels=data.names, templates="photo_1", cache=False)
    assert records[0]["metrics"] == pytest.approx(classification_metrics(clf.logits(x_test), y_test))
    for record, shots in zip(records[1:], (None, 2)):
        probe = lp.fit_linear_probe(x, y, 6, shots, CONFIG)
        assert record["metrics"] == pytest.approx(lp.probe_metrics(probe, x_test.embeddings, y_test), abs=1e-6)
        assert record["n_train"] == (30 if shots is None else 12) and record["n_val"] == 6

    table = lp.format_linear_probe(records)
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["zero-shot", "full", "2-shot"]


def test_evaluation_refuses_shots_a_class_cannot_give_before_embedding(tmp_path, cache_dir):
    data = ClassFolders.read(make_dataset(tmp_path / "data", per_class=4))

    class Unused:  # the shots are checked first: the model is never asked for anything
        def __getattr__(self, name):
            raise AssertionError(f"model.{name} used")
    with pytest.raises(InputError, match=r"3-shot probe .*'black cat' has [0-2]"):
        linear_probe_evaluation(data, Unused(), shots=[1, 3], config=CONFIG)  # type: ignore[arg-type]
    assert not (cache_dir / "image-features").exists()


# ------------------------------------------------------------------ the command line


def run_probe(data, model_dir, *extra):
    from clipzsl.cli import main
    return main(["eval", str(data), "--protocol", "linear-probe", "--model", f"hf:{model_dir}",
                 "--templates", "photo_1", *extra])


def test_cli_prints_the_table_and_writes_the_records(tmp_path, tiny_clip, cache_dir, capsys):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "probe.json"
    assert run_probe(data, tiny_clip, "--shots", "2", "full", "--output", str(out)) == 0
    stdout = capsys.readouterr().out
    records = json.loads(out.read_text())
    assert [r["task"] for r in records] == ["zeroshot_classification", "linear_probe", "linear_probe"]
    assert [r["metrics"]["fewshot_k"] for r in records[1:]] == [2, -1]
    assert set(records[1]["metrics"]) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay",
                                          "epochs", "seed", "fewshot_k", "normalized"}  # CLIP_benchmark's keys
    assert stdout == lp.format_linear_probe(records)
    assert [line.split()[0] for line in stdout.splitlines()[2:]] == ["zero-shot", "2-shot", "full"]
    assert f"{100 * records[2]['metrics']['lp_acc1']:.2f}%" in stdout.splitlines()[-1]


def test_cli_refuses_more_shots_than_a_class_has(tmp_path, tiny_clip, cache_dir, capsys):
    data = make_dataset(tmp_path / "data", per_class=6)  # 3 training images per class, 2 after the validation split
    assert run_probe(data, tiny_clip, "--shots", "1", "4") == 2
    err = capsys.readouterr().err
    assert err.startswith("clipzsl: error: a 4-shot probe needs 4 training images of every class")
    assert "ask for fewer shots, or add images" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [(["--shots", "0"], "must be at least 1"),
                                            (["--shots", "two"], "invalid shots value")])
def test_cli_refuses_shots_that_are_no_count(tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_probe(tmp_path, "unused", *extra)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_cli_shots_belong_to_the_linear_probe(tmp_path, capsys):
    from clipzsl.cli import main
    data = make_dataset(tmp_path / "data", classes=4, per_class=2)
    assert main(["eval", str(data), "--protocol", "zeroshot", "--shots", "2"]) == 2
    assert "--shots applies to --protocol linear-probe only" in capsys.readouterr().err
