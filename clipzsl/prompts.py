"""Template sets and label sets: from names, files or lists to validated entries.

Templates are strings with one ``{}`` placeholder (``{c}``, CLIP_benchmark's spelling,
is read as ``{}``). A label set is a list of `ClassEntry`: a name, optional synonyms
(ensembled under every template) and optional free-text prompts (CuPL-style
descriptions, used verbatim). A label file may also map class names to descriptions (CuPL's
format, CLIP_benchmark's cupl_prompts.json), and such a file given as the templates gives each class
its descriptions in place of templates (`load_prompts`). Every file error names the file and the line (or entry)
and says how to fix it; a string that names no file and no shipped set is an error,
never a one-class label set.
"""
from __future__ import annotations

import dataclasses
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
        texts = [t.replace("{}", n) for n in names for t in templates] + list(self.prompts)
        if not texts:
            raise PromptFileError(f"class {self.name!r} has no text to encode: no templates and no descriptions; "
                                  "give a template set, or descriptions for it")
        return texts


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
            data, source = _picked(path, key)
            _refuse_descriptions(data, source, spec, picked=key is not None)
            located, source = _listed(data, source, path, "templates")
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
        located, source = _structured_entries(path, key)
    else:
        raise PromptFileError(
            f"{path}: a label file must end in {', '.join(LABEL_SUFFIXES)} (one class a line in .txt; "
            "a list in .json/.yaml); rename it."
        )
    return _validated(located, source, repeats_allowed=key is not None)


def load_prompts(labels: LabelsArg, templates: TemplatesArg = DEFAULT_TEMPLATES) -> tuple[list[ClassEntry], list[str]]:
    """(class entries, templates): what a classifier encodes for `labels` and `templates`.

    Each class's texts are its names and synonyms in every template, and its descriptions (`prompts`),
    all averaged (`ClassEntry.texts`). `templates` may also be a file of per-class descriptions (CuPL's
    format, as CLIP_benchmark's --custom_template_file takes it): each class's texts are then its
    descriptions only, found by its name, and no templates come back. An empty template list is allowed
    when every class has descriptions: they are its only texts (CuPL without the template ensemble).
    """
    entries = load_labels(labels)
    described = _descriptions_given(templates)
    if described is not None:
        return _with_descriptions(entries, *described), []
    if not (isinstance(templates, (list, tuple)) and not templates):
        return entries, load_templates(templates)
    bare = [entry.name for entry in entries if not entry.prompts]
    if bare:
        raise PromptFileError(
            f"no templates, and no descriptions for {len(bare)} class(es) ({_few(bare)}), which would have no "
            "text at all; give a template set, or descriptions for every class."
        )
    return entries, []


def _descriptions_given(templates: TemplatesArg) -> tuple[list[ClassEntry], str] | None:
    """The described classes of a description file given as templates, with its name; None for templates."""
    if not isinstance(templates, (str, Path)):
        return None
    path, key = _located(templates, TEMPLATES_DIR, (".txt",), "template set", _TEMPLATES_INSTEAD)
    if path.suffix.lower() not in STRUCTURED_SUFFIXES:
        return None
    data, source = _picked(path, key)
    mapping = description_mapping(data, picked=key is not None)
    if mapping is None:
        return None
    return _validated(_described_entries(mapping, source), source, repeats_allowed=False), source


def _with_descriptions(entries: list[ClassEntry], described: list[ClassEntry], source: str) -> list[ClassEntry]:
    """`entries`, each with the descriptions `described` has for its name (case-insensitively) as its prompts."""
    by_name = {_folded(entry.name): entry.prompts for entry in described}
    missing = [entry.name for entry in entries if _folded(entry.name) not in by_name]
    if missing:
        close = difflib.get_close_matches(missing[0], [entry.name for entry in described], n=3)
        hint = f" (for {missing[0]!r}, did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise PromptFileError(
            f"{source}: no descriptions for {len(missing)} of the {len(entries)} classes: {_few(missing)}{hint}; "
            "add them to the file (each class is looked up by its name, as CLIP_benchmark does), or give a "
            "template set instead."
        )
    return [dataclasses.replace(entry, prompts=by_name[_folded(entry.name)]) for entry in entries]


def _few(names: list[str], count: int = 10) -> str:
    """Up to `count` names, quoted, and how many more."""
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(map(repr, names[:count])) + more


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


def _picked(path: Path, key: str | None) -> tuple[Any, str]:
    """(the decoded file, or with `key` the data set it picks; its name for messages)."""
    return _data_set(path, _structured_data(path), key)


def _listed(data: Any, source: str, path: Path, field: str) -> tuple[list[tuple[Any, str]], str]:
    """The list `data` holds, with where each item is: the data itself, or its `field` ("classes",
    "templates"); a data set picked with `key` is a list of a mapping from data-set names to lists
    (CLIP_benchmark's files)."""
    if isinstance(data, dict) and field in data:
        data = data[field]
    if isinstance(data, dict):
        described = (f" If it maps class names to descriptions (CuPL's format), write it as "
                     f'{{"classes": {{NAME: [DESCRIPTION, ...]}}}} (read unwrapped only when a description names '
                     "its class)." if field == "classes" else "")
        raise PromptFileError(
            f"{source}: a mapping without {field!r}. If it maps data-set names to lists of {field} "
            f"(CLIP_benchmark's format), pick one as {path}:KEY.{described} {_keys_line(data)}"
        )
    if not isinstance(data, list):
        raise PromptFileError(
            f"{source}: expected a list of {field} (or {{\"{field}\": [...]}}), got {type(data).__name__}; "
            + ("each class a name or an object with 'name', 'synonyms', 'prompts'." if field == "classes"
               else "each template a string such as 'a photo of a {}.'")
        )
    return [(item, f"{source}, entry {i + 1}") for i, item in enumerate(data)], source


def _structured_entries(path: Path, key: str | None) -> tuple[list[tuple[ClassEntry, str]], str]:
    """The class entries of a .json/.yaml label file, with where each is, and the name of the list: a list
    of classes, or a mapping of class names to descriptions (`description_mapping`)."""
    data, source = _picked(path, key)
    mapping = description_mapping(data, picked=key is not None)
    if mapping is not None:
        return _described_entries(mapping, source), source
    items, source = _listed(data, source, path, "classes")
    return [(_entry_from_item(item, where), where) for item, where in items], source


def description_mapping(data: Any, picked: bool = False) -> dict | None:
    """The class -> descriptions mapping that decoded JSON/YAML `data` holds (CuPL's format, as in
    CLIP_benchmark's cupl_prompts.json), or None when it holds none.

    ``{"classes": {...}}``, and a mapping picked from a file with ``file.json:KEY`` (`picked`), are
    descriptions by their place. A whole file mapping names to lists is read as descriptions only when
    some description names its class, as CuPL's do: CLIP_benchmark's en_classnames.json has the same
    shape (data-set names to class names) and never names the data set in its lists."""
    if not isinstance(data, dict):
        return None
    if "classes" in data or "templates" in data:
        return data["classes"] if isinstance(data.get("classes"), dict) else None
    if picked or any(_mentions(name, texts) for name, texts in data.items()):
        return data
    return None


def _mentions(name: Any, texts: Any) -> bool:
    """Whether one of `texts` (a list of strings) contains `name`, case-insensitively."""
    if not isinstance(name, str) or not isinstance(texts, list):
        return False
    folded = _folded(normalise_text(name))
    return bool(folded) and any(isinstance(t, str) and folded in _folded(t) for t in texts)


def _described_entries(mapping: dict, source: str) -> list[tuple[ClassEntry, str]]:
    """One class entry per name of a description mapping, its descriptions as its prompts."""
    located = []
    for name, texts in mapping.items():
        where = f"{source}, class {_shown(name)}"
        if not isinstance(name, str):
            raise PromptFileError(f"{where}: a class name must be a string, got {type(name).__name__}{_QUOTE_HINT}.")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            empty = "an empty list" if texts == [] else _shown(texts)
            raise PromptFileError(
                f"{where}: the descriptions must be a non-empty list of strings, such as "
                f'["a {name} has ..."], got {empty}; fix them or remove the class.'
            )
        # a description is prose, line breaks included (CuPL's GPT-3 answers have them): each run of
        # whitespace is one space, as CLIP's tokenizers read it; other control characters stay refused
        located.append((ClassEntry(name.strip(), prompts=tuple(" ".join(t.split()) for t in texts)), where))
    return located


def _refuse_descriptions(data: Any, source: str, spec: Any, picked: bool) -> None:
    """A description file given where only templates are read: say where it goes instead."""
    if description_mapping(data, picked) is not None:
        raise PromptFileError(
            f"{source}: per-class descriptions (CuPL's format), not templates. Give it as the labels "
            f"(--labels {spec}: each class's descriptions ensembled with the templates), or as the templates of "
            "a classifier (ZeroShotClassifier(labels=..., templates=FILE), clipzsl classify --templates FILE: each "
            "class's descriptions in place of templates, as CLIP_benchmark's --custom_template_file)."
        )


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
