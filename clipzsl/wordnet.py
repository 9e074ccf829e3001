"""Label files from WordNet: per-class descriptions (CuPL's format) with no network.

Each name is looked up as a noun; its first noun synset (WordNet's most frequent sense) gives a
definition and one or two hypernyms, and a few fixed patterns turn them into descriptions such as
"a tabby, a kind of cat: a cat with a grey or tawny coat mottled with black". The file written,
``{"tabby": ["...", ...], ...}``, is a label file (`prompts.load_labels`) whose descriptions are
ensembled with or without templates (`prompts.load_prompts`).

The dictionary is Debian's wordnet-base ($WNSEARCHDIR, WordNet's own setting, else the one `vocab`
finds: the system's, or the package fetched once into the cache), read through nltk (the `wordnet` extra). Two differences from nltk's own data are bridged without
writing anywhere: the dictionary lacks the `lexnames` file nltk reads first, so its 45 entries come
from WordNet's documentation (`man 5 lexnames`); and nltk reads only corpora under its data roots, so
the dictionary folder is registered on `nltk.data.path` (nltk's own way to authorise a corpus in a
custom place: it only lets nltk read that read-only folder).
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError, MissingExtra
from .prompts import LabelsArg, load_labels
from .store import atomic_write
from .vocab import fetch_wordnet

__all__ = ["Sense", "WordNetLabels", "wordnet_dir", "wordnet_labels", "write_wordnet_labels"]

#: WordNet 3.0's lexicographer files in file-number order (`man 5 lexnames`), the file Debian leaves out
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation "
    "noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception "
    "verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
#: lexnames' third field: the syntactic category of a file's synsets
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_INSTALL = ("install it with `apt-get install wordnet-base` (Debian, Ubuntu), or set WNSEARCHDIR to a WordNet 3.0 "
            "dictionary folder (the one holding index.noun and data.noun)")


def lexnames_text() -> str:
    """The `lexnames` file of WordNet 3.0: number, name and syntactic category, tab-separated."""
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def wordnet_dir(directory: str | os.PathLike | None = None) -> Path:
    """The dictionary folder: `directory`, else $WNSEARCHDIR, else the one of `vocab.fetch_wordnet` (the
    system's wordnet-base, else the package fetched into the cache); an InputError that says how to
    install it when it holds no noun dictionary."""
    path = Path(directory or os.environ.get("WNSEARCHDIR") or fetch_wordnet().parent)
    missing = [name for name in ("index.noun", "data.noun") if not (path / name).is_file()]
    if missing:
        raise InputError(f"WordNet's dictionary is not in {path} (no {' or '.join(missing)}); {_INSTALL}.")
    return path.resolve()


@functools.cache
def _reader(path: Path) -> Any:
    """nltk's WordNet reader over the dictionary folder `path` (read once per process: a few seconds)."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as err:
        raise MissingExtra("WordNet labels need nltk: pip install 'clipzsl[wordnet]'") from err

    class DictionaryReader(WordNetCorpusReader):
        """The reader with WordNet's documented lexnames, and no mapping to other WordNet versions (only
        the multilingual functions, which need nltk's own data, use it)."""

        def open(self, fileid):
            return io.StringIO(lexnames_text()) if fileid == "lexnames" else super().open(fileid)

        def map_wn(self, version="wordnet"):
            return None

    if str(path) not in nltk.data.path:
        nltk.data.path.append(str(path))
    with warnings.catch_warnings():  # "the multilingual functions are not available": not used here
        warnings.simplefilter("ignore")
        return DictionaryReader(str(path), None)


@dataclass(frozen=True)
class Sense:
    """The synset chosen for a name: its id, definition, hypernyms (nearest first), and how many noun
    senses the name has (more than one: the first, WordNet's most frequent, was taken)."""

    name: str
    synset: str
    definition: str
    hypernyms: tuple[str, ...]
    senses: int
    others: tuple[str, ...] = ()  # the other senses' ids, for the report
    also: str = ""  # another lemma of the synset ("gym shoe" for "sneaker"), "" when it has none
    proper: bool = False  # an instance (Paris, Einstein): no article before the name

    def descriptions(self) -> list[str]:
        """The class's descriptions: its name with its definition and its one or two hypernyms."""
        name = self.name if self.proper else f"{_article(self.name)} {self.name}"
        kind = f", a kind of {self.hypernyms[0]}" if self.hypernyms else ""
        texts = [f"{name}{kind}: {self.definition}.", f"a photo of {name}, which is {self.definition}."]
        if kind:
            texts.append(f"a photo of {name}{kind}.")
        if len(self.hypernyms) > 1:
            texts.append(f"{name}{kind}, which is a kind of {self.hypernyms[1]}.")
        if self.also:
            texts.append(f"a photo of {name}, also called {self.also}.")
        return texts

    def describe(self) -> str:
        """One report line: the sense taken, and the others when the name is ambiguous."""
        line = f"{self.name}: {self.synset} ({self.definition})"
        if self.senses > 1:
            line += f"; first of {self.senses} noun senses (others: {', '.join(self.others[:4])}" + \
                    (", ...)" if len(self.others) > 4 else ")")
        return line


def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def _lemma_text(synset: Any) -> str:
    return synset.lemmas()[0].name().replace("_", " ")


def _hypernyms(synset: Any, count: int = 2) -> tuple[str, ...]:
    """The names of up to `count` hypernyms, nearest first (instance hypernyms too: 'Paris' is a city)."""
    names = []
    for _ in range(count):
        parents = synset.hypernyms() or synset.instance_hypernyms()
        if not parents:
            break
        # nltk keeps a synset's pointers in sets: the order differs from run to run, so take the most specific
        # parent (the deepest: 'cat' rather than 'domestic animal' above 'domestic cat'), then the first by name
        synset = min(parents, key=lambda parent: (-parent.min_depth(), parent.name()))
        names.append(_lemma_text(synset))
    return tuple(names)


def sense(reader: Any, name: str, aliases: Sequence[str] = ()) -> Sense | None:
    """The first noun sense of `name` (else of its first alias WordNet knows), or None."""
    for word in (name, *aliases):
        synsets = reader.synsets(re.sub(r"\s+", "_", word.strip()), pos="n")
        if synsets:
            first = synsets[0]
            lemmas = [lemma.name().replace("_", " ") for lemma in first.lemmas()]
            also = next((lemma for lemma in lemmas if lemma.casefold() != name.casefold()), "")
            return Sense(name, first.name(), first.definition(), _hypernyms(first), len(synsets),
                         tuple(s.name() for s in synsets[1:]), also, bool(first.instance_hypernyms()))
    return None


@dataclass(frozen=True)
class WordNetLabels:
    """What `wordnet_labels` found: a sense per name known to WordNet, and the names it does not know."""

    senses: list[Sense]
    unknown: list[str] = field(default_factory=list)

    @property
    def descriptions(self) -> dict[str, list[str]]:
        """The label file's content: each name's descriptions, in the order given."""
        return {s.name: s.descriptions() for s in self.senses}

    def describe(self) -> str:
        """The report: the sense of each ambiguous name, and the names left out."""
        lines = [s.describe() for s in self.senses if s.senses > 1]
        if self.unknown:
            lines.append(f"left out, not in WordNet: {', '.join(map(repr, self.unknown))}")
        lines.append(f"{len(self.senses)} classes described")
        return "".join(line + "\n" for line in lines)


def wordnet_labels(names: LabelsArg, skip_unknown: bool = False,
                   directory: str | os.PathLike | None = None) -> WordNetLabels:
    """The WordNet sense of each class of `names` (what `load_labels` reads: a list of names, a label
    file; a name WordNet lacks is looked up by its synonyms). Names WordNet does not know are an
    InputError listing them, or with `skip_unknown` left out (and listed in `unknown`)."""
    with warnings.catch_warnings():  # a repeated name is an error here, not load_labels' warning
        warnings.simplefilter("ignore")
        entries = load_labels(names)
    folded = [entry.name.casefold() for entry in entries]
    repeated = sorted({entry.name for entry, key in zip(entries, folded) if folded.count(key) > 1})
    if repeated:
        raise InputError(f"names given twice (case-insensitively): {', '.join(map(repr, repeated))}; a description "
                         "file names each class once, so give each once")
    reader = _reader(wordnet_dir(directory))
    found = [(entry.name, sense(reader, entry.name, entry.synonyms)) for entry in entries]
    unknown = [name for name, chosen in found if chosen is None]
    if unknown and not skip_unknown:
        raise InputError(f"not in WordNet as nouns: {', '.join(map(repr, unknown))}; check the spelling "
                         "(WordNet knows singular and plural nouns, 'golden retriever' as two words), or leave "
                         "them out (--skip-unknown, skip_unknown=True)")
    senses = [chosen for _, chosen in found if chosen is not None]
    if not senses:
        raise InputError("none of the names is in WordNet: nothing to write")
    return WordNetLabels(senses, unknown)


def write_wordnet_labels(names: LabelsArg, out: str | os.PathLike, skip_unknown: bool = False,
                         directory: str | os.PathLike | None = None) -> WordNetLabels:
    """`wordnet_labels`, written to `out` as a CuPL-style description file (JSON, atomically)."""
    found = wordnet_labels(names, skip_unknown, directory)
    text = json.dumps(found.descriptions, indent=1, ensure_ascii=False) + "\n"
    atomic_write(Path(out), lambda f: f.write(text.encode("utf-8")))
    return found
