"""Template sets and label sets: from names, files or lists to validated entries.

Templates are strings with one ``{}`` placeholder (``{c}``, CLIP_benchmark's spelling,
is read as ``{}``). A label set is a list of `ClassEntry`: a name, optional synonyms
(ensembled under every template) and optional free-text prompts (CuPL-style
descriptions, used verbatim). Every file error names the file and the line (or entry)
and says how to fix it; a string that names no file and no shipped set is an error,
never a one-class label set.
"""
from __future__ import annotations

import difflib
import functools
import itertools
import json
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence, Union, cast

from .errors import ClipzslError


def _prompts_dir() -> Path:
    """The shipped prompts: clipzsl/_prompts/ in an installed wheel (pyproject.toml maps the
    repository's top-level prompts/ there), else that prompts/ itself (checkout, editable install)."""
    installed = resources.files(__package__) / "_prompts"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parent.parent / "prompts"


PROMPTS_DIR = _prompts_dir()
TEMPLATES_DIR = PROMPTS_DIR / "templates"
LABELS_DIR = PROMPTS_DIR / "labels"
LABEL_SUFFIXES = (".txt", ".json", ".yaml", ".yml")
DEFAULT_TEMPLATES = "simple_7"

TemplatesArg = Union[str, Path, Sequence[str]]
LabelsArg = Union[str, Path, Sequence[Union[str, dict, "ClassEntry"]]]


#: longest name, synonym, prompt or template accepted: CLIP reads 77 tokens, so anything
#: longer is a wrong file or a pasted paragraph, not a label
MAX_TEXT_CHARS = 1000
#: structured files; ``file.json:key`` picks one data set of a mapping (CLIP_benchmark's format)
STRUCTURED_SUFFIXES = (".json", ".yaml", ".yml")

_KEYED = re.compile(r"(.+\.(?:json|ya?ml)):([^:/\\]+)", re.IGNORECASE)
#: control characters, and the line and paragraph separators U+2028/U+2029: in a name they can only come from a
#: wrong file (UTF-16, tab-separated, other line ends than \n and \r\n), so they are refused, never split on
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
#: characters that show nothing and mean nothing in a name: zero-width space, soft hyphen, word joiner and
#: invisible operators, direction marks, Mongolian vowel separator, byte-order mark
_INVISIBLE = re.compile(r"[\u00ad\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
#: zero-width (non-)joiners shape the letters of the scripts that need them (Persian, Indic, emoji sequences);
#: at an end of the text or beside an ASCII character they are invisible noise
_STRAY_JOINER = re.compile(r"(?<![^\x00-\x7f])[\u200c\u200d]+|[\u200c\u200d]+(?![^\x00-\x7f])")
#: runs of whitespace that is not a control character (space, no-break and other Unicode spaces)
_SPACES = re.compile(r"[^\S\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_BRACES = re.compile(r"\{[^{}]*\}|[{}]")
_LABELS_INSTEAD = "or a list of class names ('cat,dog' on the command line, a single class 'cat,'; a list in Python)"
_TEMPLATES_INSTEAD = "or a list of templates in Python, such as ['a photo of a {}.']"
_QUOTE_HINT = " (a number or boolean, not text: quote it; YAML reads unquoted yes/no/on/off this way too)"


class PromptFileError(ClipzslError, ValueError):
    """A template or label set that cannot be used, with where and why."""


@dataclass(frozen=True)
class ClassEntry:
    name: str
    synonyms: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()

    def texts(self, templates: Sequence[str]) -> list[str]:
        """Every prompt whose embeddings are averaged into this class's embedding."""
        names = (self.name, *self.synonyms)
        return [t.replace("{}", n) for n in names for t in templates] + list(self.prompts)


def available(directory: Path, suffixes: Iterable[str]) -> list[str]:
    """Names of the shipped files in a prompts/ folder (file stems)."""
    return sorted(p.stem for p in directory.glob("*") if p.suffix in tuple(suffixes))


def _resolve(spec: str | Path, directory: Path, suffixes: Sequence[str], what: str, instead: str) -> Path:
    """The file a spec names; a string that names no file and no shipped set is an error, never a label."""
    path = Path(spec)
    if os.path.isfile(path):  # not Path.is_file: a name longer than the file system allows is no file, not an OSError
        return path
    bare = len(path.parts) == 1 and path.suffix not in suffixes
    if bare:
        for suffix in suffixes:
            shipped = directory / f"{spec}{suffix}"
            if os.path.isfile(shipped):
                return shipped
    names = available(directory, suffixes)
    tried = f"no file {path.absolute()}" + (" (a folder)" if os.path.isdir(path) else "")
    if bare:
        tried += f" and no shipped {what} {directory / str(spec)}{{{','.join(suffixes)}}}"
    close = difflib.get_close_matches(str(spec), names, n=3) + _close_files(path)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise PromptFileError(
        f"Unknown {what} {str(spec)!r}: {tried}.{hint} Give a file path, a shipped {what} "
        f"({', '.join(names)}), {instead}."
    )


def _close_files(path: Path) -> list[str]:
    """Files beside a mistyped path whose names are close to it."""
    folder = path.parent
    if not path.name or not os.path.isdir(folder):
        return []
    try:
        siblings = [p.name for p in itertools.islice(folder.iterdir(), 10_000) if p.is_file()]
    except OSError:
        return []
    return [str(folder / name) for name in difflib.get_close_matches(path.name, siblings, n=3)]


def _located(
    spec: str | Path, directory: Path, suffixes: Sequence[str], what: str, instead: str
) -> tuple[Path, str | None]:
    """(file, data-set key): ``file.json:key`` picks one entry of a mapping file, unless a file has that very name."""
    match = _KEYED.fullmatch(str(spec))
    if match and not os.path.isfile(spec):
        return _resolve(match[1], directory, suffixes, what, instead), match[2]
    return _resolve(spec, directory, suffixes, what, instead), None


def _shown(value: Any, limit: int = 60) -> str:
    """The repr of `value`, cut short for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def normalise_text(text: str) -> str:
    """`text` as every comparison sees it: invisible characters dropped, each run of spaces one space, no
    space at either end, Unicode NFC. So names that look the same are the same (NFC and NFD 'café',
    'cat' and 'cat' with a zero-width space), in files, lists, the command line and the service."""
    text = _SPACES.sub(" ", _STRAY_JOINER.sub("", _INVISIBLE.sub("", text)))
    return unicodedata.normalize("NFC", text.strip())


def query_text(text: str) -> str:
    """A search query normalised as labels are (`normalise_text`), so a zero-width space or BOM pasted
    with it changes nothing; refused (PromptFileError) when nothing is left to search for."""
    query = _clean(text, "query", "search")
    if not query:
        raise PromptFileError(f"search: the query {_shown(text)} is empty once spaces and invisible characters "
                              "are removed; give the words to search for")
    return query


def _clean(text: str, what: str, where: str) -> str:
    """`text` normalised; refused when it can only come from a wrong file: control characters, far too long."""
    control = _CONTROL.search(text)
    if control:
        raise PromptFileError(
            f"{where}: {what} {_shown(text)} contains the control character U+{ord(control[0]):04X}; remove it "
            "(a UTF-16 or tab-separated file, or one with other line ends than \\n or \\r\\n, reads this way: "
            "save it as UTF-8 text, one entry a line)."
        )
    text = normalise_text(text)
    if len(text) > MAX_TEXT_CHARS:
        raise PromptFileError(
            f"{where}: {what} {_shown(text)} has {len(text):,} characters; at most {MAX_TEXT_CHARS:,} are "
            "allowed. Is this the right file?"
        )
    return text


def _folded(text: str) -> str:
    """What two names must share to be the same name: case folded (then NFC again, as folding may decompose)."""
    return unicodedata.normalize("NFC", text.casefold())


def _check_template(template: Any, where: str) -> str:
    """A template with its one placeholder written ``{}`` (``{c}`` is CLIP_benchmark's spelling)."""
    if isinstance(template, str):
        template = _clean(template, "template", where)
    if not isinstance(template, str) or template.count("{}") + template.count("{c}") != 1:
        raise PromptFileError(
            f"{where}: template {_shown(template)} must contain the placeholder '{{}}' (or '{{c}}') exactly once, "
            "e.g. 'a photo of a {}.'"
        )
    normalised = template.replace("{c}", "{}")
    stray = _BRACES.search(normalised.replace("{}", "", 1))
    if stray:
        raise PromptFileError(
            f"{where}: template {_shown(template)} has {stray[0]!r} besides its placeholder; the class name goes "
            "in '{}' (or '{c}') and no other braces are allowed."
        )
    return normalised


def load_templates(spec: TemplatesArg = DEFAULT_TEMPLATES) -> list[str]:
    """A template list from a shipped set's name, a file, or a list of strings.

    Files are .txt (one template a line) or .json/.yaml lists; ``file.json:key`` picks
    one data set of a mapping such as CLIP_benchmark's templates file. ``{c}`` is read
    as ``{}``.
    """
    if isinstance(spec, (list, tuple)):
        located, source = [(t, f"templates[{i}]") for i, t in enumerate(spec)], "the template list"
    else:
        path, key = _located(cast("str | Path", spec), TEMPLATES_DIR, (".txt",), "template set", _TEMPLATES_INSTEAD)
        if path.suffix.lower() in STRUCTURED_SUFFIXES:
            located, source = _structured_items(path, key, "templates")
        else:
            located, source = [(text, f"{path}:{number}") for number, text in _content_lines(path)], str(path)
    templates = [_check_template(template, where) for template, where in located]
    if not templates:
        raise PromptFileError(f"{source}: no templates; add at least one line such as 'a photo of a {{}}.'")
    if len(set(templates)) != len(templates):
        duplicate = next(t for t in templates if templates.count(t) > 1)
        raise PromptFileError(f"{source}: template {duplicate!r} appears twice; remove one.")
    return templates


def load_labels(spec: LabelsArg) -> list[ClassEntry]:
    """Class entries from a shipped set's name, a .txt/.json/.yaml path, or a list.

    List items may be plain names, ``"name | synonym"`` strings, dicts with
    ``name``/``synonyms``/``prompts``, or `ClassEntry` objects. A list may repeat a
    name (each keeps its own score column; one warning names them), as may a data
    set picked from a mapping file with ``file.json:key``; a label file may not.
    """
    if isinstance(spec, (list, tuple)):
        located = [(_entry_from_item(item, f"labels[{i}]"), f"labels[{i}]") for i, item in enumerate(spec)]
        return _validated(located, "the label list", repeats_allowed=True)
    path, key = _located(cast("str | Path", spec), LABELS_DIR, LABEL_SUFFIXES, "label set", _LABELS_INSTEAD)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        located = [(_entry_from_line(text), f"{path}:{number}") for number, text in _content_lines(path)]
        source = str(path)
    elif suffix in STRUCTURED_SUFFIXES:
        items, source = _structured_items(path, key, "classes")
        located = [(_entry_from_item(item, where), where) for item, where in items]
    else:
        raise PromptFileError(
            f"{path}: a label file must end in {', '.join(LABEL_SUFFIXES)} (one class a line in .txt; "
            "a list in .json/.yaml); rename it."
        )
    return _validated(located, source, repeats_allowed=key is not None)


def _read_text(path: Path) -> str:
    """A file's UTF-8 text, without the byte-order mark some editors write, and with its line ends as they
    are (text mode would end lines at a lone \\r too)."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        utf16 = "; it looks like UTF-16" if err.object[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise PromptFileError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}{utf16}); save it as UTF-8."
        ) from err
    except OSError as err:
        raise PromptFileError(f"{path}: cannot read it ({err.strerror}).") from err


def _content_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank, non-comment lines of a text file."""
    return content_lines(_read_text(path))


def content_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank, non-comment lines of a label or template text.

    Lines end at \\n or \\r\\n only. str.splitlines also ends them at \\v, \\f, \\x1c-\\x1e, \\x85 and
    U+2028/U+2029, which split one class in two; here those stay in the line, where `_clean` refuses them.
    """
    lines = (line.removesuffix("\r").strip() for line in text.split("\n"))
    return [(n, line) for n, line in enumerate(lines, 1) if line and not line.startswith("#")]


def parse_label_list(text: str) -> list[str] | None:
    """The class names of a comma list ('cat, dog'; one class is written 'cat,'), or None for text without
    a comma (a label set's name or a file). The one reading of a comma list, in the CLI and the service;
    never looked up as a path, so a list longer than a file name may be is still a list."""
    if "," not in text:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise PromptFileError(f"labels {_shown(text)}: no label names between the commas; give e.g. 'cat,dog'.")
    return names


def _entry_from_line(text: str) -> ClassEntry:
    name, *synonyms = (part.strip() for part in text.split("|"))
    return ClassEntry(name, tuple(synonyms))


def _structured_items(path: Path, key: str | None, field: str) -> tuple[list[tuple[Any, str]], str]:
    """The items of a .json/.yaml list with where each is, and the name of the list.

    The list is the file itself, its `field` ("classes", "templates") or, with `key`,
    one data set of a mapping from data-set names to lists (CLIP_benchmark's files).
    """
    data, source = _data_set(path, _structured_data(path), key)
    if isinstance(data, dict) and field in data:
        data = data[field]
    if isinstance(data, dict):
        raise PromptFileError(
            f"{source}: a mapping without {field!r}. If it maps data-set names to lists of {field} "
            f"(CLIP_benchmark's format), pick one as {path}:KEY. {_keys_line(data)}"
        )
    if not isinstance(data, list):
        raise PromptFileError(
            f"{source}: expected a list of {field} (or {{\"{field}\": [...]}}), got {type(data).__name__}; "
            + ("each class a name or an object with 'name', 'synonyms', 'prompts'." if field == "classes"
               else "each template a string such as 'a photo of a {}.'")
        )
    return [(item, f"{source}, entry {i + 1}") for i, item in enumerate(data)], source


def _structured_data(path: Path) -> Any:
    """The decoded content of a .json/.yaml file; a key given twice in one mapping is an error."""
    text = _read_text(path)
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text, object_pairs_hook=_unique_keys)
        import yaml

        return yaml.load(text, Loader=_unique_key_loader())
    except _DuplicateKey as err:
        line = f":{err.line}" if err.line else ""
        raise PromptFileError(
            f"{path}{line}: key {err.key!r} appears twice in one mapping, and a parser would silently keep only "
            "the last; remove or rename one."
        ) from err
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}:{err.lineno}: invalid JSON ({err.msg}).") from err
    except Exception as err:  # yaml.YAMLError carries its own line in the message
        raise PromptFileError(f"{path}: invalid YAML: {err}") from err


def _data_set(path: Path, data: Any, key: str | None) -> tuple[Any, str]:
    """(the data set `key` picks from a mapping file, or the whole file; its name for messages)."""
    if key is None:
        return data, str(path)
    if not isinstance(data, dict):
        raise PromptFileError(
            f"{path}: ':{key}' picks a data set from a mapping, but this file holds a {type(data).__name__}; "
            f"give {path} without ':{key}'."
        )
    if key not in data:
        close = difflib.get_close_matches(key, [str(k) for k in data], n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise PromptFileError(f"{path}: no data set {key!r}.{hint} {_keys_line(data)}")
    return data[key], f"{path}:{key}"


class _DuplicateKey(ValueError):
    """A key given twice in one JSON object or YAML mapping (`line`: where the second is, YAML only)."""

    def __init__(self, key: Any, line: int | None = None):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line = key, line


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads' object_pairs_hook: a dict, or _DuplicateKey instead of keeping the last of two values."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(next(key for key in keys if keys.count(key) > 1))
    return dict(pairs)


@functools.cache
def _unique_key_loader() -> type:
    """yaml.SafeLoader raising _DuplicateKey (with the line) instead of keeping the last of two values."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # keys merged in with '<<' may be overridden, as YAML allows
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: SafeLoader refuses it itself
                    continue
                if repeated:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _keys_line(mapping: dict) -> str:
    keys = [str(k) for k in mapping]
    shown = ", ".join(keys[:60]) + (f", ... ({len(keys)} in all)" if len(keys) > 60 else "")
    return f"Its keys: {shown}."


_ENTRY_KEYS = {"name", "synonyms", "prompts"}


def _entry_from_item(item: Any, where: str) -> ClassEntry:
    """A class entry from a list item: a `ClassEntry`, a "name | synonym" string or a dict."""
    if isinstance(item, ClassEntry):
        return item
    if isinstance(item, str):
        return _entry_from_line(item)
    if not isinstance(item, dict):
        hint = _QUOTE_HINT if isinstance(item, (bool, int, float)) else ""
        raise PromptFileError(f"{where}: expected a class name or an object with 'name', got {_shown(item)}{hint}.")
    unknown = set(item) - _ENTRY_KEYS
    if unknown:
        raise PromptFileError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: name, synonyms, prompts.")
    name = item.get("name")
    if name is not None and not isinstance(name, str):
        hint = _QUOTE_HINT if isinstance(name, (bool, int, float)) else " (synonyms go in 'synonyms')"
        raise PromptFileError(f"{where}: 'name' must be a string, got {type(name).__name__} {_shown(name)}{hint}.")
    synonyms, prompts = (_string_list(item.get(key), key, where) for key in ("synonyms", "prompts"))
    return ClassEntry((name or "").strip(), synonyms, prompts)


def _string_list(value: Any, key: str, where: str) -> tuple[str, ...]:
    """An entry's 'synonyms' or 'prompts' (absent or null: none), each text stripped."""
    value = () if value is None else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise PromptFileError(f"{where}: '{key}' must be a list of strings, got {_shown(value)}.")
    return tuple(v.strip() for v in value)


def _cleaned_entry(entry: ClassEntry, where: str) -> ClassEntry:
    """`entry` with every text normalised (`normalise_text`); empty or unusable texts are refused."""
    name = _clean(entry.name, "class name", where)
    if not name:
        raise PromptFileError(f"{where}: empty class name; write the name before any '|'.")
    synonyms = tuple(_clean(text, "synonym or prompt", where) for text in entry.synonyms)
    prompts = tuple(_clean(text, "synonym or prompt", where) for text in entry.prompts)
    if not all((*synonyms, *prompts)):
        raise PromptFileError(f"{where}: empty synonym or prompt in class {name!r}; remove it.")
    return ClassEntry(name, synonyms, prompts)


def _validated(located: list[tuple[ClassEntry, str]], source: str, repeats_allowed: bool) -> list[ClassEntry]:
    """The entries, normalised and checked; repeated names (after normalisation, case-insensitively) are an
    error, or with `repeats_allowed` one warning."""
    if not located:
        raise PromptFileError(f"{source}: no classes; add one class name a line (or a list item).")
    located = [(_cleaned_entry(entry, where), where) for entry, where in located]
    first_seen: dict[str, tuple[str, str]] = {}
    repeated: dict[str, list[tuple[str, str]]] = {}
    for entry, where in located:
        aliases: dict[str, str] = {}
        for text in (entry.name, *entry.synonyms):
            aliases.setdefault(_folded(text), text)
        for folded, text in aliases.items():
            if folded not in first_seen:
                first_seen[folded] = (text, where)
            elif not repeats_allowed:
                raise PromptFileError(
                    f"{where}: {folded!r} of class {entry.name!r} is already a class name or synonym at "
                    f"{first_seen[folded][1]}; each name may name only one class (merge them with '|')."
                )
            else:
                repeated.setdefault(folded, [first_seen[folded]]).append((text, where))
    if repeated:
        listed = [_places(places, f"{source}, ") for places in repeated.values()]
        more = f"; and {len(listed) - 10} more" if len(listed) > 10 else ""
        warnings.warn(
            f"{source} repeats {len(repeated)} name(s) (case-insensitively): {'; '.join(listed[:10])}{more}. "
            "Each keeps its own score column, in the order given; rename them to tell them apart.",
            stacklevel=3,
        )
    return [entry for entry, _ in located]


def _places(places: list[tuple[str, str]], prefix: str) -> str:
    """"'cat' at entry 1 and entry 4" (or "'Cat' at ... and 'cat' at ..." when the spelling differs)."""
    wheres = [where.removeprefix(prefix) for _, where in places]
    if len({text for text, _ in places}) == 1:
        return f"{places[0][0]!r} at " + " and ".join(wheres)
    return " and ".join(f"{text!r} at {where}" for (text, _), where in zip(places, wheres))
