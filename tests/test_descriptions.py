"""Per-class descriptions (CuPL's format): read as labels or as templates, ensembled as CuPL and
CLIP_benchmark do, and cached by their content."""
import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clipzsl
from clipzsl import ClassEntry, PromptFileError, ZeroShotClassifier, load_labels, load_prompts, load_templates
from clipzsl.prompts import description_mapping, normalise_text
from test_cache_and_index import count_encoded

clip_benchmark_zs = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")

DESCRIBED = {
    "tabby": ["a tabby, a kind of cat: a cat with a grey or tawny coat mottled with black",
              "a photo of a tabby, a striped domestic cat."],
    "airliner": ["an airliner, a kind of airplane: a passenger aircraft", "a large airliner at a gate."],
    "espresso": ["espresso, a kind of coffee: strong black coffee brewed by forcing steam through ground beans"],
}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def cupl_subset(names, count=12):
    """The first `count` of CLIP_benchmark's own CuPL descriptions (its cupl_prompts.json) of some ImageNet classes."""
    from importlib import resources

    shipped = json.loads((resources.files("clip_benchmark") / "datasets" / "cupl_prompts.json").read_text())
    return {name: shipped["imagenet1k"][name][:count] for name in names}


# -- reading ---------------------------------------------------------------------------------------------------------


def test_description_file_is_a_label_set(tmp_path):
    entries = load_labels(write(tmp_path, "cupl.json", DESCRIBED))
    assert [(e.name, list(e.prompts)) for e in entries] == list(DESCRIBED.items())
    wrapped = load_labels(write(tmp_path, "wrapped.json", {"classes": DESCRIBED}))
    assert wrapped == entries
    nested = write(tmp_path, "cupl_prompts.json", {"imagenet1k": DESCRIBED, "other": {"x": ["y"]}})
    assert load_labels(f"{nested}:imagenet1k") == entries
    yaml_file = write(tmp_path, "cupl.yaml", "tabby:\n  - a tabby cat\n  - a striped cat\n")
    assert load_labels(yaml_file) == [ClassEntry("tabby", prompts=("a tabby cat", "a striped cat"))]


def test_clip_benchmarks_own_cupl_file_reads_with_its_key():
    from importlib import resources

    path = resources.files("clip_benchmark") / "datasets" / "cupl_prompts.json"
    shipped = json.loads(path.read_text())["imagenet1k"]
    entries = load_labels(f"{path}:imagenet1k")
    assert [e.name for e in entries] == list(shipped)
    # its GPT-3 answers have line breaks (each run of whitespace is one space, as CLIP's tokenizers read it)
    # and zero-width spaces (dropped, as from every label: `normalise_text`)
    assert any("\n" in t for texts in shipped.values() for t in texts)
    assert all(list(e.prompts) == [normalise_text(" ".join(t.split())) for t in shipped[e.name]]
               for e in entries)
    with pytest.raises(PromptFileError, match=r"a mapping without 'classes'.*:KEY.*Its keys: imagenet1k"):
        load_labels(path)  # a mapping of data sets: which one is for the user to say


@pytest.mark.parametrize("value, message", [
    ("a cat", r"class 'tabby': the descriptions must be a non-empty list of strings.*got 'a cat'; fix them"),
    ([], r"class 'tabby': the descriptions must be a non-empty list.*got an empty list"),
    (["a tabby", 3], r"class 'tabby': the descriptions must be a non-empty list of strings"),
    (["a tabby", "  "], r"class 'tabby'.*empty synonym or prompt in class 'tabby'; remove it"),
    (["a tabby\x00cat"], r"class 'tabby'.*control character U\+0000"),
])
def test_bad_descriptions_name_the_file_the_class_and_the_fix(tmp_path, value, message):
    path = write(tmp_path, "cupl.json", {"classes": {"tabby": value, "airliner": ["an airliner"]}})
    with pytest.raises(PromptFileError, match=re.escape(str(path)) + ".*" + message):
        load_labels(path)


def test_descriptions_repeating_a_class_or_a_key_are_refused(tmp_path):
    with pytest.raises(PromptFileError, match=r"cupl.json: key 'tabby' appears twice"):
        load_labels(write(tmp_path, "cupl.json", '{"tabby": ["a tabby"], "tabby": ["a tabby cat"]}'))
    with pytest.raises(PromptFileError, match=r"class 'Tabby'.*'tabby' of class 'Tabby' is already a class name"):
        load_labels(write(tmp_path, "case.json", {"tabby": ["a tabby"], "Tabby": ["a Tabby cat"]}))


def test_a_mapping_of_class_lists_is_not_read_as_descriptions(tmp_path):
    """CLIP_benchmark's en_classnames.json has the shape of a description file; no list names its key."""
    path = write(tmp_path, "en_classnames.json", {"cifar10": ["airplane", "cat"], "mnist": ["0", "1"]})
    assert description_mapping(json.loads(path.read_text())) is None
    with pytest.raises(PromptFileError, match=r"pick one as .*:KEY\. If it maps class names to descriptions "
                                              r"\(CuPL's format\), write it as \{\"classes\""):
        load_labels(path)


def test_description_file_as_templates(tmp_path):
    path = write(tmp_path, "cupl.json", {"imagenet1k": DESCRIBED})
    entries, templates = load_prompts(["espresso", "Tabby | tabby cat"], f"{path}:imagenet1k")
    assert templates == []
    assert [(e.name, e.synonyms, e.prompts) for e in entries] == [
        ("espresso", (), tuple(DESCRIBED["espresso"])), ("Tabby", ("tabby cat",), tuple(DESCRIBED["tabby"]))]
    with pytest.raises(PromptFileError, match=r"no descriptions for 2 of the 3 classes: 'tabbby', 'dog' "
                                              r"\(for 'tabbby', did you mean 'tabby'\?\); add them"):
        load_prompts(["tabbby", "airliner", "dog"], f"{path}:imagenet1k")
    with pytest.raises(PromptFileError, match=r"per-class descriptions \(CuPL's format\), not templates\. Give it as "
                                              r"the labels"):
        load_templates(f"{path}:imagenet1k")


def test_no_templates_needs_descriptions_for_every_class(tmp_path):
    described = load_labels(write(tmp_path, "cupl.json", DESCRIBED))
    assert load_prompts(described, []) == (described, [])
    with pytest.raises(PromptFileError, match=r"no templates, and no descriptions for 1 class\(es\) \('dog'\)"):
        load_prompts([*described, ClassEntry("dog")], [])
    # with templates, descriptions join the templated names (CuPL + the template ensemble)
    entries, templates = load_prompts(described, "photo_1")
    assert entries[0].texts(templates) == ["a photo of a tabby.", *DESCRIBED["tabby"]]


names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(names, st.lists(names, max_size=3), min_size=1, max_size=4))
def test_any_description_file_loads_or_says_why(tmp_path, mapping):
    path = write(tmp_path, "any.json", {"classes": mapping})
    try:
        entries = load_labels(path)
    except PromptFileError as err:
        assert str(path) in str(err)
        return
    assert [e.name for e in entries] == [normalise_text(name) for name in mapping]
    assert [e.prompts for e in entries] == [tuple(normalise_text(t) for t in texts) for texts in mapping.values()]


# -- ensembling: CLIP_benchmark's and CuPL's own classifier building ---------------------------------------------------


def clip_benchmark_weights(vit_b32, classnames, templates):
    model, _, tokenizer = vit_b32
    return clip_benchmark_zs.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu", amp=False).T


def test_descriptions_as_templates_match_clip_benchmarks_cupl_classifier(vit_b32, openclip_backend, tmp_path):
    descriptions = cupl_subset(["tench", "goldfish", "great white shark", "tiger shark"])
    path = write(tmp_path, "cupl_prompts.json", {"imagenet1k": descriptions})
    reference = clip_benchmark_weights(vit_b32, list(descriptions), descriptions)
    ours = ZeroShotClassifier(openclip_backend, labels=list(descriptions), templates=f"{path}:imagenet1k", cache=False)
    assert ours.templates == []
    torch.testing.assert_close(ours.class_embeddings, reference, atol=1e-5, rtol=0)
    # the same class embeddings from the description file as the labels, with no templates
    as_labels = ZeroShotClassifier(openclip_backend, labels=f"{path}:imagenet1k", templates=[], cache=False)
    torch.testing.assert_close(as_labels.class_embeddings, reference, atol=1e-5, rtol=0)


def test_descriptions_with_templates_are_one_mean_as_cupls_ensemble(vit_b32, openclip_backend, tmp_path):
    """CuPL + the template ensemble: one mean over the templated names and the descriptions together."""
    descriptions = cupl_subset(["tench", "goldfish", "hammerhead shark"], count=6)
    templates = load_templates("simple_7")
    both = {name: [t.replace("{}", name) for t in templates] + texts for name, texts in descriptions.items()}
    reference = clip_benchmark_weights(vit_b32, list(descriptions), both)
    ours = ZeroShotClassifier(openclip_backend, labels=write(tmp_path, "cupl.json", descriptions),
                              templates="simple_7", cache=False)
    torch.testing.assert_close(ours.class_embeddings, reference, atol=1e-5, rtol=0)


# -- the label cache keys on the descriptions ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def test_cache_encodes_descriptions_once_and_never_serves_stale_ones(tiny, tmp_path, monkeypatch):
    seen = count_encoded(tiny, monkeypatch)
    path = write(tmp_path, "cupl.json", DESCRIBED)
    first = ZeroShotClassifier(tiny, labels=path, templates=[], cache=tmp_path / "cache")
    assert sorted(seen) == sorted(t for texts in DESCRIBED.values() for t in texts)
    again = ZeroShotClassifier(tiny, labels=path, templates=[], cache=tmp_path / "cache")
    assert len(seen) == 5  # nothing encoded twice
    torch.testing.assert_close(again.class_embeddings, first.class_embeddings)
    # one description changed: that class alone is encoded again, and matches a build without the cache
    edited = {**DESCRIBED, "airliner": ["an airliner, a kind of airplane: a passenger aircraft", "a jet airliner."]}
    changed = ZeroShotClassifier(tiny, labels=write(tmp_path, "edited.json", edited), templates=[],
                                 cache=tmp_path / "cache")
    assert sorted(seen[5:]) == sorted(edited["airliner"])
    fresh = ZeroShotClassifier(tiny, labels=tmp_path / "edited.json", templates=[], cache=False)
    torch.testing.assert_close(changed.class_embeddings, fresh.class_embeddings)
    assert not torch.allclose(changed.class_embeddings[1], first.class_embeddings[1])
    torch.testing.assert_close(changed.class_embeddings[[0, 2]], first.class_embeddings[[0, 2]])
    # the same descriptions with templates are another class embedding, not the cached one
    with_templates = ZeroShotClassifier(tiny, labels=path, templates="photo_1", cache=tmp_path / "cache")
    assert not torch.allclose(with_templates.class_embeddings, first.class_embeddings)


def test_saved_classifier_keeps_its_descriptions(tiny, tmp_path):
    path = write(tmp_path, "cupl.json", {"imagenet1k": DESCRIBED})
    clf = ZeroShotClassifier(tiny, labels=list(DESCRIBED), templates=f"{path}:imagenet1k", cache=False)
    loaded = ZeroShotClassifier.load(clf.save(tmp_path / "clf.safetensors"), tiny, cache=False)
    assert loaded.entries == clf.entries and loaded.templates == []
    torch.testing.assert_close(loaded.class_embeddings, clf.class_embeddings)


def test_classify_command_takes_descriptions_as_labels_or_templates(tmp_path, tiny_clip, capsys):
    from PIL import Image

    from clipzsl.cli import main

    image = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    path = write(tmp_path, "cupl.json", DESCRIBED)
    for options in (["--labels", str(path)], ["--labels", "espresso,tabby", "--templates", str(path)]):
        code = main(["classify", str(image), *options, "--model", f"hf:{tiny_clip}", "--no-cache", "--format",
                     "json", "--top-k", "3"])
        assert code == 0
        [result] = json.loads(capsys.readouterr().out)
        assert {p["label"] for p in result["predictions"]} <= set(DESCRIBED)
    assert main(["classify", str(image), "--labels", "dog,cat", "--templates", str(path), "--model",
                 f"hf:{tiny_clip}", "--no-cache"]) == 2
    assert "no descriptions for 2 of the 2 classes: 'dog', 'cat'" in capsys.readouterr().err


def test_eval_zeroshot_takes_descriptions_as_templates(tmp_path, tiny):
    from PIL import Image

    from clipzsl.evaluation import zeroshot_evaluation
    from clipzsl.training import ClassFolders

    for k, name in enumerate(DESCRIBED):
        (tmp_path / "data" / name).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (32, 32), (60 * k + 20 * j, 90, 40)).save(tmp_path / "data" / name / f"{j}.png")
    path = write(tmp_path, "cupl.json", DESCRIBED)
    result = zeroshot_evaluation(ClassFolders.read(tmp_path / "data"), tiny, templates=str(path), cache_dir=False)
    clf = ZeroShotClassifier(tiny, labels=sorted(DESCRIBED), templates=str(path), cache=False)
    probs = clf.predict_proba(sorted(str(p) for p in (tmp_path / "data").rglob("*.png")))
    targets = [sorted(DESCRIBED).index(p.parent.name) for p in sorted((tmp_path / "data").rglob("*.png"))]
    assert result.record["metrics"]["acc1"] == pytest.approx(float((probs.argmax(1) == torch.tensor(targets)).float().mean()))
    assert clf.templates == [] and all(e.prompts for e in clf.entries)  # scored by the descriptions alone


def test_a_class_with_no_text_at_all_is_an_error_not_a_division_by_zero():
    with pytest.raises(PromptFileError, match="class 'dog' has no text to encode"):
        ClassEntry("dog").texts([])
