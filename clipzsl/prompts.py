"""Template sets and label sets: from names, files or lists to validated entries.

Templates are strings with one ``{}`` placeholder. A label set is a list of
`ClassEntry`: a name, optional synonyms (ensembled under every template) and
optional free-text prompts (CuPL-style descriptions, used verbatim). Every file
error names the file and the line (or entry) and says how to fix it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence, Union


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


class PromptFileError(ValueError):
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


def _resolve(spec: str | Path, directory: Path, suffixes: Sequence[str], what: str) -> Path:
    path = Path(spec)
    if path.is_file():
        return path
    for suffix in suffixes:
        shipped = directory / f"{spec}{suffix}"
        if shipped.is_file():
            return shipped
    raise PromptFileError(
        f"Unknown {what} {str(spec)!r}: no such file, and not a shipped {what} "
        f"({', '.join(available(directory, suffixes))}). Give a path or one of those names."
    )


def _check_template(template: Any, where: str) -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise PromptFileError(
            f"{where}: template {template!r} must contain the placeholder '{{}}' exactly once, "
            "e.g. 'a photo of a {}.'"
        )
    return template


def load_templates(spec: TemplatesArg = DEFAULT_TEMPLATES) -> list[str]:
    """A template list from a shipped set's name, a .txt file path, or a list of strings."""
    if isinstance(spec, (list, tuple)):
        templates = [_check_template(t, f"templates[{i}]") for i, t in enumerate(spec)]
        source = "the template list"
    else:
        path = _resolve(spec, TEMPLATES_DIR, (".txt",), "template set")
        templates = [_check_template(text, f"{path}:{number}") for number, text in _content_lines(path)]
        source = str(path)
    if not templates:
        raise PromptFileError(f"{source}: no templates; add at least one line such as 'a photo of a {{}}.'")
    if len(set(templates)) != len(templates):
        duplicate = next(t for t in templates if templates.count(t) > 1)
        raise PromptFileError(f"{source}: template {duplicate!r} appears twice; remove one.")
    return templates


def load_labels(spec: LabelsArg) -> list[ClassEntry]:
    """Class entries from a shipped set's name, a .txt/.json/.yaml path, or a list.

    List items may be plain names, ``"name | synonym"`` strings, dicts with
    ``name``/``synonyms``/``prompts``, or `ClassEntry` objects.
    """
    if isinstance(spec, (list, tuple)):
        located = [(_entry_from_item(item, f"labels[{i}]"), f"labels[{i}]") for i, item in enumerate(spec)]
        return _validated(located, "the label list")
    path = _resolve(spec, LABELS_DIR, LABEL_SUFFIXES, "label set")
    if path.suffix == ".txt":
        located = [(_entry_from_line(text), f"{path}:{number}") for number, text in _content_lines(path)]
    else:
        located = [(_entry_from_item(item, f"{path}, {where}"), f"{path}, {where}") for item, where in _structured_items(path)]
    return _validated(located, str(path))


def _content_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank, non-comment lines of a text file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8.") from err
    return [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]


def _entry_from_line(text: str) -> ClassEntry:
    name, *synonyms = (part.strip() for part in text.split("|"))
    return ClassEntry(name, tuple(synonyms))


def _structured_items(path: Path) -> list[tuple[Any, str]]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}:{err.lineno}: invalid JSON ({err.msg}).") from err
    except Exception as err:  # yaml.YAMLError carries its own line in the message
        raise PromptFileError(f"{path}: invalid YAML: {err}") from err
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if not isinstance(data, list):
        raise PromptFileError(
            f"{path}: expected a list of classes (or {{\"classes\": [...]}}), "
            "each a name or an object with 'name', 'synonyms', 'prompts'."
        )
    return [(item, f"entry {i + 1}") for i, item in enumerate(data)]


_ENTRY_KEYS = {"name", "synonyms", "prompts"}


def _entry_from_item(item: Any, where: str) -> ClassEntry:
    if isinstance(item, ClassEntry):
        return item
    if isinstance(item, str):
        return _entry_from_line(item)
    if not isinstance(item, dict):
        raise PromptFileError(f"{where}: expected a class name or an object with 'name', got {item!r}.")
    unknown = set(item) - _ENTRY_KEYS
    if unknown:
        raise PromptFileError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: name, synonyms, prompts.")
    lists = {}
    for key in ("synonyms", "prompts"):
        value = item.get(key) or []
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise PromptFileError(f"{where}: '{key}' must be a list of strings, got {value!r}.")
        lists[key] = tuple(v.strip() for v in value)
    return ClassEntry(str(item.get("name") or "").strip(), lists["synonyms"], lists["prompts"])


def _validated(located: list[tuple[ClassEntry, str]], source: str) -> list[ClassEntry]:
    if not located:
        raise PromptFileError(f"{source}: no classes; add one class name a line (or a list item).")
    first_seen: dict[str, str] = {}
    for entry, where in located:
        if not entry.name:
            raise PromptFileError(f"{where}: empty class name; write the name before any '|'.")
        for text in (*entry.synonyms, *entry.prompts):
            if not text:
                raise PromptFileError(f"{where}: empty synonym or prompt in class {entry.name!r}; remove it.")
        for alias in dict.fromkeys(a.casefold() for a in (entry.name, *entry.synonyms)):
            if alias in first_seen:
                raise PromptFileError(
                    f"{where}: {alias!r} of class {entry.name!r} is already a class name or synonym at "
                    f"{first_seen[alias]}; each name may name only one class (merge them with '|')."
                )
            first_seen[alias] = where
    return [entry for entry, _ in located]
