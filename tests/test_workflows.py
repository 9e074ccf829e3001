"""The workflows behind `clipzsl eval`, `train-adapter` and `cache`, called from Python: the same
splits, results, records, adapters and cache reports as the commands."""
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_adapter_faults import class_folders

import clipzsl
from clipzsl import evaluation as ev
from clipzsl import training
from clipzsl.cache import cache_info, clear_cache
from clipzsl.cli import main
from clipzsl.errors import InputError
from clipzsl.images import embed_images_cached
from clipzsl.store import EmbeddingStore, ForeignFolderError

FIVE = {"ant": 4, "bee": 4, "cat": 4, "dog": 4, "emu": 3}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPZSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- evaluation


def test_class_split_halves_each_class_and_trains_on_base_classes_only(tmp_path):
    data = class_folders(tmp_path / "data", FIVE)
    split = ev.class_split(data)
    assert split.names == ["ant", "bee", "cat", "dog", "emu"]
    assert (split.base, split.novel) == ([0, 1], [2, 3, 4])
    assert Counter(y for _, y in split.test) == {0: 2, 1: 2, 2: 2, 3: 2, 4: 2}  # emu's 3 images: 1 + 2
    assert sorted(y for _, y in split.train) == [0, 0, 1, 1]  # novel classes never train
    assert not {p for p, _ in split.train} & {p for p, _ in split.test}
    assert all(Path(p).parent.name == split.names[y] for p, y in split.train + split.test)
    assert split.summary() == "5 classes (2 base, 3 novel), 4 training images, 10 test"
    assert ev.class_split(data) == split  # seed 0: the same halves every run


def test_class_split_with_a_test_folder_keeps_the_classes_both_have(tmp_path):
    data = class_folders(tmp_path / "data", {"ant": 2, "bee": 2, "cat": 2, "dog": 2, "owl": 2})
    test = class_folders(tmp_path / "test", {"ant": 1, "bee": 1, "cat": 1, "dog": 1, "yak": 1})
    split = ev.class_split(data, test)
    assert split.names == ["ant", "bee", "cat", "dog"]
    assert [(Path(p).parent.name, y) for p, y in split.test] == [("ant", 0), ("bee", 1), ("cat", 2), ("dog", 3)]
    assert all(Path(p).is_relative_to(data) for p, _ in split.train) and len(split.train) == 4


@pytest.mark.parametrize("counts, message", [
    ({"ant": 2, "bee": 2, "cat": 2}, "has 3 class sub-folders with images"),
    ({"ant": 1, "bee": 1, "cat": 2, "dog": 2}, r"base classes \['ant', 'bee'\] have no training image"),
])
def test_class_split_refuses_data_it_cannot_score(tmp_path, counts, message):
    with pytest.raises(InputError, match=message):
        ev.class_split(class_folders(tmp_path / "data", counts))


def test_run_protocols_refuses_an_unknown_method_or_protocol_before_any_work(tmp_path):
    split = ev.class_split(class_folders(tmp_path / "data", FIVE))
    with pytest.raises(InputError, match=r"unknown methods \['nope'\]; known: \['zero-shot'"):
        ev.run_protocols(split, None, methods=["zero-shot", "nope"])  # the model is never reached
    with pytest.raises(InputError, match="unknown protocol 'zeroshot'"):
        ev.run_protocols(split, None, protocol="zeroshot")


def test_mean_std_leaves_out_runs_without_a_score():
    mean, std = ev.mean_std([0.5, math.nan, 0.7])
    assert (mean, std) == pytest.approx((0.6, 0.1))
    assert ev.mean_std([math.nan]) is None and ev.mean_std([]) is None
    results = {"m": [{"seed": 0, "b2n": {"base": 0.5, "novel": math.nan, "H": math.nan}},
                     {"seed": 1, "b2n": {"base": 0.7, "novel": math.nan, "H": math.nan}}]}
    assert ev.format_results(results, "b2n").splitlines() == [
        "base-to-novel        Base           Novel          H",
        f"{'m':<20} {'60.0 ± 10.0':<13}  {'n/a':<13}  {'n/a':<13}"]


def test_run_protocols_is_what_eval_writes_and_prints(tiny_clip, tmp_path, cache_dir, capsys):
    data = class_folders(tmp_path / "data", FIVE)
    assert main(["eval", str(data), "--model", f"hf:{tiny_clip}", "--seeds", "2", "--methods", "zero-shot,linear probe",
                 "--output", str(tmp_path / "ev.json")]) == 0
    printed = capsys.readouterr().out
    split = ev.class_split(data)
    results = ev.run_protocols(split, clipzsl.load_model(f"hf:{tiny_clip}"), methods=["zero-shot", "linear probe"],
                               seeds=2)
    assert (tmp_path / "ev.json").read_text() == json.dumps(results, indent=2)
    assert printed == split.summary() + "\n" + ev.format_results(results)
    zero_shot, probe = results["zero-shot"], results["linear probe"]
    assert [run["seed"] for run in zero_shot] == [0, 1] and set(zero_shot[0]) == {"seed", "b2n", "gzsl"}
    assert zero_shot[0]["b2n"] == zero_shot[1]["b2n"]  # no training: the seed changes nothing (but GZSL's gamma)
    assert math.isnan(probe[0]["b2n"]["novel"])  # a linear probe cannot score classes it did not train on
    probe_row = next(line for line in printed.splitlines() if line.startswith("linear probe"))
    base, novel, h = (probe_row[21 + 15 * i: 34 + 15 * i].strip() for i in range(3))  # the base-to-novel row
    mean, std = ev.mean_std([run["b2n"]["base"] for run in probe])
    assert novel == h == "n/a" and base == f"{100 * mean:.1f} ± {100 * std:.1f}"
    only_b2n = ev.run_protocols(split, clipzsl.load_model(f"hf:{tiny_clip}"), methods=["zero-shot"], seeds=1,
                                protocol="b2n")
    assert only_b2n == {"zero-shot": [{"seed": 0, "b2n": zero_shot[0]["b2n"]}]}


def test_zeroshot_evaluation_is_the_record_eval_writes(tiny_clip, tmp_path, cache_dir, capsys):
    data = class_folders(tmp_path / "data", FIVE)
    out = tmp_path / "record.json"
    assert main(["eval", str(data), "--protocol", "zeroshot", "--model", f"hf:{tiny_clip}", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    model = clipzsl.load_model(f"hf:{tiny_clip}")
    saved = tmp_path / "clf.safetensors"
    result = ev.zeroshot_evaluation(training.ClassFolders.read(data), model, save_classifier=saved)
    assert json.loads(out.read_text()) == result.record and result.failures == []
    assert printed == ev.format_zeroshot(result.record)
    assert (result.record["n_classes"], result.record["n_images"]) == (5, 19)
    assert printed.splitlines()[0] == f"zero-shot classification: {data}, 5 classes, 19 images, model hf:{tiny_clip}"
    reloaded = ev.zeroshot_evaluation(training.ClassFolders.read(data), model, load_classifier=saved)
    assert reloaded.record == result.record
    with pytest.raises(InputError, match="built with other templates than --templates 'photo_1'"):
        ev.zeroshot_evaluation(training.ClassFolders.read(data), model, load_classifier=saved, templates="photo_1")


# ---------------------------------------------------------------- training from a folder


def test_training_set_reads_the_seen_file_and_refuses_what_cannot_train(tmp_path):
    data = class_folders(tmp_path / "data", {"ant": 2, "red_car": 2, "emu": 2})
    seen = tmp_path / "seen.txt"
    seen.write_text("red_car\r\n\nant\n", encoding="utf-8")
    chosen = training.training_set(data, seen)
    assert chosen.seen == [0, 2] and chosen.folders.names == ["ant", "emu", "red car"]
    assert chosen.rows == [0, 1, 4, 5]
    assert training.training_set(data).seen == [0, 1, 2]
    seen.write_text("ant\nyak\n")
    with pytest.raises(InputError, match=r"seen.txt: classes not in .*line 2: 'yak'"):
        training.training_set(data, seen)
    seen.write_text("ant\n")
    with pytest.raises(InputError, match=r"seen.txt selects 1 class\(es\) with images \(\['ant'\]\)"):
        training.training_set(data, seen)
    with pytest.raises(InputError, match="give the seen classes once"):
        training.train_adapter_from_folder(chosen, None, tmp_path / "ad", seen=seen)


def test_adapter_grid_is_the_default_grid_unless_a_setting_is_given():
    assert training.adapter_grid() == training.DEFAULT_GRID and len(training.DEFAULT_GRID) == 3
    assert training.adapter_grid(lr=0.01) == ({"lr": 0.01, "consistency": 1.0},)
    assert training.adapter_grid(consistency=0.0) == ({"lr": 3e-3, "consistency": 0.0},)


@pytest.mark.parametrize("metric, said", [
    ("H", "validation H of base and pseudo-novel accuracy 0.750 at epoch 3"),
    ("base accuracy", "accuracy on held-out images of the 4 training classes (no pseudo-novel"),
    ("pseudo-novel accuracy", "accuracy on the 1 held-out seen classes (no held-out images"),
    (None, "no validation images (a class needs >= 2 images to hold one out), so the last epoch 3 of {} is kept"),
])
def test_describe_training_says_which_validation_score_chose(metric, said):
    info = {"val_metric": metric, "val_score": 0.75, "best_epoch": 3, "params": {}, "train_classes": 4,
            "val_classes": 1, "n_train": 12, "epoch_seconds": 0.5}
    line = training.describe_training("ad", info)
    assert line.startswith("ad: adapter trained on 5 classes, 12 images; ") and line.endswith(", 0.50 s/epoch")
    assert said in line


def test_train_adapter_from_folder_saves_the_adapter_the_command_saves(tiny_clip, tmp_path, cache_dir, capsys):
    # one image per class: no validation images, so every epoch trains and the last is kept
    data = class_folders(tmp_path / "data", {"ant": 1, "bee": 1, "cat": 1})
    (tmp_path / "seen.txt").write_text("ant\nbee\n")
    model = clipzsl.load_model(f"hf:{tiny_clip}")
    # the features cached first: a cached run reads tokens back as float16, the first run has them in float32
    embed_images_cached(model, [str(data / name / "0.png") for name in ("ant", "bee")], cache_dir)
    status = main(["train-adapter", str(data), "--out", str(tmp_path / "by-command"), "--seen",
                   str(tmp_path / "seen.txt"), "--model", f"hf:{tiny_clip}", "--epochs", "3", "--lr", "0.01"])
    printed = capsys.readouterr().out
    result, info = training.train_adapter_from_folder(data, model, tmp_path / "by-function", seen=tmp_path / "seen.txt",
                                                      grid=training.adapter_grid(lr=0.01), epochs=3)
    assert status == 0 and not info["untrained"] and info["val_metric"] is None and result.best_epoch == 3
    untimed = training.describe_training(tmp_path / "by-command", info).rsplit(", ", 1)[0]
    assert printed.startswith(untimed + ", ") and printed.endswith(" s/epoch\n")
    by_command, by_function = (json.loads((tmp_path / d / "adapter.json").read_text())
                               for d in ("by-command", "by-function"))
    for meta in (by_command, by_function):
        del meta["training"]["epoch_seconds"], meta["weights_sha256"]  # a timing, and the hash of a header holding it
    assert by_command == by_function and by_function["trained_labels"] == ["ant", "bee"]
    assert by_function["training"]["params"] == {"lr": 0.01, "consistency": 1.0} and "val_split" not in info
    weights = [load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("by-command", "by-function")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert float(weights[1]["alpha"]) != 0.0  # trained: the comparison is not of two initialisations
    assert clipzsl.train_adapter is training.fit_adapter  # the one-fit function under its former name


# ---------------------------------------------------------------- the cache


def fill_cache(root: Path) -> None:
    """A cache root with one label store, one damaged label folder, a concept file and an image-feature file."""
    EmbeddingStore(root / "labels" / "aa", "fp", 8, "hf:tiny").add(["cat", "dog"], np.eye(8, dtype=np.float32)[:2])
    (root / "labels" / "damaged").mkdir()
    (root / "labels" / "damaged" / "meta.json").write_text("{not json")
    (root / "conse-imagenet-minilm-0123456789abcdef.npy").write_bytes(b"x" * 2_000_000)
    (root / "image-features").mkdir()
    (root / "image-features" / "f.safetensors").write_bytes(b"y" * 10)


def test_cache_info_lists_every_cache_and_says_which_is_damaged(tmp_path):
    fill_cache(tmp_path / "c")
    info = cache_info(tmp_path / "c")
    good, damaged = info.label_caches
    assert (good.folder.name, good.spec, good.labels, good.fingerprint, good.damage) == ("aa", "hf:tiny", 2, "fp", None)
    assert good.size_bytes > 0 and damaged.folder.name == "damaged" and "meta.json" in damaged.damage
    assert [p.name for p in info.concept_files] == ["conse-imagenet-minilm-0123456789abcdef.npy"]
    assert [p.name for p in info.feature_files] == ["f.safetensors"]
    report = info.describe()
    assert f"label cache: {tmp_path / 'c' / 'labels'}\n  hf:tiny  2 labels  " in report
    assert "  damaged  damaged, unusable (" in report and "packaged concept embeddings: 1 file(s), 2.0 MB" in report
    assert report.endswith(f"image features ({tmp_path / 'c' / 'image-features'}): 1 file(s), 0.0 MB\n")


def test_clear_cache_deletes_every_cache_and_counts_them(tmp_path):
    fill_cache(tmp_path / "c")
    cleared = clear_cache(tmp_path / "c")
    assert (cleared.label_caches, cleared.concept_files, cleared.feature_files) == (2, 1, 1)
    assert cleared.describe() == (f"cleared 2 label cache(s), 1 packaged concept file(s) and 1 image-feature file(s) "
                                  f"under {tmp_path / 'c'}")
    info = cache_info(tmp_path / "c")
    assert (info.label_caches, info.concept_files, info.feature_files) == ([], [], [])
    assert clear_cache(tmp_path / "never-made").label_caches == 0  # nothing there: nothing to do, nothing made
    assert not (tmp_path / "never-made").exists()


def test_clear_cache_refuses_a_folder_clipzsl_did_not_make(tmp_path):
    folder = tmp_path / "documents"
    (folder / "labels" / "mine").mkdir(parents=True)
    (folder / "labels" / "mine" / "notes.txt").write_text("mine")
    (folder / "thesis.tex").write_text("mine")
    with pytest.raises(ForeignFolderError, match="not a folder clipzsl made"):
        clear_cache(folder)
    assert (folder / "labels" / "mine" / "notes.txt").exists() and (folder / "thesis.tex").exists()


def test_cache_dir_none_is_the_default_cache_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIPZSL_CACHE_DIR", str(tmp_path / "default"))
    fill_cache(tmp_path / "default")
    assert cache_info().root == tmp_path / "default" and len(cache_info().label_caches) == 2
    assert main(["cache", "info"]) == 0
    assert capsys.readouterr().out == cache_info().describe()
    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out.startswith("cleared 2 label cache(s), 1 packaged concept file(s)")
    assert cache_info().label_caches == []
