"""One normalisation of every input before any comparison (issue 19, section 3).

Labels, synonyms and templates are NFC, without invisible characters, with one space per run of
spaces; lines end at \\n or \\r\\n only; repeats are found after that. Comma lists are read by one
function in the CLI and the service, however long.
"""
from __future__ import annotations

import contextlib
import json
import re
import unicodedata
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clipzsl
from clipzsl import PromptFileError, load_labels, load_templates
from clipzsl.cli import main
from clipzsl.cli.options import labels_argument
from clipzsl.prompts import normalise_text

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: what hides in copied text without changing how it looks
INVISIBLE = ["\u200b", "\ufeff", "\u2060", "\u00ad", "\u200e", "\u200f"]
SPACES = [" ", "  ", "\u00a0", "\u3000", "\u2009", " \u00a0 "]
#: what str.splitlines ends a line at besides \n and \r\n
ODD_LINE_ENDS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r"]

word = st.text(st.sampled_from("abcxyzéèüßñçåøłżğ中猫犬ÉÅ"), min_size=1, max_size=8)
plain_name = st.lists(word, min_size=1, max_size=3).map(lambda words: unicodedata.normalize("NFC", " ".join(words)))


@st.composite
def disguised(draw, text: str) -> str:
    """`text` as it may arrive: NFD or NFC, invisible characters and odd spaces in and around it."""
    text = unicodedata.normalize(draw(st.sampled_from(["NFC", "NFD"])), text)
    chars = [draw(st.sampled_from(SPACES)) if c == " " else c for c in text]
    for _ in range(draw(st.integers(0, 3))):
        chars.insert(draw(st.integers(0, len(chars))), draw(st.sampled_from(INVISIBLE)))
    return draw(st.sampled_from(["", " ", "\u00a0"])) + "".join(chars) + draw(st.sampled_from(["", " ", "\u200b"]))


@FAST
@given(data=st.data(), name=plain_name)
def test_a_disguised_name_is_the_plain_name(data, name):
    shown = data.draw(disguised(name))
    assert load_labels([shown, "zzz dog"])[0].name == name
    assert normalise_text(shown) == name


@FAST
@given(data=st.data(), name=plain_name)
def test_a_name_and_its_disguise_are_one_class(data, name, tmp_path_factory):
    shown = data.draw(disguised(name))
    with pytest.warns(UserWarning, match=r"repeats 1 name.*labels\[0\] and labels\[1\]"):
        assert len(load_labels([name, shown])) == 2  # a list keeps a column each, and says so
    path = tmp_path_factory.mktemp("l") / "l.txt"
    path.write_text(f"{name}\n{shown}\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match=r"l.txt:2: .* is already a class name or synonym at .*l.txt:1"):
        load_labels(path)


@FAST
@given(text=st.text(st.characters(codec="utf-8"), max_size=30))
def test_any_text_is_refused_or_named_by_its_normal_form(text):
    """Any Unicode, control characters included: a PromptFileError, or the name is the normal form, which
    is NFC, has no invisible characters and no space but single ones inside, and normalises to itself."""
    try:
        [entry] = load_labels([text.replace(",", "").replace("|", "")])
    except PromptFileError:
        return
    name = entry.name
    assert name == normalise_text(name) == unicodedata.normalize("NFC", name)
    assert name == name.strip() and "  " not in name and not set(name) & set(INVISIBLE)


def test_nfc_and_nfd_cafe_and_a_zero_width_space_are_repeats(tmp_path):
    """The issue's two examples: today each pair is two distinct classes."""
    for pair in (["café", unicodedata.normalize("NFD", "café")], ["cat", "cat\u200b"]):
        path = tmp_path / "l.txt"
        path.write_text("\n".join(pair) + "\n", encoding="utf-8")
        with pytest.raises(PromptFileError, match=r"l.txt:2: .* already a class name"):
            load_labels(path)


def test_joiners_stay_where_a_script_needs_them():
    """ZWJ/ZWNJ build emoji sequences and Persian words; beside ASCII or at an end they are noise."""
    scientist, persian = "👩\u200d🔬", "می\u200cخواهم"
    assert [e.name for e in load_labels([scientist, persian, "cat\u200d", "\u200cdog"])] == \
        [scientist, persian, "cat", "dog"]


@FAST
@given(names=st.lists(plain_name, min_size=2, max_size=5, unique_by=lambda n: n.casefold()),
       ends=st.lists(st.sampled_from(["\n", "\r\n"]), min_size=5, max_size=5),
       odd=st.sampled_from(ODD_LINE_ENDS), at=st.integers(0, 4))
def test_only_newline_and_crlf_end_a_line(names, ends, odd, at, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lines")
    text = "".join(name + end for name, end in zip(names, ends))
    (folder / "l.txt").write_text(text, encoding="utf-8", newline="")
    assert [e.name for e in load_labels(folder / "l.txt")] == names
    line = at % len(names)
    broken = list(names)
    broken[line] = f"{names[line]}{odd}{names[line]}"
    (folder / "odd.txt").write_text("\n".join(broken) + "\n", encoding="utf-8", newline="")
    code = f"U+{ord(odd):04X}"
    with pytest.raises(PromptFileError, match=rf"odd.txt:{line + 1}: class name .* {re.escape(code)}"):
        load_labels(folder / "odd.txt")  # today: one more class, the name split in two


@FAST
@given(data=st.data(), words=st.lists(word, min_size=1, max_size=3))
def test_templates_are_normalised_before_repeats_are_found(data, words):
    template = unicodedata.normalize("NFC", " ".join(words)) + " of a {}."
    shown = data.draw(disguised(template))
    assert load_templates([shown]) == [template]
    with pytest.raises(PromptFileError, match="appears twice"):
        load_templates([template, shown])


def test_template_lines_end_at_newline_only(tmp_path):
    (tmp_path / "t.txt").write_bytes("a photo of a {}.\u2028a drawing of a {}.\r\nthe {}.\n".encode())
    with pytest.raises(PromptFileError, match=r"t.txt:1: template .* U\+2028"):
        load_templates(tmp_path / "t.txt")


# -- duplicate keys in JSON and YAML --------------------------------------------------------------------


@pytest.mark.parametrize("name, text, where", [
    ("l.json", '{"classes": ["cat", "dog"], "classes": ["car", "bus"]}', r"l.json: key 'classes'"),
    ("e.json", '[{"name": "cat", "synonyms": ["kitty"], "name": "dog"}]', r"e.json: key 'name'"),
    ("l.yaml", "classes:\n  - cat\n  - dog\nclasses:\n  - car\n", r"l.yaml:4: key 'classes'"),
    ("e.yaml", "- name: cat\n  synonyms: [kitty]\n- name: dog\n  name: wolf\n", r"e.yaml:4: key 'name'"),
])
def test_duplicate_keys_are_refused_with_file_and_key(tmp_path, name, text, where):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(PromptFileError, match=where + r" appears twice in one mapping"):
        load_labels(tmp_path / name)  # today: the last value wins, silently


def test_duplicate_data_sets_in_a_templates_mapping_are_refused(tmp_path):
    (tmp_path / "t.json").write_text('{"cifar10": ["a {c}."], "mnist": ["b {c}."], "cifar10": ["c {c}."]}')
    with pytest.raises(PromptFileError, match=r"t.json: key 'cifar10' appears twice"):
        load_templates(f"{tmp_path / 't.json'}:cifar10")


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    (tmp_path / "m.yaml").write_text("base: &b {name: cat, synonyms: [kitty]}\nclasses:\n  - <<: *b\n    name: dog\n")
    assert load_labels(tmp_path / "m.yaml") == [clipzsl.ClassEntry("dog", ("kitty",))]


# -- comma lists: one reading, any length ----------------------------------------------------------------


def test_a_long_comma_list_is_a_list_not_a_file_name(tmp_path, tiny_clip, capsys):
    names = [f"class number {i}" for i in range(50)]
    value = ",".join(names)
    assert len(value) > 255
    assert labels_argument(value) == names  # today: OSError "File name too long"
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    assert main(["classify", str(image), "--labels", value, "--model", f"hf:{tiny_clip}", "--no-cache",
                 "--format", "json", "--top-k", "50"]) == 0
    assert sorted(p["label"] for p in json.loads(capsys.readouterr().out)[0]["predictions"]) == sorted(names)
    long_name = "x" * 300  # no comma: a set's name or a file, and neither exists
    assert main(["classify", str(image), "--labels", long_name, "--model", f"hf:{tiny_clip}", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "Unknown label set 'xxx" in err and "File name too long" not in err
    with pytest.raises(PromptFileError, match="Unknown template set"):
        load_templates("y" * 300)


@pytest.fixture(scope="module")
def service(tiny_clip):
    pytest.importorskip("fastapi", reason="the service needs the serve extra")
    from fastapi.testclient import TestClient

    from clipzsl.serve import Limits, create_app

    app = create_app(clipzsl.load_model(f"hf:{tiny_clip}"), {}, {}, cache=False, limits=Limits(max_labels=100))
    with TestClient(app) as client:
        yield client


names_text = st.lists(st.one_of(plain_name, st.sampled_from(["", " ", "\u00a0"])), min_size=1, max_size=8)


@FAST
@given(parts=names_text, data=st.data())
def test_cli_and_service_read_a_comma_list_alike(parts, data, service):
    """One reading (`parse_label_list`, then `load_labels`' normalisation) on both sides, errors included."""
    text = ",".join(data.draw(disguised(p)) if p.strip() else p for p in parts) + ","
    svc = service.app.state.service
    expected = [p for p in parts if p.strip()]
    if not expected:
        for read in (lambda: load_labels(labels_argument(text)), lambda: svc.labels(text)):
            with pytest.raises(PromptFileError, match="no label names between the commas"):
                read()
        return
    with pytest.warns(UserWarning) if len({p.casefold() for p in expected}) < len(expected) else _quiet():
        assert [e.name for e in load_labels(labels_argument(text))] == expected
    with pytest.warns(UserWarning) if len({p.casefold() for p in expected}) < len(expected) else _quiet():
        assert [e.name for e in svc.labels(text)] == expected


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_service_takes_a_long_comma_list_and_odd_template_lines(service):
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(out, "PNG")
    names = [f"class number {i}" for i in range(50)]
    files = {"image": ("x.png", out.getvalue(), "image/png")}
    response = service.post("/classify", files=files, data={"labels": ",".join(names), "top_k": "50"})
    assert response.status_code == 200, response.text
    assert sorted(p["label"] for p in response.json()["predictions"]) == sorted(names)
    two = service.post("/classify", files=files, data={"labels": "cat,dog", "templates": "a {}.\r\nthe {}.\r\n"})
    assert two.status_code == 200, two.text
    split = service.post("/classify", files=files, data={"labels": "cat,dog", "templates": "a {}.\u2028the {}."})
    assert split.status_code == 422 and "U+2028" in split.json()["detail"]  # today: two templates


def test_a_16bit_upload_scores_as_its_8bit_rendering(service):
    """Over HTTP (images.decode_image, then to_rgb): today a 16-bit PNG scores as an all-white image."""
    import io

    import numpy as np
    from PIL import Image

    gray = np.tile(np.linspace(0, 255, 48).astype(np.uint8), (48, 1))
    gray[:24] = gray[:24, ::-1]

    def upload(image: Image.Image) -> dict:
        out = io.BytesIO()
        image.save(out, "PNG")
        response = service.post("/classify", files={"image": ("x.png", out.getvalue(), "image/png")},
                                data={"labels": "cat,dog,car,tree", "top_k": "4"})
        assert response.status_code == 200, response.text
        return {p["label"]: p["probability"] for p in response.json()["predictions"]}

    sixteen = upload(Image.frombytes("I;16", (48, 48), (gray.astype("<u2") * 257).tobytes()))
    eight, white = upload(Image.fromarray(gray)), upload(Image.new("L", (48, 48), 255))
    assert sixteen == pytest.approx(eight, abs=1e-4)
    assert sixteen != pytest.approx(white, abs=1e-4)


@pytest.fixture(scope="module")
def searchable(tiny_clip, tmp_path_factory):
    """An index of three images, and the service searching it."""
    pytest.importorskip("fastapi", reason="the service needs the serve extra")
    from fastapi.testclient import TestClient
    from PIL import Image

    from clipzsl.serve import create_app

    photos = tmp_path_factory.mktemp("photos")
    for name, colour in {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}.items():
        Image.new("RGB", (40, 40), colour).save(photos / f"{name}.png")
    model = clipzsl.load_model(f"hf:{tiny_clip}")
    index = clipzsl.ImageIndex(tmp_path_factory.mktemp("idx") / "index", model)
    index.update(photos, progress=False)
    with TestClient(create_app(model, {"photos": index.directory}, {}, cache=False)) as client:
        yield index, client


@FAST
@given(data=st.data(), query=plain_name)
def test_a_disguised_search_query_is_the_plain_query(data, query, searchable):
    """A query is normalised as labels are: a pasted zero-width space or BOM changes no score."""
    index, client = searchable
    shown = data.draw(disguised(query))
    expected = index.search(query, top_k=3)
    assert index.search(shown, top_k=3) == expected
    body = client.post("/search", json={"text": shown, "top_k": 3}).json()
    assert [(r["path"], pytest.approx(r["score"], abs=1e-5)) for r in body["results"]] == \
        [(p, pytest.approx(s, abs=1e-5)) for p, s in expected]


@pytest.mark.parametrize("blank", [" ", "\u200b", "\ufeff \u00a0", "\u2060\u200b"])
def test_a_blank_search_query_is_refused_not_answered(blank, searchable, capsys):
    """Today an empty query (only spaces or invisible characters) returns hits with status 0 / HTTP 200."""
    index, client = searchable
    with pytest.raises(PromptFileError, match="empty once spaces and invisible characters are removed"):
        index.search(blank)
    response = client.post("/search", json={"text": blank})
    assert response.status_code == 422 and "empty" in response.json()["detail"]
    assert main(["search", str(index.directory), blank]) == 2
    err = capsys.readouterr().err
    assert "query" in err and "Traceback" not in err
