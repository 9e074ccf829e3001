"""Tip adapters end to end on small class folders: `build_tip_from_folder` and `fit_gamma` called directly,
`train-adapter --kind`, `eval --calibrate`, `classify --adapter` and the service with a Tip adapter (no
attention: no "adapter" heat-map method, no spatial tokens), and the calibration rewrite's durability."""
import io
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import clipzsl
import clipzsl.adapter
from clipzsl import store
from clipzsl.adapter import AdapterError, CrossAttentionAdapter
from clipzsl.calibration import describe_calibration, fit_gamma
from clipzsl.cli import main
from clipzsl.errors import InputError
from clipzsl.maps import default_method
from clipzsl.pipeline import Classification
from clipzsl.tip_adapter import TipAdapter, draws_attention, load_adapter
from clipzsl.tip_training import TipConfig, build_tip_from_folder, describe_tip, fit_tip
from clipzsl.training import ClassFolders

NAMES = ["ant", "bee", "cat", "dog", "eel", "fox"]


@pytest.fixture(scope="module")
def model(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six classes of six small generated images each (a colour per class, noise per image)."""
    root = tmp_path_factory.mktemp("tip-folders") / "data"
    rng = np.random.default_rng(0)
    for k, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        for j in range(6):
            arr = np.full((32, 32, 3), 40 * k, np.uint8) + rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tip-cache")


@pytest.fixture(scope="module")
def tip_dir(model, data, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("tip-built") / "tip"
    build_tip_from_folder(data, model, out, cache_dir=cache, progress=False)
    return out


def embedded(model, data, names):
    """The images of `names`' folders and those classes' embeddings, through the plain zero-shot classifier."""
    clf = clipzsl.ZeroShotClassifier(model, labels=names, cache=False)
    paths = [str(p) for name in names for p in sorted((data / name).iterdir())]
    return clf.embed(paths), clf.class_embeddings, [names.index(p.split("/")[-2]) for p in paths]


@pytest.mark.parametrize("kind", ["tip", "tip-f"])
def test_build_tip_from_folder_is_fit_tip_over_the_folders_images(model, data, cache, tmp_path, kind):
    (tmp_path / "seen.txt").write_text("ant\ncat\ndog\nfox\n")
    adapter, info = build_tip_from_folder(data, model, tmp_path / "tip", seen=tmp_path / "seen.txt", kind=kind,
                                          seed=1, cache_dir=cache, progress=False)
    names = ["ant", "cat", "dog", "fox"]
    images, texts, targets = embedded(model, data, names)
    expected, expected_info = fit_tip(images, targets, texts, TipConfig(kind=kind, seed=1))
    loaded = load_adapter(tmp_path / "tip", model)
    assert isinstance(loaded, TipAdapter) and loaded.kind == kind and loaded.class_names == names
    assert (loaded.alpha, loaded.beta) == pytest.approx((expected.alpha, expected.beta))
    torch.testing.assert_close(loaded.keys.detach(), expected.keys.detach(), atol=1e-5, rtol=1e-4)
    assert torch.equal(loaded.labels, expected.labels)
    torch.testing.assert_close(loaded.class_embeddings, texts.float())
    assert info["cache_size"] == expected_info["cache_size"] == (24 if kind == "tip" else 20)
    assert json.loads((tmp_path / "tip" / "adapter.json").read_text())["training"]["kind"] == kind
    assert describe_tip(tmp_path / "tip", info).startswith(f"{tmp_path / 'tip'}: {kind} adapter, cache of ")


def test_train_adapter_kind_tip_saves_what_the_function_saves(model, tiny_clip, data, cache, tip_dir, tmp_path,
                                                              capsys):
    status = main(["train-adapter", str(data), "--kind", "tip", "--out", str(tmp_path / "cli"),
                   "--model", f"hf:{tiny_clip}", "--cache-dir", str(cache)])
    printed = capsys.readouterr().out
    by_cli, by_function = load_adapter(tmp_path / "cli", model), load_adapter(tip_dir, model)
    assert status == 0 and printed.startswith(f"{tmp_path / 'cli'}: tip adapter, cache of 36 images (6-6 per class)")
    assert (by_cli.alpha, by_cli.beta) == (by_function.alpha, by_function.beta)
    assert torch.equal(by_cli.keys, by_function.keys) and by_cli.class_names == NAMES


@pytest.mark.parametrize("options, named", [(["--lr", "0.1"], "--lr does"),
                                            (["--epochs", "3", "--consistency", "1"], "--epochs, --consistency do")])
def test_train_adapter_refuses_options_of_the_other_kind(data, tmp_path, capsys, options, named):
    status = main(["train-adapter", str(data), "--kind", "tip-f", "--out", str(tmp_path / "x"),
                   "--model", "hf:/no/such/model", *options])
    err = capsys.readouterr().err
    assert status == 2 and f"{named} not apply to --kind tip-f" in err and "--kind cross-attention" in err
    assert not (tmp_path / "x").exists()


def copy_adapter(source, target):
    target.mkdir()
    for name in ("adapter.json", "adapter.safetensors"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_fit_gamma_stores_a_gamma_that_does_not_lower_validation_h(model, data, cache, tip_dir, tmp_path):
    directory = copy_adapter(tip_dir, tmp_path / "tip")
    calibration = fit_gamma(directory, ClassFolders.read(data), model, cache_dir=cache, progress=False)
    stored = json.loads((directory / "adapter.json").read_text())["calibration"]
    assert stored == asdict(calibration) and calibration.seen_labels == NAMES and calibration.seed == 0
    assert calibration.val_h_calibrated >= calibration.val_h_plain and calibration.val_images > 0
    assert load_adapter(directory, model).meta["calibration"]["gamma"] == calibration.gamma
    assert f"gamma {calibration.gamma:.4g} stored" in describe_calibration(directory, calibration)


def test_fit_gamma_refuses_a_folder_of_too_few_of_its_classes(model, data, tip_dir, tmp_path):
    few = tmp_path / "few"
    for name in NAMES[:3]:
        (few / name).mkdir(parents=True)
        (few / name / "0.png").write_bytes((data / name / "0.png").read_bytes())
    with pytest.raises(InputError, match="3 of its classes are ones the adapter was fitted on"):
        fit_gamma(tip_dir, ClassFolders.read(few), model, progress=False)


def test_eval_calibrate_prints_and_stores_gamma(model, tiny_clip, data, cache, tip_dir, tmp_path, capsys):
    directory = copy_adapter(tip_dir, tmp_path / "tip")
    status = main(["eval", str(data), "--calibrate", str(directory), "--model", f"hf:{tiny_clip}",
                   "--cache-dir", str(cache), "--output", str(tmp_path / "gamma.json")])
    printed = capsys.readouterr().out
    stored = json.loads((directory / "adapter.json").read_text())["calibration"]
    assert status == 0 and stored == json.loads((tmp_path / "gamma.json").read_text())
    assert printed.startswith(f"{directory}: gamma {stored['gamma']:.4g} stored in adapter.json, fitted on ")
    assert main(["eval", str(data), "--calibrate", str(directory), "--protocol", "b2n", "--seeds", "1"]) == 2
    assert "--protocol, --seeds do not apply to --calibrate" in capsys.readouterr().err


def test_truncated_adapter_json_after_the_rewrite_is_refused(model, data, cache, tip_dir, tmp_path):
    directory = copy_adapter(tip_dir, tmp_path / "tip")
    fit_gamma(directory, ClassFolders.read(data), model, cache_dir=cache, progress=False)
    config = directory / "adapter.json"
    config.write_bytes(config.read_bytes()[: config.stat().st_size // 2])
    with pytest.raises(AdapterError, match=r"adapter\.json: not readable JSON .*the saved adapter is damaged"):
        load_adapter(directory, model)


def test_fit_gamma_rewrite_is_atomic(model, data, cache, tip_dir, tmp_path, monkeypatch):
    directory = copy_adapter(tip_dir, tmp_path / "tip")
    first = fit_gamma(directory, ClassFolders.read(data), model, cache_dir=cache, progress=False)
    before = (directory / "adapter.json").read_bytes()

    def half_then_fail(path, write):
        def broken(f):
            buffer = io.BytesIO()
            write(buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError("no space left on device")
        store.atomic_write(path, broken)
    monkeypatch.setattr(clipzsl.adapter, "atomic_write", half_then_fail)
    with pytest.raises(OSError, match="no space left"):
        fit_gamma(directory, ClassFolders.read(data), model, seed=1, cache_dir=cache, progress=False)
    assert (directory / "adapter.json").read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["adapter.json", "adapter.safetensors"]
    assert load_adapter(directory, model).meta["calibration"] == asdict(first)


def tip_logits(adapter, images, texts, model, columns):
    """The Tip-Adapter formula written out: s / 100 * (100 f W^T + alpha exp(-beta (1 - f F^T)) L) + b, each
    label's cache column (`columns`, None: unseen) gathered."""
    x = images.embeddings.float()
    cache = adapter.alpha * torch.exp(-adapter.beta * (1 - x @ adapter.keys.detach().T)) @ F.one_hot(
        adapter.labels, len(adapter.class_names)).float()
    gathered = torch.stack([cache[:, c] if c is not None else torch.zeros(len(x)) for c in columns], 1)
    return model.logit_scale / 100 * (100 * x @ texts.float().T + gathered) + model.logit_bias


LABELS = ["dog", "whale", "ant", "fox"]  # three of the cache's classes and one unseen


def test_classify_cli_with_a_tip_adapter_ranks_by_the_tip_logits(model, tiny_clip, data, tip_dir, tmp_path, capsys):
    paths = [str(data / name / "5.png") for name in NAMES]
    status = main(["classify", *paths, "--labels", ",".join(LABELS), "--adapter", str(tip_dir), "--model",
                   f"hf:{tiny_clip}", "--format", "json", "--top-k", "2", "--no-cache"])
    rows = json.loads(capsys.readouterr().out)
    zs = clipzsl.ZeroShotClassifier(model, labels=LABELS, cache=False)
    logits = tip_logits(load_adapter(tip_dir, model), zs.embed(paths), zs.class_embeddings, model,
                        [NAMES.index(n) if n in NAMES else None for n in LABELS])
    assert status == 0 and len(rows) == len(paths)
    assert [r["predictions"][0]["label"] for r in rows] == [
        LABELS[i] for i in logits.argmax(1).tolist()]


def test_service_with_a_tip_adapter_classifies_through_it_and_draws_no_attention(model, tip_dir, data, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from clipzsl.serve import create_app
    upload = (data / "cat" / "5.png").read_bytes()
    with TestClient(create_app(model, adapter=str(tip_dir), cache=tmp_path / "c")) as client:
        health = client.get("/health").json()
        got = client.post("/classify", files={"image": ("c.png", upload, "image/png")},
                          data={"labels": ",".join(LABELS), "top_k": "4"}).json()
        explained = client.post("/explain", files={"image": ("c.png", upload, "image/png")},
                                data={"labels": ",".join(LABELS), "format": "json"})
        refused = client.post("/explain", files={"image": ("c.png", upload, "image/png")},
                              data={"labels": ",".join(LABELS), "method": "adapter"})
        assert client.app.state.service.batcher.tokens is False
    clf = clipzsl.ZeroShotClassifier(model, labels=LABELS, cache=False, adapter=tip_dir)
    expected = clf.predict(Image.open(io.BytesIO(upload)), top_k=4)[0]
    assert health["adapter"] is True and "adapter" not in health["map_methods"]
    assert [p["label"] for p in got["predictions"]] == [label for label, _ in expected]
    assert [p["probability"] for p in got["predictions"]] == pytest.approx([p for _, p in expected], abs=1e-5)
    assert explained.status_code == 200 and explained.json()["method"] == default_method(model)
    assert refused.status_code == 422 and "adapter" not in refused.json()["detail"].split("pick one of ")[1]


def test_explain_method_of_classify_with_either_adapter(model, tip_dir, tmp_path):
    attention = tmp_path / "ca"
    CrossAttentionAdapter(model.embed_dim).save(attention, model, templates=["{}"], labels=["ant", "bee"])
    assert draws_attention(attention) and not draws_attention(tip_dir) and not draws_attention(None)
    job = Classification(LABELS, model, explain=True, adapter=str(tip_dir))
    assert job.map_method(model) == default_method(model)
    assert Classification(LABELS, model, explain=True, adapter=str(attention)).map_method(model) == "adapter"
    with pytest.raises(InputError, match="is a Tip adapter, which has no attention to draw"):
        Classification(LABELS, model, explain=True, adapter=str(tip_dir), method="adapter").map_method(model)


def test_explain_with_a_tip_adapter_draws_the_models_default_method(model, tip_dir, data, tmp_path):
    from clipzsl.explain import explain
    image = str(data / "cat" / "5.png")
    written = explain(model, [image], ["cat", "whale"], tmp_path / "maps", adapter=tip_dir).written
    assert sorted(p.name for p in written) == ["5__cat.png", "5__whale.png"]
    clf = clipzsl.ZeroShotClassifier(model, labels=["cat", "whale"], cache=False, adapter=tip_dir)
    plain = clipzsl.ZeroShotClassifier(model, labels=["cat", "whale"], cache=False)
    heat, = clf.heatmaps([image])
    expected, = plain.heatmaps([image])
    assert heat.method == default_method(model) and np.array_equal(heat.grid, expected.grid)
    with pytest.raises(InputError, match="a Tip adapter has none"):
        clf.heatmaps([image], method="adapter")


@pytest.fixture(scope="module")
def calibrated(tip_dir, tmp_path_factory):
    from clipzsl.adapter import Calibration
    from clipzsl.tip_adapter import write_calibration
    directory = copy_adapter(tip_dir, tmp_path_factory.mktemp("calibrated") / "tip")
    write_calibration(directory, Calibration(0.5, NAMES, "data", 0, 6, 0.2, 0.3))
    return directory, (directory / "adapter.json").read_bytes()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 0.999))
def test_any_truncation_of_a_calibrated_adapter_json_is_refused(model, calibrated, fraction):
    directory, whole = calibrated
    try:
        (directory / "adapter.json").write_bytes(whole[: int(fraction * len(whole))])
        with pytest.raises(AdapterError, match=r"adapter\.json: .*the saved adapter is damaged"):
            load_adapter(directory, model)
    finally:
        (directory / "adapter.json").write_bytes(whole)
    assert load_adapter(directory, model).meta["calibration"]["gamma"] == 0.5
