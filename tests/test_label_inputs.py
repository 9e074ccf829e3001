"""What users bring as labels and templates: typos, repeats, BOMs, odd types, CLIP_benchmark files."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipzsl
from clipzsl import ClassEntry, PromptFileError, load_labels, load_templates
from clipzsl.cli import main
from clipzsl.cli.options import labels_argument
from clipzsl.prompts import LABELS_DIR, MAX_TEXT_CHARS

# the shapes of CLIP_benchmark's en_classnames.json and en_zeroshot_classification_templates.json
CB_CLASSNAMES = {
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "imagenet1k": ["tench", "missile", "goldfish", "missile", "sunglasses", "sunglasses"],
}
CB_TEMPLATES = {
    "cifar10": ["a photo of a {c}.", "a blurry photo of a {c}."],
    "mnist": ['a photo of the number: "{c}".'],
}


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


# -- 1. a name or path that resolves to nothing is an error, not a one-class list --------------------------------


@pytest.mark.parametrize("spec", ["cifar11", "mylabels.txt", "dir/x"])
def test_cli_unknown_set_or_missing_file_fails(spec, tmp_path, image, tiny_clip, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["classify", str(image), "--labels", spec, "--model", f"hf:{tiny_clip}", "--no-cache"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"Unknown label set '{spec}'" in err and str(Path.cwd() / spec) in err  # the path tried
    assert "cifar10, cifar100, demo, fashion_mnist, imagenet1k" in err  # the shipped sets
    if spec == "cifar11":
        assert f"{LABELS_DIR / 'cifar11'}{{.txt" in err and "Did you mean 'cifar10'" in err


def test_missing_file_suggests_a_close_sibling(tmp_path):
    write(tmp_path, "mylabel.txt", "cat\ndog\n")
    with pytest.raises(PromptFileError, match=re.escape(f"Did you mean '{tmp_path / 'mylabel.txt'}'")):
        load_labels(tmp_path / "mylabels.txt")


def test_labels_argument_comma_means_list(tmp_path):
    assert labels_argument("cifar11") == "cifar11"  # no comma: a set name or path, resolved (or refused) later
    assert labels_argument("golden retriever") == "golden retriever"
    assert labels_argument("cat,") == ["cat"]  # how to write a single label
    assert labels_argument("cat, dog") == ["cat", "dog"]
    odd = write(tmp_path, "a,b.txt", "cat\ndog\n")
    assert labels_argument(str(odd)) == str(odd)  # an existing file keeps its comma


def test_one_label_is_refused_for_softmax_models(tiny, image, tiny_clip, capsys):
    with pytest.raises(ValueError, match=r"one label \('cat'\).*softmax.*at least two labels"):
        clipzsl.ZeroShotClassifier(tiny, labels=["cat"], cache=False)
    assert main(["classify", str(image), "--labels", "cat,", "--model", f"hf:{tiny_clip}", "--no-cache"]) == 2
    assert "one label ('cat')" in capsys.readouterr().err


def test_one_label_is_scored_by_a_sigmoid_model(tiny, image, monkeypatch):
    monkeypatch.setattr(tiny, "probability", "sigmoid")
    clf = clipzsl.ZeroShotClassifier(tiny, labels=["cat"], templates="photo_1", cache=False)
    [[(label, p)]] = clf.predict(image, top_k=1)
    assert label == "cat" and 0 < p < 1  # an independent score, not a softmax's 100%


# -- 2. repeated names in a list keep one column each, with one warning -----------------------------------------


def test_repeated_names_in_a_list_warn_once_and_keep_order():
    names = ["missile", "cat", "missile", "Cat", "dog"]
    with pytest.warns(UserWarning) as record:
        entries = load_labels(names)
    assert [e.name for e in entries] == names
    assert len(record) == 1
    message = str(record[0].message)
    assert "'missile' at labels[0] and labels[2]" in message
    assert "'cat' at labels[1] and 'Cat' at labels[3]" in message
    assert "dog" not in message


def test_classifier_keeps_a_column_per_repeated_name(tiny, image, tmp_path):
    names = ["missile", "cat", "missile", "dog"]
    with pytest.warns(UserWarning, match="repeats 1 name"):
        cached = clipzsl.ZeroShotClassifier(tiny, labels=names, templates="photo_1", cache=tmp_path / "c")
    with pytest.warns(UserWarning):
        uncached = clipzsl.ZeroShotClassifier(tiny, labels=names, templates="photo_1", cache=False)
    assert cached.labels == names and cached.class_embeddings.shape[0] == 4
    torch.testing.assert_close(cached.class_embeddings, uncached.class_embeddings)
    torch.testing.assert_close(cached.class_embeddings[0], cached.class_embeddings[2])
    scores = cached.predict_proba(image)
    assert scores.shape == (1, 4) and np.isclose(scores.sum(), 1.0)
    assert np.isclose(scores[0, 0], scores[0, 2])
    [top] = cached.predict(image, top_k=4)
    assert sorted(label for label, _ in top) == sorted(names)
    assert np.isclose(sum(p for _, p in top), 1.0)  # the repeated column is counted in the normaliser
    by_label = {}
    for label, p in top:
        by_label.setdefault(label, []).append(p)
    assert len(by_label["missile"]) == 2 and np.isclose(*by_label["missile"])
    assert np.isclose(by_label["cat"][0], scores[0, 1]) and np.isclose(by_label["missile"][0], scores[0, 0])


def test_cli_comma_list_with_a_repeat(image, tiny_clip, capsys):
    code = main(["classify", str(image), "--labels", "cat,dog,cat", "--model", f"hf:{tiny_clip}",
                 "--no-cache", "--format", "json", "--top-k", "3"])
    assert code == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("clipzsl: warning:")]
    assert len(warnings) == 1 and "'cat' at labels[0] and labels[2]" in warnings[0]
    [result] = json.loads(captured.out)
    assert sorted(p["label"] for p in result["predictions"]) == ["cat", "cat", "dog"]


# -- 3. BOMs, non-text names, lengths ----------------------------------------------------------------------------


def test_byte_order_mark_is_stripped(tmp_path):
    bom = "\ufeff"
    expected = [ClassEntry("cat"), ClassEntry("dog")]
    assert load_labels(write(tmp_path, "l.txt", bom + "cat\ndog\n")) == expected
    assert load_labels(write(tmp_path, "l.json", bom + '["cat", "dog"]')) == expected
    assert load_labels(write(tmp_path, "l.yaml", bom + "- cat\n- dog\n")) == expected
    assert load_templates(write(tmp_path, "t.txt", bom + "a photo of a {}.\n")) == ["a photo of a {}."]
    assert load_templates(write(tmp_path, "t.json", bom + '["a photo of a {}."]')) == ["a photo of a {}."]


@pytest.mark.parametrize(
    "name, shown",
    [(["cat", "kitty"], "list"), ({"en": "cat"}, "dict"), (5, "int"), (2.5, "float"), (True, "bool")],
)
def test_non_string_names_are_refused_with_the_entry(tmp_path, name, shown):
    entries = [{"name": "dog"}, {"name": name}]
    with pytest.raises(PromptFileError, match=rf"l.json, entry 2: 'name' must be a string, got {shown}"):
        load_labels(write(tmp_path, "l.json", json.dumps(entries)))


@pytest.mark.parametrize("value", ["yes", "no", "1984"])
def test_unquoted_yaml_scalars_are_refused_not_renamed(tmp_path, value):
    """YAML 1.1 reads `no` as False and `1984` as a number: say so instead of a class 'False' or '1984'."""
    with pytest.raises(PromptFileError, match=r"l.yaml, entry 2: .*quote it"):
        load_labels(write(tmp_path, "l.yaml", f"- name: dog\n- name: {value}\n"))
    with pytest.raises(PromptFileError, match=r"m.yaml, entry 1: .*quote it"):
        load_labels(write(tmp_path, "m.yaml", f"- {value}\n- dog\n"))


def test_overlong_label_is_refused_with_its_line(tmp_path, image, tiny_clip, capsys):
    fine = "a" * MAX_TEXT_CHARS
    assert load_labels([fine, "dog"])[0].name == fine
    path = write(tmp_path, "long.txt", "cat\n" + "b" * (10 * 2**20) + "\ndog\n")
    with pytest.raises(PromptFileError, match=r"long.txt:2: class name 'b+\.\.\. has 10,485,760 characters"):
        load_labels(path)
    assert main(["classify", str(image), "--labels", str(path), "--model", f"hf:{tiny_clip}", "--no-cache"]) == 2
    assert len(capsys.readouterr().err) < 1000  # not echoed to the terminal
    with pytest.raises(PromptFileError, match=r"labels\[1\]: synonym or prompt .* has 1,001 characters"):
        load_labels(["cat", {"name": "dog", "prompts": ["c" * (MAX_TEXT_CHARS + 1)]}])


def test_overlong_template_is_refused_with_its_line(tmp_path):
    long = "a photo of a {} " + "x" * MAX_TEXT_CHARS
    with pytest.raises(PromptFileError, match=r"t.txt:2: template 'a photo.*\.\.\. has 1,016 characters"):
        load_templates(write(tmp_path, "t.txt", f"a photo of a {{}}.\n{long}\n"))


# -- 4. CLIP_benchmark's formats ---------------------------------------------------------------------------------


def test_templates_with_c_placeholder(tmp_path):
    expected = ["a photo of a {}.", "a blurry photo of a {}."]
    assert load_templates(write(tmp_path, "t.txt", "a photo of a {c}.\na blurry photo of a {c}.\n")) == expected
    assert load_templates(["a photo of a {c}.", "a blurry photo of a {}."]) == expected
    with pytest.raises(PromptFileError, match="appears twice"):
        load_templates(["a {c}.", "a {}."])
    with pytest.raises(PromptFileError, match="exactly once"):
        load_templates(["a {c} and a {}."])


def test_clip_benchmark_classnames_json(tmp_path):
    path = write(tmp_path, "en_classnames.json", json.dumps(CB_CLASSNAMES))
    assert [e.name for e in load_labels(f"{path}:cifar10")] == CB_CLASSNAMES["cifar10"]
    with pytest.warns(UserWarning, match=r"'missile' at entry 2 and entry 4; 'sunglasses' at entry 5 and entry 6"):
        assert [e.name for e in load_labels(f"{path}:imagenet1k")] == CB_CLASSNAMES["imagenet1k"]
    with pytest.raises(PromptFileError, match=r"no data set 'cifar11'\. Did you mean 'cifar10'.*cifar10, imagenet1k"):
        load_labels(f"{path}:cifar11")
    with pytest.raises(PromptFileError, match=rf"a mapping without 'classes'.*{re.escape(str(path))}:KEY.*imagenet1k"):
        load_labels(path)
    with pytest.raises(PromptFileError, match=r"picks a data set from a mapping, but this file holds a list"):
        load_labels(f"{write(tmp_path, 'list.json', json.dumps(['cat', 'dog']))}:cifar10")


def test_clip_benchmark_templates_json(tmp_path):
    path = write(tmp_path, "en_zeroshot_classification_templates.json", json.dumps(CB_TEMPLATES))
    assert load_templates(f"{path}:cifar10") == ["a photo of a {}.", "a blurry photo of a {}."]
    assert load_templates(f"{path}:mnist") == ['a photo of the number: "{}".']
    with pytest.raises(PromptFileError, match=r"a mapping without 'templates'.*KEY.*keys: cifar10, mnist"):
        load_templates(path)  # today: "line 1: template '{'"
    with pytest.raises(PromptFileError, match=r"no data set 'svhn'.*keys: cifar10, mnist"):
        load_templates(f"{path}:svhn")
    assert load_templates(write(tmp_path, "plain.json", '["a {c}.", "the {}."]')) == ["a {}.", "the {}."]


def test_cli_with_clip_benchmark_files(tmp_path, image, tiny_clip, capsys):
    names = write(tmp_path, "names.json", json.dumps(CB_CLASSNAMES))
    templates = write(tmp_path, "templates.json", json.dumps(CB_TEMPLATES))
    code = main(["classify", str(image), "--labels", f"{names}:cifar10", "--templates", f"{templates}:cifar10",
                 "--model", f"hf:{tiny_clip}", "--no-cache", "--format", "json", "--top-k", "10"])
    assert code == 0
    [result] = json.loads(capsys.readouterr().out)
    assert sorted(p["label"] for p in result["predictions"]) == sorted(CB_CLASSNAMES["cifar10"])


# -- the same kind of defect elsewhere in the parser -------------------------------------------------------------


def test_template_with_another_brace_pair_is_refused(tmp_path):
    with pytest.raises(PromptFileError, match=r"t.txt:1: template 'a \{label\} photo of a \{\}.' has '\{label\}'"):
        load_templates(write(tmp_path, "t.txt", "a {label} photo of a {}.\n"))
    with pytest.raises(PromptFileError, match=r"has '\}'"):
        load_templates(["a photo of a {}}."])


def test_utf16_without_bom_is_refused_not_read_as_garbage(tmp_path):
    with pytest.raises(PromptFileError, match=r"l.txt:1: class name .* control character U\+0000.*UTF-16"):
        load_labels(write(tmp_path, "l.txt", "cat\ndog\n", encoding="utf-16-le"))
    with pytest.raises(PromptFileError, match=r"t.txt:2: class name '0\\tdog' .* U\+0009"):
        load_labels(write(tmp_path, "t.txt", "cat\n0\tdog\n"))  # a tab-separated index file


def test_undecodable_structured_file_names_the_file(tmp_path):
    with pytest.raises(PromptFileError, match=r"bad.json: not UTF-8 text"):
        load_labels(write(tmp_path, "bad.json", b'["caf\xe9"]'))
    with pytest.raises(PromptFileError, match=r"u16.txt: not UTF-8 text .*UTF-16"):
        load_labels(write(tmp_path, "u16.txt", "cat\n", encoding="utf-16"))


@pytest.mark.parametrize("value, shown", [({"kitty": 1}, r"\{'kitty': 1\}"), (5, "5")])
def test_synonyms_must_be_a_list(value, shown):
    with pytest.raises(PromptFileError, match=rf"labels\[0\]: 'synonyms' must be a list of strings, got {shown}"):
        load_labels([{"name": "cat", "synonyms": value}, "dog"])


def test_yaml_templates_file_is_parsed_not_read_as_lines(tmp_path):
    path = write(tmp_path, "t.yaml", "- a photo of a {}.\n- a drawing of a {c}.\n")
    assert load_templates(path) == ["a photo of a {}.", "a drawing of a {}."]


def test_label_file_of_unknown_type_is_refused(tmp_path):
    with pytest.raises(PromptFileError, match=r"l.csv: a label file must end in .txt, .json, .yaml, .yml"):
        load_labels(write(tmp_path, "l.csv", "- cat\n- dog\n"))
