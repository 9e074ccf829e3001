"""Large label sets from lexical databases: one class per WordNet noun synset (~82k).

The WordNet 3.0 database comes from the Debian package `wordnet-base`: the system's
`/usr/share/wordnet/data.noun` when it is installed, else the package fetched once with
`apt-get download` into `<cache>/vocab/wordnet-base/` and unpacked with `dpkg-deb -x`
(`clipzsl.packages`; no root needed, except for the `apt-get update` that a machine without
package lists needs first).

Every name and synonym of the result is unique case-insensitively, as label files
require: names are assigned first (a synset whose first lemma is taken is named by its
next free lemma, and skipped when none is free), then up to `MAX_SYNONYMS` synonyms
per class from its remaining free lemmas.

Usage: python -m clipzsl.vocab wordnet --out wordnet_nouns.txt [--data-noun PATH]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

from .errors import ClipzslError, InputError
from .packages import PackageUnavailable, fetch_package, source_of
from .prompts import ClassEntry
from .store import StoreError, cache_root, own_cache_root

WORDNET_PACKAGE = "wordnet-base"
SYSTEM_DATA_NOUN = Path("/usr/share/wordnet/data.noun")
#: where data.noun sits inside the unpacked .deb
DEB_DATA_NOUN = Path("usr/share/wordnet/data.noun")
MAX_SYNONYMS = 3
#: syntactic markers WordNet appends to some lemmas: (a) prenominal, (p) predicate, (ip) immediately postnominal
_MARKER = re.compile(r"\((?:a|p|ip)\)$")

_INSTALL_HINT = (
    "Install it by hand with `apt-get install wordnet-base` (root), or "
    "`apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb DIR` and pass "
    "DIR/usr/share/wordnet/data.noun as the path (--data-noun)."
)


def fetch_wordnet(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of WordNet's data.noun: the system's, else the cached or freshly fetched package's
    (`clipzsl.packages`, the fetcher the benchmarks' data sets use too)."""
    if SYSTEM_DATA_NOUN.is_file():
        return SYSTEM_DATA_NOUN
    root = cache_root(cache_dir) / "vocab" / WORDNET_PACKAGE
    unpacked = root / "root"
    if (unpacked / DEB_DATA_NOUN).is_file():
        return unpacked / DEB_DATA_NOUN
    try:
        own_cache_root(cache_dir)  # a folder clipzsl did not make is never written into
        fetch_package("apt", WORDNET_PACKAGE, unpacked)
    except (OSError, StoreError, PackageUnavailable) as err:  # no apt-get, an unwritable cache, another's folder
        raise PackageUnavailable(f"cannot fetch {WORDNET_PACKAGE} into {root}: {err}. {_INSTALL_HINT}") from err
    if not (unpacked / DEB_DATA_NOUN).is_file():
        raise PackageUnavailable(f"{source_of(unpacked)} holds no {DEB_DATA_NOUN}. {_INSTALL_HINT}")
    return unpacked / DEB_DATA_NOUN


def lemma_text(lemma: str) -> str:
    """A data-file lemma as text: markers like `(a)` stripped, underscores to spaces."""
    return _MARKER.sub("", lemma).replace("_", " ").strip()


def parse_synsets(lines: Iterable[str]) -> list[list[str]]:
    """Lemmas (as text, in file order) of each synset line of a WordNet data file.

    A synset line is `offset lex_filenum ss_type w_cnt word lex_id [word lex_id]... p_cnt ... | gloss`,
    with w_cnt two hex digits; license header lines start with two spaces.
    """
    synsets = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("  "):
            continue
        fields = line.split(" | ", 1)[0].split()
        try:
            count = int(fields[3], 16)
            words = fields[4 : 4 + 2 * count : 2]
        except (IndexError, ValueError) as err:
            raise InputError(f"line {number}: not a WordNet synset line ({err}): {line[:80]!r}") from err
        if len(words) != count:
            raise InputError(f"line {number}: w_cnt {fields[3]} announces {count} words, found {len(words)}")
        lemmas = [text for text in (lemma_text(w) for w in words) if text]
        if lemmas:
            synsets.append(lemmas)
    return synsets


def unique_entries(synsets: Sequence[Sequence[str]], max_synonyms: int = MAX_SYNONYMS) -> list[ClassEntry]:
    """One class per synset with every name and synonym unique case-insensitively.

    Names first (first free lemma, synset skipped when none is free), then synonyms
    from the remaining free lemmas, so a synonym never steals a later synset's name.
    """
    taken: set[str] = set()
    named: list[tuple[str, Sequence[str]]] = []
    for lemmas in synsets:
        name = next((lemma for lemma in lemmas if lemma.casefold() not in taken), None)
        if name is None:
            continue
        taken.add(name.casefold())
        named.append((name, lemmas))
    entries = []
    for name, lemmas in named:
        synonyms: list[str] = []
        for lemma in lemmas:
            if len(synonyms) == max_synonyms:
                break
            if lemma.casefold() not in taken:
                taken.add(lemma.casefold())
                synonyms.append(lemma)
        entries.append(ClassEntry(name, tuple(synonyms)))
    return entries


def wordnet_nouns(path: str | Path | None = None) -> list[ClassEntry]:
    """One `ClassEntry` per WordNet noun synset (see the module docstring for the rules)."""
    path = Path(path) if path else fetch_wordnet()
    with open(path, encoding="utf-8") as f:
        return unique_entries(parse_synsets(f))


def write_label_file(entries: Sequence[ClassEntry], path: str | Path, source: str = "WordNet 3.0 nouns") -> Path:
    """Write entries as a `.txt` label file (`name | synonym ...` a line) under a `#` header."""
    path = Path(path)
    for entry in entries:
        for text in (entry.name, *entry.synonyms):
            if "|" in text or "\n" in text or text != text.strip() or not text:
                raise InputError(f"{text!r} of class {entry.name!r} cannot be written to a label file")
        if entry.prompts:
            raise InputError(f"class {entry.name!r} has free-text prompts, which .txt label files cannot hold")
        if entry.name.startswith("#"):
            raise InputError(f"class name {entry.name!r} would read as a comment")
    header = [
        f"# {source}: {len(entries)} classes, one per noun synset; `name | synonym ...`.",
        "# Generated by `python -m clipzsl.vocab wordnet` from the Debian package wordnet-base.",
        "# WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.",
        "# License: https://wordnet.princeton.edu/license-and-commercial-use",
    ]
    lines = [" | ".join((entry.name, *entry.synonyms)) for entry in entries]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + lines) + "\n", encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clipzsl.vocab", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    wordnet = commands.add_parser("wordnet", help="one class per WordNet noun synset")
    wordnet.add_argument("--out", required=True, help="label file to write (.txt)")
    wordnet.add_argument("--data-noun", help="path of WordNet's data.noun (default: system's, else fetched)")
    args = parser.parse_args(argv)
    try:
        entries = wordnet_nouns(args.data_noun)
    except (ClipzslError, OSError) as err:
        print(f"clipzsl.vocab: error: {err}", file=sys.stderr)
        return 2
    write_label_file(entries, args.out)
    synonyms = sum(len(e.synonyms) for e in entries)
    print(f"{args.out}: {len(entries)} classes, {synonyms} synonyms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
