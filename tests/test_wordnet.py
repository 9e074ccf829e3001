"""Label files from WordNet (Debian's wordnet-base, read through nltk), checked against the dictionary's
own files and WordNet's documentation."""
import gzip
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("nltk", reason="the wordnet extra (nltk) is not installed")

from clipzsl import InputError, PromptFileError, load_labels, load_prompts  # noqa: E402
from clipzsl.cli import main  # noqa: E402
from clipzsl.wordnet import LEXNAMES, lexnames_text, wordnet_dir, wordnet_labels, write_wordnet_labels  # noqa: E402

DICT = Path(os.environ.get("WNSEARCHDIR") or "/usr/share/wordnet")
pytestmark = pytest.mark.skipif(not (DICT / "index.noun").is_file(),
                                reason="WordNet's dictionary is absent: apt-get install wordnet-base")


def first_noun_gloss(word: str) -> str:
    """The gloss of `word`'s first noun sense, read from index.noun and data.noun without nltk (wndb(5WN))."""
    key = word.replace(" ", "_").lower() + " n "
    with open(DICT / "index.noun", encoding="utf-8") as index:
        fields = next(line for line in index if line.startswith(key)).split()
    synsets = int(fields[2])
    first_offset = fields[-synsets]
    with open(DICT / "data.noun", "rb") as data:
        data.seek(int(first_offset))
        line = data.readline().decode("utf-8")
    return line.split(" | ", 1)[1].strip()


def test_lexnames_are_wordnets_documented_list():
    page = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not page.is_file():
        pytest.skip("wordnet-base's lexnames(5WN) page is absent")
    documented = re.findall(r"^(\d\d)\s+(\w+\.\w+)\s", gzip.decompress(page.read_bytes()).decode(), re.MULTILINE)
    assert [name for _, name in documented] == LEXNAMES
    assert [int(number) for number, _ in documented] == list(range(45))
    first, last = lexnames_text().splitlines()[0], lexnames_text().splitlines()[-1]
    assert (first, last) == ("00\tadj.all\t3", "44\tadj.ppl\t3")


def test_first_noun_sense_with_its_definition_and_hypernyms():
    found = wordnet_labels(["tabby", "airliner", "golden retriever", "sneaker"])
    tabby, airliner, retriever, sneaker = found.senses
    assert (tabby.synset, tabby.senses, tabby.others) == ("tabby.n.01", 2, ("tabby.n.02",))
    assert tabby.hypernyms == ("domestic cat", "cat")  # of domestic cat's parents, cat is deeper than domestic animal
    for chosen, word in zip(found.senses, ["tabby", "airliner", "golden retriever", "sneaker"]):
        assert first_noun_gloss(word).startswith(chosen.definition)
    assert sneaker.synset == "gym_shoe.n.01" and sneaker.also == "gym shoe"
    assert found.descriptions["tabby"][:2] == [
        "a tabby, a kind of domestic cat: a cat with a grey or tawny coat mottled with black.",
        "a photo of a tabby, which is a cat with a grey or tawny coat mottled with black."]
    assert found.descriptions["airliner"][2] == "a photo of an airliner, a kind of airplane."
    assert retriever.senses == 1 and "golden retriever" not in found.describe()
    assert "tabby: tabby.n.01 (a cat with a grey or tawny coat mottled with black); first of 2 noun senses" \
        in found.describe()


def test_a_place_takes_no_article():
    [paris] = wordnet_labels(["Paris"]).senses
    assert paris.proper and paris.descriptions()[2] == "a photo of Paris, a kind of national capital."


def test_unknown_names_are_listed_or_skipped(tmp_path):
    with pytest.raises(InputError, match=r"not in WordNet as nouns: 'xyzzy', 'qwertyuiop'; check the spelling.*"
                                         r"--skip-unknown"):
        wordnet_labels(["tabby", "xyzzy", "qwertyuiop"])
    found = wordnet_labels(["tabby", "xyzzy"], skip_unknown=True)
    assert [s.name for s in found.senses] == ["tabby"] and found.unknown == ["xyzzy"]
    assert "left out, not in WordNet: 'xyzzy'" in found.describe()
    with pytest.raises(InputError, match="none of the names is in WordNet"):
        wordnet_labels(["xyzzy"], skip_unknown=True)
    # a name WordNet lacks is looked up by its synonyms
    assert wordnet_labels(["xyzzy | tabby cat"]).senses[0].synset == "tabby.n.01"
    with pytest.raises(InputError, match=r"names given twice \(case-insensitively\): 'Tabby', 'tabby'"):
        wordnet_labels(["tabby", "Tabby"])


def test_missing_dictionary_says_how_to_install_it(tmp_path):
    with pytest.raises(InputError, match=rf"not in {re.escape(str(tmp_path))} \(no index.noun or data.noun\); "
                                         r"install it with `apt-get install wordnet-base`"):
        wordnet_labels(["tabby"], directory=tmp_path)
    assert wordnet_dir(DICT) == DICT.resolve()


def test_without_a_folder_the_dictionary_is_the_one_vocab_finds(monkeypatch):
    from clipzsl import vocab

    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    assert wordnet_dir() == vocab.fetch_wordnet().parent.resolve()  # one place finds (or fetches) WordNet


def test_written_file_is_a_label_set_and_a_templates_source(tmp_path):
    out = tmp_path / "wn.json"
    found = write_wordnet_labels(["tabby", "espresso", "sneaker"], out)
    assert json.loads(out.read_text()) == found.descriptions
    entries = load_labels(out)
    assert [(e.name, list(e.prompts)) for e in entries] == list(found.descriptions.items())
    entries, templates = load_prompts(["espresso", "tabby"], out)
    assert templates == [] and list(entries[0].prompts) == found.descriptions["espresso"]


def test_a_failed_run_leaves_the_file_as_it_was(tmp_path):
    out = tmp_path / "wn.json"
    out.write_text("{}")
    with pytest.raises(InputError):
        write_wordnet_labels(["xyzzy"], out)
    assert out.read_text() == "{}"


words = st.sampled_from(["cat", "tabby", "airliner", "coat", "bank", "espresso", "xyzzy", "Golden Retriever"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(words, st.text(min_size=1, max_size=12)), min_size=1, max_size=5))
def test_any_names_give_a_readable_file_or_say_why(tmp_path, names):
    out = tmp_path / "any.json"
    try:
        found = write_wordnet_labels(names, out, skip_unknown=True)
    except (InputError, PromptFileError) as err:
        assert str(err)
        return
    assert [e.name for e in load_labels(out)] == [s.name for s in found.senses]


# -- the command ------------------------------------------------------------------------------------------------------


def test_command_writes_the_file_and_reports_the_senses(tmp_path, capsys):
    out = tmp_path / "wn.json"
    assert main(["labels", "wordnet", "tabby", "golden retriever", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tabby: tabby.n.01" in printed and f"wrote {out}" in printed and "2 classes described" in printed
    assert list(json.loads(out.read_text())) == ["tabby", "golden retriever"]
    names = tmp_path / "names.txt"
    names.write_text("# classes\nairliner\nxyzzy\n")
    assert main(["labels", "wordnet", "--from", str(names), "--skip-unknown", "--out", str(out)]) == 0
    assert list(json.loads(out.read_text())) == ["airliner"]
    assert main(["labels", "wordnet", "--from", str(names), "--out", str(out)]) == 2
    assert "not in WordNet as nouns: 'xyzzy'" in capsys.readouterr().err
    assert main(["labels", "wordnet", "tabby", "--from", str(names), "--out", str(out)]) == 2
    assert "not both and not neither" in capsys.readouterr().err
