"""Label-set and template-set parsing, and the errors users see for bad files."""
import json

import pytest

from clipzsl import ClassEntry, PromptFileError, load_labels, load_templates
from clipzsl.prompts import LABELS_DIR, TEMPLATES_DIR


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_labels_with_comments_and_synonyms(tmp_path):
    path = write(tmp_path, "pets.txt", "# pets\n\ncat | kitty | house cat\n  dog  \n# end\n")
    assert load_labels(path) == [ClassEntry("cat", ("kitty", "house cat")), ClassEntry("dog")]


def test_json_and_yaml_labels(tmp_path):
    entries = [{"name": "cat", "synonyms": ["kitty"], "prompts": ["a small furry pet with whiskers"]}, "dog"]
    expected = [ClassEntry("cat", ("kitty",), ("a small furry pet with whiskers",)), ClassEntry("dog")]
    assert load_labels(write(tmp_path, "a.json", json.dumps(entries))) == expected
    assert load_labels(write(tmp_path, "b.json", json.dumps({"classes": entries}))) == expected
    yaml_text = "- name: cat\n  synonyms: [kitty]\n  prompts:\n    - a small furry pet with whiskers\n- dog\n"
    assert load_labels(write(tmp_path, "c.yaml", yaml_text)) == expected


def test_entry_texts_ensemble_names_synonyms_and_prompts():
    entry = ClassEntry("cat", ("kitty",), ("a small furry pet",))
    assert entry.texts(["a photo of a {}.", "{}"]) == [
        "a photo of a cat.", "cat", "a photo of a kitty.", "kitty", "a small furry pet"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("cat\ndog\nCat\n", r"dup.txt:3: 'cat' of class 'Cat' is already a class name or synonym at .*dup.txt:1"),
        ("cat | feline\nfeline\n", r"dup.txt:2: 'feline' .* at .*dup.txt:1"),
        ("cat\n | kitty\n", r"dup.txt:2: empty class name"),
        ("cat | \n", r"dup.txt:1: empty synonym"),
        ("# only a comment\n\n", r"dup.txt: no classes"),
    ],
)
def test_label_file_errors_name_file_and_line(tmp_path, text, message):
    with pytest.raises(PromptFileError, match=message):
        load_labels(write(tmp_path, "dup.txt", text))


def test_structured_label_errors(tmp_path):
    with pytest.raises(PromptFileError, match=r"bad.json:3: invalid JSON"):
        load_labels(write(tmp_path, "bad.json", '[\n"cat",\n"dog" "x"]'))
    with pytest.raises(PromptFileError, match=r"keys.json, entry 2: unknown key\(s\) \['synonym'\]"):
        load_labels(write(tmp_path, "keys.json", json.dumps(["cat", {"name": "dog", "synonym": ["puppy"]}])))
    with pytest.raises(PromptFileError, match=r"types.yaml, entry 1: 'synonyms' must be a list"):
        load_labels(write(tmp_path, "types.yaml", "- name: cat\n  synonyms: kitty\n"))
    with pytest.raises(PromptFileError, match=r"invalid YAML"):
        load_labels(write(tmp_path, "broken.yaml", "- name: [cat\n"))


def test_unknown_names_list_what_ships():
    with pytest.raises(PromptFileError, match=r"Unknown label set 'cifar11'.*cifar10.*imagenet1k"):
        load_labels("cifar11")
    with pytest.raises(PromptFileError, match=r"Unknown template set 'simple_8'.*openai_imagenet_80.*simple_7"):
        load_templates("simple_8")


def test_template_errors(tmp_path):
    with pytest.raises(PromptFileError, match=r"t.txt:3: template 'a photo' must contain"):
        load_templates(write(tmp_path, "t.txt", "# x\na photo of a {}.\na photo\n"))
    with pytest.raises(PromptFileError, match=r"templates\[1\]: template 'a {} {}'"):
        load_templates(["a {}.", "a {} {}"])
    with pytest.raises(PromptFileError, match="appears twice"):
        load_templates(["a {}.", "a {}."])
    with pytest.raises(PromptFileError, match="no templates"):
        load_templates([])


@pytest.mark.parametrize("name, count", [("openai_imagenet_80", 80), ("simple_7", 7), ("cifar_18", 18), ("photo_1", 1)])
def test_shipped_template_sets(name, count):
    templates = load_templates(name)
    assert len(templates) == count
    assert templates == load_templates(TEMPLATES_DIR / f"{name}.txt")


def test_simple_7_is_open_clips_subset():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    assert load_templates("simple_7") == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    assert load_templates("openai_imagenet_80") == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


@pytest.mark.parametrize("name, count", [("imagenet1k", 1000), ("cifar10", 10), ("cifar100", 100), ("fashion_mnist", 10)])
def test_shipped_label_sets_load(name, count):
    entries = load_labels(name)
    assert len(entries) == count
    assert entries == load_labels(LABELS_DIR / f"{name}.txt")


def test_every_shipped_file_is_valid():
    for path in sorted(TEMPLATES_DIR.glob("*.txt")):
        assert load_templates(path), path
    for path in sorted(LABELS_DIR.glob("*.*")):
        assert load_labels(path), path
