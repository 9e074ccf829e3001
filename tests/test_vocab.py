"""WordNet noun label sets: parsing the real data.noun format, uniqueness, label-file round trip."""
from __future__ import annotations

import pytest

import clipzsl
from clipzsl import packages, vocab
from clipzsl.prompts import ClassEntry

# Lines in the format of WordNet 3.0's data.noun (pointer lists shortened; the last two
# synsets are made up to cover a case-only clash and a syntactic marker).
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  By obtaining, using  
  3   
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  
00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 + 00692347 v 0101 | a general concept formed by extracting common features from specific examples  
00064789 04 n 04 bell_ringer 0 bull's_eye 1 mark 1 home_run 1 003 @ 00063652 n 0000 ;u 07105475 n 0000 + 01062413 v 0302 | something that exactly succeeds in achieving its goal  
00074790 04 n 0b blunder 0 blooper 0 bloomer 0 bungle 0 pratfall 0 foul-up 0 fuckup 0 flub 0 botch 0 boner 0 boo-boo 0 019 @ 00070965 n 0000 | an embarrassing mistake  
00169305 04 n 01 bank 0 003 @ 00170844 n 0000 + 02039431 v 0101 ~ 00169522 n 0000 | a flight maneuver; aircraft tips laterally about its longitudinal axis (especially in turning)  
00187144 04 n 01 bull's_eye 0 001 @ 00186634 n 0000 | in target shooting: a score made by hitting the center of the target  
02787772 06 n 02 bank 0 bank_building 0 005 @ 03177349 n 0000 + 02343392 v 0101 | a building in which the business of banking transacted  
09213434 17 n 01 bank 0 003 @ 09409512 n 0000 ~ 09224725 n 0000 ~ 09421799 n 0000 | a long ridge or pile; "a huge bank of earth"  
99000001 18 n 04 Bank_Building 0 BLUNDER 0 bourse 0 Abstract_Entity 0 000 | made up: clashes with earlier lemmas in case only  
99000002 07 n 02 galore(a) 0 abundance 0 000 | made up: a lemma carrying a syntactic marker  
"""

EXPECTED = [
    ClassEntry("entity"),
    ClassEntry("abstraction", ("abstract entity",)),
    ClassEntry("bell ringer", ("mark", "home run")),  # "bull's eye" names a later synset
    ClassEntry("blunder", ("blooper", "bloomer", "bungle")),  # 11 lemmas (w_cnt 0b), 3 synonyms kept
    ClassEntry("bank"),
    ClassEntry("bull's eye"),
    ClassEntry("bank building"),  # first lemma "bank" taken: named by its next free lemma
    # 09213434 (only "bank") is skipped: nothing free
    ClassEntry("bourse"),  # the other lemmas are taken, case-insensitively
    ClassEntry("galore", ("abundance",)),
]


@pytest.fixture
def data_noun(tmp_path):
    path = tmp_path / "data.noun"
    path.write_text(DATA_NOUN, encoding="utf-8")
    return path


def test_parse_synsets_reads_the_real_format(data_noun):
    synsets = vocab.parse_synsets(data_noun.read_text().splitlines(keepends=True))
    assert len(synsets) == 10  # header lines skipped
    assert synsets[1] == ["abstraction", "abstract entity"]
    blunder = synsets[3]
    assert len(blunder) == 11 and blunder[0] == "blunder" and blunder[-1] == "boo-boo"
    assert synsets[5] == ["bull's eye"]
    assert synsets[-1] == ["galore", "abundance"]


def test_parse_synsets_rejects_a_short_line():
    with pytest.raises(ValueError, match="line 1"):
        vocab.parse_synsets(["00001740 03 n 03 entity 0 000 | too few words for w_cnt\n"])


def test_wordnet_nouns_unique_names_and_synonyms(data_noun):
    entries = vocab.wordnet_nouns(data_noun)
    assert entries == EXPECTED
    aliases = [a.casefold() for e in entries for a in (e.name, *e.synonyms)]
    assert len(aliases) == len(set(aliases))


def test_unique_entries_prefers_names_over_synonyms():
    # "cat" is a synonym of the first synset and the first lemma of the second; the third has no free lemma
    entries = vocab.unique_entries([["true cat", "cat", "felid"], ["cat", "caterpillar"], ["CAT", "TRUE CAT"]])  # third: skipped
    assert entries == [ClassEntry("true cat", ("felid",)), ClassEntry("cat", ("caterpillar",))]
    assert vocab.unique_entries([["a", "b", "c", "d", "e"]], max_synonyms=2) == [ClassEntry("a", ("b", "c"))]


def test_written_file_loads_to_the_same_entries(data_noun, tmp_path):
    entries = vocab.wordnet_nouns(data_noun)
    path = vocab.write_label_file(entries, tmp_path / "nouns.txt")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# WordNet")
    assert clipzsl.load_labels(str(path)) == entries


def test_write_label_file_refuses_unwritable_names(tmp_path):
    with pytest.raises(ValueError, match="cannot be written"):
        vocab.write_label_file([ClassEntry("a | b")], tmp_path / "x.txt")


def test_cli_writes_a_label_file(data_noun, tmp_path, capsys):
    out = tmp_path / "out.txt"
    assert vocab.main(["wordnet", "--out", str(out), "--data-noun", str(data_noun)]) == 0
    assert clipzsl.load_labels(str(out)) == EXPECTED
    assert f"{len(EXPECTED)} classes" in capsys.readouterr().out


def test_fetch_failure_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(vocab, "SYSTEM_DATA_NOUN", tmp_path / "absent" / "data.noun")
    monkeypatch.setattr(packages.shutil, "which", lambda name: None)  # no apt-get on this "machine"
    with pytest.raises(RuntimeError, match="apt-get install wordnet-base"):
        vocab.fetch_wordnet(tmp_path / "cache")


def test_fetch_uses_an_already_unpacked_package(tmp_path, monkeypatch, data_noun):
    monkeypatch.setattr(vocab, "SYSTEM_DATA_NOUN", tmp_path / "absent" / "data.noun")
    target = tmp_path / "cache" / "vocab" / "wordnet-base" / "root" / vocab.DEB_DATA_NOUN
    target.parent.mkdir(parents=True)
    target.write_bytes(data_noun.read_bytes())
    monkeypatch.setattr(vocab, "fetch_package", lambda *a: pytest.fail("fetched although the package was cached"))
    assert vocab.fetch_wordnet(tmp_path / "cache") == target


def test_unwritable_cache_is_a_runtime_error(tmp_path, monkeypatch):
    monkeypatch.setattr(vocab, "SYSTEM_DATA_NOUN", tmp_path / "absent" / "data.noun")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RuntimeError, match="cannot fetch wordnet-base"):
        vocab.fetch_wordnet(blocker)
