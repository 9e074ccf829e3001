"""`classify --resume` appends only rows computed with the settings the output was written with (recorded next
to it in OUTPUT.clipzsl.json), identifies images by their resolved path, and says how much it skipped."""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipzsl import predictions
from clipzsl.images import image_key
from clipzsl.backends.hf import save_random_clip
from clipzsl.cli import main
from conftest import TINY
from test_persisted_files import edited, refused_or_unchanged


def make_images(folder, count):
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (24, 24), (i * 40 % 256, i * 90 % 256, 60)).save(folder / f"{i}.png")
    return sorted(str(p) for p in folder.iterdir())


def args(paths, tiny_clip, out, *extra, labels="cat,dog,car", top_k="2", templates="photo_1"):
    return ["classify", *map(str, paths), "--labels", labels, "--model", f"hf:{tiny_clip}", "--templates", templates,
            "--top-k", top_k, "--format", "jsonl", "--output", str(out), *extra]


def images_in(out):
    return [json.loads(line)["image"] for line in out.read_text().splitlines()]


@pytest.fixture
def half_done(tmp_path, tiny_clip):
    """An output with the first 3 of 6 images, as an interrupted run leaves it."""
    images = make_images(tmp_path / "imgs", 6)
    out = tmp_path / "out.jsonl"
    assert main(args(images[:3], tiny_clip, out)) == 0
    return images, out


@pytest.mark.parametrize("change, flag", [({"labels": "cat,dog,bird"}, "--labels"),
                                          ({"templates": "simple_7"}, "--templates"),
                                          ({"top_k": "3"}, "--top-k")])
def test_resume_with_other_settings_is_refused(half_done, tiny_clip, tmp_path, capsys, change, flag):
    images, out = half_done
    before = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'{"image": "torn')  # not even the torn last line is cut off: the output is not touched
    torn = out.read_bytes()
    assert main(args([tmp_path / "imgs"], tiny_clip, out, "--resume", **change)) == 2
    err = capsys.readouterr().err
    assert f"{out}: written with {flag} giving" in err and f"rerun with the {flag} it was written with" in err
    assert out.read_bytes() == torn and torn.startswith(before)


def test_resume_with_another_model_is_refused_and_with_the_same_weights_accepted(half_done, tiny_clip, tmp_path,
                                                                                 capsys):
    images, out = half_done
    other = save_random_clip(tmp_path / "other", seed=2, **TINY)
    before = out.read_bytes()
    command = args([tmp_path / "imgs"], tiny_clip, out, "--resume")
    command[command.index("--model") + 1] = f"hf:{other}"
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"{out}: written with --model giving hf:{tiny_clip} (weights hf:" in err and f"this run has hf:{other}" in err
    assert out.read_bytes() == before
    (tmp_path / "link").symlink_to(tiny_clip)  # the same weights under another spec: the same model
    command[command.index("--model") + 1] = f"hf:{tmp_path / 'link'}"
    assert main(command) == 0
    assert sorted(images_in(out)) == images


def test_output_without_its_settings_is_not_resumed(half_done, tiny_clip, tmp_path, capsys):
    images, out = half_done
    predictions.settings_path(str(out)).unlink()
    assert main(args([tmp_path / "imgs"], tiny_clip, out, "--resume")) == 2
    assert f"{out}: no out.jsonl.clipzsl.json next to it" in capsys.readouterr().err


def test_relative_and_absolute_folder_is_classified_once(tmp_path, tiny_clip, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "link.png").symlink_to(tmp_path / "imgs" / "0.png")
    out = tmp_path / "out.jsonl"
    assert main(args(["imgs", tmp_path / "imgs", "imgs/0.png"], tiny_clip, out)) == 0
    assert images_in(out) == [f"imgs/{i}.png" for i in range(4)]  # each once, as first named
    assert "7 of the paths given name images already given" in capsys.readouterr().err


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(["a", "b", "..", ".", "to_b", "f.png", "to_f.png"]), min_size=1, max_size=5))
def test_image_key_is_the_resolved_path(tmp_path_factory, parts):
    root = tmp_path_factory.mktemp("tree")
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.png").touch()
    (root / "a" / "to_b").symlink_to(root / "a" / "b")
    (root / "a" / "b" / "to_f.png").symlink_to(root / "a" / "b" / "f.png")
    path = os.path.join("a", *parts)
    assert image_key(path, str(root)) == os.path.realpath(root / path)


def test_resume_identifies_images_by_resolved_path_and_says_what_it_skipped(tmp_path, tiny_clip, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "imgs", 6)
    out = tmp_path / "out.jsonl"
    assert main(args([f"imgs/{i}.png" for i in range(2)], tiny_clip, out)) == 0  # relative, from tmp_path
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # resumed from another folder, with the absolute path
    capsys.readouterr()
    assert main(args([tmp_path / "imgs"], tiny_clip, out, "--resume")) == 0
    assert f"resuming: 2 of 6 images already in {out}, classifying the remaining 4" in capsys.readouterr().err
    keys = [os.path.realpath(os.path.join(tmp_path, name)) for name in images_in(out)]
    assert sorted(keys) == sorted(str(p) for p in (tmp_path / "imgs").iterdir())  # each image once


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_edit_of_the_settings_file_is_refused_or_changes_nothing(half_done, data):
    _, out = half_done
    path = predictions.settings_path(str(out))
    refused_or_unchanged(path, data.draw(edited(json.loads(path.read_text()))),
                         lambda: predictions.saved_settings(str(out)))
