"""Saved adapters that are damaged, and class-folder data sets too small or with empty classes:
each is refused with one clear error (or a warning) naming the file or folder, never a wrong answer."""
import hashlib
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from clipzsl.adapter import AdapterError, CrossAttentionAdapter
from clipzsl.images import EmbeddedImages
from clipzsl.training import TrainConfig, fit_with_selection, folder_dataset
from clipzsl.cli import main


def saved_adapter(directory, dim=16, fingerprint="fp-test"):
    torch.manual_seed(0)
    adapter = CrossAttentionAdapter(dim, heads=4)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.save(directory, fingerprint=fingerprint)
    return adapter


def flip_data(path):
    blob = bytearray(path.read_bytes())
    blob[-40:-8] = bytes(b ^ 0xFF for b in blob[-40:-8])  # tensor data sits after the JSON header
    path.write_bytes(bytes(blob))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_header(path):
    blob = bytearray(path.read_bytes())
    blob[10:30] = bytes(b ^ 0xFF for b in blob[10:30])
    path.write_bytes(bytes(blob))


def test_save_records_the_weights_checksum(tmp_path):
    saved_adapter(tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / "ad" / "adapter.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", [flip_data, truncate, flip_header])
def test_damaged_weights_raise_one_clear_error(tmp_path, damage):
    saved_adapter(tmp_path / "ad")
    damage(tmp_path / "ad" / "adapter.safetensors")
    with pytest.raises(AdapterError, match=r"ad/adapter\.safetensors: .*retrain it") as info:
        CrossAttentionAdapter.load(tmp_path / "ad")
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_adapter_without_checksum_still_loads_but_nan_weights_are_refused(tmp_path):
    adapter = saved_adapter(tmp_path / "ad")
    config = tmp_path / "ad" / "adapter.json"
    meta = json.loads(config.read_text())
    meta.pop("weights_sha256", None)  # as adapters saved before the checksum was recorded (format version 1)
    meta["version"] = 1
    config.write_text(json.dumps(meta))
    weights = tmp_path / "ad" / "adapter.safetensors"  # whose header held only the backbone fingerprint
    save_file(load_file(str(weights)), str(weights), metadata={"fingerprint": "fp-test"})
    loaded = CrossAttentionAdapter.load(tmp_path / "ad")
    for (k, v), (k2, v2) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)

    state = load_file(str(weights))
    state["q.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(AdapterError, match=r"adapter\.safetensors: non-finite values .*q\.weight"):
        CrossAttentionAdapter.load(tmp_path / "ad")
    state = load_file(str(weights))
    del state["q.weight"]
    save_file(state, str(weights))
    with pytest.raises(AdapterError, match=r"do not fit the config .*missing \['q\.weight'\]"):
        CrossAttentionAdapter.load(tmp_path / "ad")


def test_cli_explain_with_a_damaged_adapter_exits_2(tiny_clip, tmp_path, capsys):
    import clipzsl

    backend = clipzsl.load_model(f"hf:{tiny_clip}")
    saved_adapter(tmp_path / "ad", dim=backend.embed_dim, fingerprint=backend.fingerprint)
    flip_data(tmp_path / "ad" / "adapter.safetensors")
    Image.new("RGB", (40, 30), (200, 40, 40)).save(tmp_path / "red.png")
    code = main(["explain", str(tmp_path / "red.png"), "--labels", "cat,dog", "--adapter", str(tmp_path / "ad"),
                 "--model", f"hf:{tiny_clip}", "--out", str(tmp_path / "ex")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.splitlines()[-1]  # after the model's loading progress bar
    assert last.startswith("clipzsl: error: ") and "adapter.safetensors" in last and "retrain" in last
    assert not list((tmp_path / "ex").glob("*.png"))


# ---------------------------------------------------------------- data sets


def class_folders(root, counts):
    """root/<class>/<j>.png with counts[class] small generated images each."""
    rng = np.random.default_rng(0)
    for k, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for j in range(n):
            arr = np.full((32, 32, 3), 40 * k, np.uint8) + rng.integers(0, 30, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{j}.png")
    return root


def test_empty_class_folder_is_left_out_with_a_warning(tmp_path):
    data = class_folders(tmp_path / "data", {"cat": 2, "empty_one": 0, "dog": 2})
    with pytest.warns(UserWarning, match="empty_one: no images"):
        names, paths, labels = folder_dataset(data)
    assert names == ["cat", "dog"] and labels == [0, 0, 1, 1]
    assert all("empty_one" not in p for p in paths)
    class_folders(tmp_path / "none", {"a": 0, "b": 0})
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none: none of its 2 class sub-folders"):
        folder_dataset(tmp_path / "none")


def test_cli_train_adapter_refuses_a_single_class(tmp_path, capsys):
    data = class_folders(tmp_path / "data", {"cat": 4})
    # the data set is checked before any model is loaded: this spec would fail if it got that far
    code = main(["train-adapter", str(data), "--out", str(tmp_path / "ad"), "--model", "hf:/no/such/model"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"clipzsl: error: {data} has 1 class") and "at least 2" in err
    assert not (tmp_path / "ad").exists()


def test_fit_with_selection_refuses_a_single_seen_class():
    g = torch.Generator().manual_seed(0)
    feats = EmbeddedImages(F.normalize(torch.randn(6, 16, generator=g), dim=-1), torch.randn(6, 4, 16, generator=g))
    with pytest.raises(ValueError, match="at least 2 seen classes"):
        fit_with_selection(feats, [0] * 6, F.normalize(torch.randn(3, 16, generator=g), dim=-1), [0], 10.0)


def test_without_validation_images_the_last_epoch_is_kept():
    # one image per class: nothing can be held out, so every epoch would score the same
    g = torch.Generator().manual_seed(0)
    feats = EmbeddedImages(F.normalize(torch.randn(2, 16, generator=g), dim=-1), torch.randn(2, 4, 16, generator=g))
    text = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    result, info = fit_with_selection(feats, [0, 1], text, [0, 1], 10.0, grid=[{"lr": 1e-2}],
                                      base=TrainConfig(epochs=3, patience=1))
    assert info["val_metric"] is None and info["n_val_base"] == info["n_val_novel"] == 0
    assert result.best_epoch == 3 and float(result.adapter.alpha.detach()) != 0.0


def test_cli_train_adapter_on_two_classes_says_what_its_validation_score_is(tiny_clip, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("CLIPZSL_CACHE_DIR", str(tmp_path / "cache"))
    data = class_folders(tmp_path / "data", {"cat": 5, "dog": 5})
    status = main(["train-adapter", str(data), "--out", str(tmp_path / "ad"), "--model", f"hf:{tiny_clip}",
                   "--epochs", "1", "--lr", "0.01"])
    out = capsys.readouterr().out
    assert "validation H" not in out
    assert "validation accuracy on held-out images of the 2 training classes" in out and "pseudo-novel" in out
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert status == (1 if meta["training"]["untrained"] else 0)  # a random tiny model may not beat epoch 0
    assert meta["training"]["val_metric"] == "base accuracy" and meta["training"]["val_classes"] == 0


@pytest.mark.parametrize("counts, test_counts, expected", [
    ({"cat": 4}, None, "has 1 class sub-folders"),
    ({"cat": 4, "dog": 4, "owl": 4}, {"cat": 2, "dog": 2, "emu": 2}, "share 2 class sub-folders"),
    ({"ant": 1, "bee": 1, "cat": 2, "dog": 2}, None, r"base classes \['ant', 'bee'\] have no training image"),
])
def test_cli_eval_refuses_data_it_cannot_score(tmp_path, capsys, counts, test_counts, expected):
    data = class_folders(tmp_path / "data", counts)
    args = ["eval", str(data), "--model", "hf:/no/such/model", "--seeds", "1", "--methods", "zero-shot,ours"]
    if test_counts:
        args += ["--test", str(class_folders(tmp_path / "test", test_counts))]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"clipzsl: error: {data}") and len(err.splitlines()) == 1
    assert re.search(expected, err)
