"""Command-line and API arguments: bad values refused up front, folders walked as users expect,
--adapter in classify, help and --version, and no progress bars a user did not ask for."""
import builtins
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import clipzsl
from clipzsl.adapter import CrossAttentionAdapter
from clipzsl.cli import build_parser, main
from clipzsl.images import ImageLoadError, NoImagesWarning, embed_images, expand_sources, load_image

MISSING_MODEL = "hf:/no/such/model"  # loading it fails at once: reaching it means the check came too late


def picture(path, seed=0, size=(48, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def usage_error(argv, capsys) -> str:
    """Run the CLI on arguments argparse must refuse; return what it printed."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith("usage: clipzsl")
    return err


# ---------------------------------------------------------------- 1. numbers and --output, refused up front


@pytest.mark.parametrize("argv", [
    ["classify", "x.png", "--labels", "a,b", "--model", MISSING_MODEL, "--batch-size", "0"],
    ["classify", "x.png", "--labels", "a,b", "--model", MISSING_MODEL, "--batch-size", "-4"],
    ["classify", "x.png", "--labels", "a,b", "--model", MISSING_MODEL, "--top-k", "0"],
    ["index", "images", "photos", "--out", "idx", "--model", MISSING_MODEL, "--batch-size", "0"],
    ["search", "idx", "a cat", "--top-k", "0"],
])
def test_non_positive_counts_are_usage_errors(argv, capsys):
    option, value = argv[-2:]
    assert f"argument {option}: must be at least 1, got {value}" in usage_error(argv, capsys)


def test_api_refuses_top_k_and_batch_size_below_one_before_any_work(tiny_clip, tmp_path):
    backend = clipzsl.load_model(f"hf:{tiny_clip}")
    image = str(picture(tmp_path / "a.png"))
    clf = clipzsl.ZeroShotClassifier(backend, labels=["cat", "dog"], cache=False)
    missing = str(tmp_path / "missing.png")  # had the images been read first, this would raise ImageLoadError
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        clf.predict(missing, top_k=0)
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        clf.predict(clf.embed(image), 0)
    adapter = CrossAttentionAdapter(backend.embed_dim)
    with_adapter = clipzsl.ZeroShotClassifier(backend, labels=["cat", "dog"], cache=False, adapter=adapter)
    with pytest.raises(ValueError, match="top_k must be at least 1, got -1"):
        with_adapter.predict(missing, top_k=-1)
    for batch_size in (0, -2):
        with pytest.raises(ValueError, match=f"batch_size must be at least 1, got {batch_size}"):
            embed_images(backend, missing, batch_size=batch_size)


@pytest.mark.parametrize("command", ["classify", "eval"])
def test_output_folder_or_missing_parent_is_refused_before_the_work(command, tmp_path, capsys):
    image = str(picture(tmp_path / "a.png"))
    argv = ["classify", image, "--labels", "a,b"] if command == "classify" else ["eval", str(tmp_path)]
    argv += ["--model", MISSING_MODEL]
    err = usage_error([*argv, "--output", str(tmp_path)], capsys)
    assert f"argument --output: {tmp_path} is a folder; give the path of a file in it" in err
    target = tmp_path / "no-such-folder" / "out.json"
    err = usage_error([*argv, "--output", str(target)], capsys)
    assert f"folder {target.parent} does not exist; create it first" in err


# ---------------------------------------------------------------- 2. folders


def test_symlinked_subfolders_are_followed_once_without_looping(tmp_path):
    real = tmp_path / "real"
    a = picture(real / "sub" / "a.png", 1)
    b = picture(real / "b.jpg", 2)
    library = tmp_path / "library"
    library.mkdir()
    (library / "photos").symlink_to(real, target_is_directory=True)
    (library / "photos2").symlink_to(real, target_is_directory=True)  # the same folder twice
    (real / "back").symlink_to(library, target_is_directory=True)  # a loop: real -> library -> real
    picture(library / "own.png", 3)
    # every image once, in sorted order; photos2 and photos/back lead to folders already walked
    assert expand_sources(library) == [str(library / "own.png"), str(library / "photos" / "b.jpg"),
                                       str(library / "photos" / "sub" / "a.png")]
    assert expand_sources(real) == [str(b), str(real / "back" / "own.png"), str(a)]


def test_folder_without_images_warns_naming_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("no pictures here")
    for folder in (empty, notes):
        with pytest.warns(NoImagesWarning, match=f"{folder}: no image files") as caught:
            assert expand_sources(folder) == []
        assert caught[0].message.folder == str(folder)


def test_classify_with_no_images_exits_1_before_loading_the_model(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["classify", str(empty), "--labels", "cat,dog", "--model", MISSING_MODEL]) == 1
    out, err = capsys.readouterr()
    assert out == ""  # no empty table
    assert f"clipzsl: warning: {empty}: no image files" in err
    assert f"clipzsl: error: no images to classify in {empty}" in err


def test_classify_and_index_with_one_empty_folder_classify_the_rest_and_exit_1(tiny_clip, tmp_path, capsys):
    photos, empty = tmp_path / "photos", tmp_path / "empty"
    picture(photos / "a.png")
    empty.mkdir()
    code = main(["classify", str(photos), str(empty), "--labels", "cat,dog", "--model", f"hf:{tiny_clip}",
                 "--no-cache", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 1
    assert [r["image"] for r in json.loads(out)] == [str(photos / "a.png")]
    assert f"clipzsl: warning: {empty}: no image files" in err
    code = main(["index", "images", str(photos), str(empty), "--out", str(tmp_path / "idx"),
                 "--model", f"hf:{tiny_clip}"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "1 images (1 added" in out
    assert f"clipzsl: warning: {empty.resolve()}: no image files" in err


def test_unreadable_file_is_permission_denied_not_corrupt(tmp_path, monkeypatch):
    """Simulated, since the tests may run as root, whom file permissions do not stop."""
    path = picture(tmp_path / "locked.png")
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(ImageLoadError, match="permission denied") as info:
        load_image(path)
    assert info.value.source == str(path)
    assert "corrupt" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_permission_denied_for_real(tmp_path):
    path = picture(tmp_path / "locked.png")
    path.chmod(0)
    try:
        with pytest.raises(ImageLoadError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


# ---------------------------------------------------------------- 3. classify --adapter


def test_classify_with_adapter_matches_the_python_api(tiny_clip, tmp_path, capsys):
    backend = clipzsl.load_model(f"hf:{tiny_clip}")
    folder = tmp_path / "pics"
    images = [str(picture(folder / f"{i}.png", seed=i, size=(40 + 8 * i, 48))) for i in range(3)]
    (folder / "broken.png").write_text("not an image")  # skipped, the rest still classified
    torch.manual_seed(0)
    adapter = CrossAttentionAdapter(backend.embed_dim, heads=4)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))
        adapter.alpha.fill_(1.0)
    adapter.save(tmp_path / "ad", backend)
    labels = ["cat", "dog", "car", "tree"]
    code = main(["classify", str(folder), "--labels", ",".join(labels), "--model", f"hf:{tiny_clip}", "--no-cache",
                 "--adapter", str(tmp_path / "ad"), "--top-k", "3", "--format", "json", "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == 1 and f"skipped {folder / 'broken.png'}" in err
    cli = {r["image"]: [(p["label"], p["probability"]) for p in r["predictions"]] for r in json.loads(out)}
    assert list(cli) == images
    adapted = clipzsl.ZeroShotClassifier(backend, labels=labels, cache=False, adapter=tmp_path / "ad").predict(images, 3)
    plain = clipzsl.ZeroShotClassifier(backend, labels=labels, cache=False).predict(images, 3)
    for image, want, zero_shot in zip(images, adapted, plain):
        assert [label for label, _ in cli[image]] == [label for label, _ in want]
        np.testing.assert_allclose([p for _, p in cli[image]], [p for _, p in want], atol=1e-5)
        assert not np.allclose(sorted(p for _, p in cli[image]), sorted(p for _, p in zero_shot), atol=1e-3)


def test_classify_adapter_not_an_adapter_or_for_another_model(tiny_clip, tmp_path, capsys):
    image = str(picture(tmp_path / "a.png"))
    argv = ["classify", image, "--labels", "cat,dog", "--no-cache"]
    err = usage_error([*argv, "--model", MISSING_MODEL, "--adapter", str(tmp_path)], capsys)
    assert f"argument --adapter: {tmp_path}: no adapter.json in it, so not a saved clipzsl adapter" in err
    err = usage_error([*argv, "--model", MISSING_MODEL, "--adapter", str(tmp_path / "nothing")], capsys)
    assert "no such folder, so not a saved clipzsl adapter" in err
    CrossAttentionAdapter(32).save(tmp_path / "other", fingerprint="some-other-backbone")
    assert main([*argv, "--model", f"hf:{tiny_clip}", "--adapter", str(tmp_path / "other")]) == 2
    assert "clipzsl: error: adapter" in capsys.readouterr().err


# ---------------------------------------------------------------- 4. help and --version


def subcommands(parser):
    (action,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return action.choices


def test_every_option_says_what_it_does_and_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapping inside a default
    parser = build_parser()
    for name, sub in [("clipzsl", parser), *subcommands(parser).items()]:
        text = sub.format_help()
        for action in sub._actions:
            if action.__class__.__name__ in ("_HelpAction", "_SubParsersAction", "_VersionAction"):
                continue
            where = f"{name} {action.option_strings or action.dest}"
            assert action.help and action.help.strip(), f"{where} has no help"
            if action.option_strings and action.default is not None and action.default is not False:
                assert f"(default: {action.default})" in text, f"{where}: default {action.default!r} not shown"


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"clipzsl {clipzsl.__version__}"


# ---------------------------------------------------------------- 5. quiet by default


def test_loading_an_hf_model_draws_no_progress_bar(tiny_clip, capsys):
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    clipzsl.load_model(f"hf:{tiny_clip}")
    assert "Loading weights" not in capsys.readouterr().err
    # only for the load: transformers' bars are as they were afterwards
    assert hf_logging.is_progress_bar_enabled() == enabled
    if enabled:
        for _ in hf_logging.tqdm(range(2), desc="after loading"):
            pass
        assert "after loading" in capsys.readouterr().err


def test_packaged_classify_prints_one_line_for_the_one_off_build(tmp_path):
    image = picture(tmp_path / "a.png")
    env = {**os.environ, "CLIPZSL_CACHE_DIR": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "clipzsl.cli", "classify", str(image), "--labels", "cat,dog"]
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert len(lines) == 1, first.stderr  # no "Loading weights", no "prompts" bar
    assert lines[0].startswith("clipzsl: building the packaged model's ImageNet concept embeddings (one-off")
    assert lines[0].endswith(str(next((tmp_path / "cache").glob("conse-imagenet-*.npy"))))
    second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0 and second.stderr == ""
    assert second.stdout == first.stdout
