"""CLIP's byte-pair tokenizer read from a merges file, without torch or open_clip (for `onnx:` models).

A text is cleaned (ftfy's fixes, HTML entities, whitespace; lower-cased, or with punctuation removed),
split into words, digits and punctuation runs, each piece written as one symbol per UTF-8 byte, and
the byte symbols joined by the merges in rank order; the last symbol of a piece carries the end-of-word
mark. The ids are the 256 byte symbols, the same with the mark, one per merge, then the special tokens,
in that order: what open_clip's `SimpleTokenizer` builds from the same merges, so the ids agree
(tests/test_onnx.py checks it on generated labels and prompts).
"""
from __future__ import annotations

import html
import string
from pathlib import Path
from typing import Sequence

import numpy as np

#: the end-of-word mark on a piece's last symbol
END = "</w>"
_PUNCTUATION = str.maketrans("", "", string.punctuation)
CLEANINGS = ("lower", "whitespace", "canonicalize")


def clean(text: str, how: str) -> str:
    """ftfy's fixes, HTML entities decoded twice, then "lower": whitespace runs to one space, lower case;
    "whitespace": the runs only; "canonicalize": underscores to spaces, ASCII punctuation dropped, lower
    case, then the runs."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if how == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    text = " ".join(text.split())
    return text.lower() if how == "lower" else text


def byte_symbols() -> dict[int, str]:
    """One printable character per byte value, in id order: the bytes that are printable Latin-1
    characters stand for themselves (first), the others take the characters from U+0100 on."""
    kept = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    moved = [b for b in range(256) if b not in kept]
    symbols = {b: chr(b) for b in kept} | {b: chr(256 + i) for i, b in enumerate(moved)}
    return symbols


def read_merges(path: Path) -> list[tuple[str, str]]:
    """The merges file: one "left right" pair per line, highest priority first."""
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        left, right = line.split(" ")
        pairs.append((left, right))
    return pairs


def write_merges(path: Path, merges: Sequence[tuple[str, str]]) -> None:
    path.write_text("".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8")


class ClipBpe:
    """texts -> int64 [N, context_length] ids: start token, the pieces' ids, end token, zero padding;
    a text too long for the context keeps its first ids and ends on the end token."""

    def __init__(self, merges: Sequence[tuple[str, str]], special: Sequence[str], context_length: int,
                 cleaning: str = "lower"):
        import regex

        self.byte_symbol = byte_symbols()
        symbols = list(self.byte_symbol.values())
        vocabulary = [*symbols, *(s + END for s in symbols), *(a + b for a, b in merges), *special]
        self.ids = {token: i for i, token in enumerate(vocabulary)}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.special = {token: self.ids[token] for token in special}
        self.start, self.end = self.ids[special[0]], self.ids[special[1]]
        self.context_length, self.cleaning = context_length, cleaning
        alternatives = [*map(regex.escape, special), "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
                        r"[\p{L}]+", r"[\p{N}]", r"[^\s\p{L}\p{N}]+"]
        self.pieces = regex.compile("|".join(alternatives), regex.IGNORECASE)
        self._known: dict[str, list[int]] = {}

    def merge(self, piece: str) -> list[str]:
        """The piece's byte symbols joined pair by pair, the lowest-ranked adjacent pair first, every
        occurrence of it left to right, until no adjacent pair is a merge."""
        parts = [*piece[:-1], piece[-1] + END]
        while len(parts) > 1:
            pairs = list(zip(parts, parts[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            joined: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    joined.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    joined.append(parts[i])
                    i += 1
            parts = joined
        return parts

    def piece_ids(self, piece: str) -> list[int]:
        if piece in self.special:
            return [self.special[piece]]
        if piece not in self._known:
            symbols = "".join(self.byte_symbol[b] for b in piece.encode("utf-8"))
            self._known[piece] = [self.ids[s] for s in self.merge(symbols)]
        return self._known[piece]

    def encode(self, text: str) -> list[int]:
        """The text's ids, without the start and end tokens."""
        return [i for piece in self.pieces.findall(clean(text, self.cleaning)) for i in self.piece_ids(piece)]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.context_length), np.int64)
        for row, text in enumerate(texts):
            ids = [self.start, *self.encode(text), self.end]
            if len(ids) > self.context_length:
                ids = [*ids[:self.context_length - 1], self.end]
            out[row, :len(ids)] = ids
        return out

    @classmethod
    def from_files(cls, merges: Path, special: Sequence[str], context_length: int, cleaning: str) -> "ClipBpe":
        return cls(read_merges(merges), special, context_length, cleaning)
