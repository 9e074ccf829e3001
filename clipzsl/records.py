"""Every JSON file clipzsl persists is read through here, against a schema: one mechanism for all loaders.

A schema is a dataclass whose type hints say what each field holds (int, float, str, bool, Literal,
list[...], tuple[...], dict, nested dataclasses, `X | None`) and whose `field(metadata=...)` may add
a rule (`rule(check, text)`). `parse` refuses a missing or unknown field, a value of the wrong type
or one that breaks its rule, with a `RecordError` naming the file and the field: a hand-edited or
damaged file is an error, never a silently different result. A schema with a `record_sha256` field
is sealed: `dumps` writes the checksum of the rest, `load` checks it, so an edit that keeps every
type right (a changed count, a changed path) is refused too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from .errors import ClipzslError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

#: the field that holds a sealed record's checksum (of every other field)
SEAL = "record_sha256"
_UNIONS = (typing.Union, types.UnionType)


class RecordError(ClipzslError, ValueError):
    """A persisted file that does not match its schema: names the file and the field."""

    def __init__(self, path: str | os.PathLike, field: str, problem: str):
        self.path, self.field, self.problem = Path(path), field, problem
        super().__init__(f"{path}: {self.detail}")

    @property
    def detail(self) -> str:
        """The problem without the file name (for loaders that add their own)."""
        return f"field {self.field!r}: {self.problem}" if self.field else self.problem


def rule(check: Callable[[Any], bool], text: str) -> dict:
    """`field(metadata=rule(...))`: a value the type allows but `check` refuses is an error saying `text`."""
    return {"rule": (check, text)}


def canonical(data: Any) -> bytes:
    """One byte string per JSON value (sorted keys, no spaces): what checksums are taken of."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sealed(schema: type) -> bool:
    return any(f.name == SEAL for f in dataclasses.fields(schema))


def dumps(record: Any) -> bytes:
    """A schema instance as indented JSON; a sealed schema's `record_sha256` is filled in."""
    data = dataclasses.asdict(record)
    if _sealed(type(record)):
        data[SEAL] = hashlib.sha256(canonical({k: v for k, v in data.items() if k != SEAL})).hexdigest()
    return json.dumps(data, indent=1).encode()


def load(schema: type[T], path: str | os.PathLike) -> T:
    """Read, decode and validate the JSON file at `path` (FileNotFoundError when there is none)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(path, "", f"not readable JSON ({err})") from err
    record = parse(schema, data, path)
    if _sealed(schema):
        expected = hashlib.sha256(canonical({k: v for k, v in data.items() if k != SEAL})).hexdigest()
        if getattr(record, SEAL) != expected:
            raise RecordError(path, SEAL, "the content differs from what clipzsl wrote (edited by hand or damaged)")
    return record


def parse(schema: type[T], data: Any, path: str | os.PathLike, prefix: str = "") -> T:
    """`data` (decoded JSON) as an instance of the dataclass `schema`, or a RecordError."""
    if not isinstance(data, dict):
        raise RecordError(path, prefix.rstrip("."), f"expected a JSON object, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecordError(path, prefix + str(unknown[0]), f"unknown field (expected: {', '.join(fields)})")
    hints = typing.get_type_hints(schema)
    values = {}
    for name, f in fields.items():
        where = prefix + name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(path, where, "missing")
            continue
        values[name] = _value(hints[name], data[name], path, where)
        check, text = f.metadata.get("rule", (None, ""))
        if check is not None and not check(values[name]):
            raise RecordError(path, where, f"{_show(data[name])} is not {text}")
    try:
        return schema(**values)
    except (TypeError, ValueError) as err:  # a rule across fields (__post_init__)
        raise RecordError(path, prefix.rstrip("."), str(err)) from err


def _value(hint: Any, value: Any, path: str | os.PathLike, where: str) -> Any:
    """`value` checked against the type hint `hint` (and converted: nested dataclasses, tuples)."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return parse(hint, value, path, where + ".")
    check = _BY_ORIGIN.get(origin) if origin is not None else _BY_TYPE.get(hint)
    if check is None:
        raise TypeError(f"records: unsupported type hint {hint!r} for {where}")  # a bug in a schema, not an input
    return check(hint, value, path, where)


def _union(hint: Any, value: Any, path: str | os.PathLike, where: str) -> Any:
    for option in typing.get_args(hint):
        try:
            return _value(option, value, path, where)
        except RecordError:
            continue
    raise RecordError(path, where, f"expected {_name(hint)}, got {_show(value)}")


def _literal(hint: Any, value: Any, path: str | os.PathLike, where: str) -> Any:
    args = typing.get_args(hint)
    if not any(type(value) is type(a) and value == a for a in args):
        raise RecordError(path, where, f"expected one of {list(args)}, got {_show(value)}")
    return value


def _sequence(hint: Any, value: Any, path: str | os.PathLike, where: str) -> Any:
    """A JSON list as `list[X]`, `tuple[X, ...]` or a fixed-length `tuple[X, Y]`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if not isinstance(value, list):
        raise RecordError(path, where, f"expected a list, got {_show(value)}")
    if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise RecordError(path, where, f"expected a list of {len(args)}, got {len(value)} items")
        return tuple(_value(a, v, path, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    item = args[0] if args else Any
    items = [_value(item, v, path, f"{where}[{i}]") for i, v in enumerate(value)]
    return items if origin is list else tuple(items)


def _mapping(hint: Any, value: Any, path: str | os.PathLike, where: str) -> Any:
    if not isinstance(value, dict):
        raise RecordError(path, where, f"expected a JSON object, got {_show(value)}")
    args = typing.get_args(hint)
    item = args[1] if len(args) == 2 else Any
    return {k: _value(item, v, path, f"{where}.{k}") for k, v in value.items()}


def _null(hint: Any, value: Any, path: str | os.PathLike, where: str) -> Any:
    if value is not None:
        raise RecordError(path, where, f"expected null, got {_show(value)}")
    return None


def _number(hint: Any, value: Any, path: str | os.PathLike, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordError(path, where, f"expected a finite number, got {_show(value)}")
    return float(value)


def _exact(hint: Any, value: Any, path: str | os.PathLike, where: str) -> Any:
    if type(value) is not hint:
        raise RecordError(path, where, f"expected {_name(hint)}, got {_show(value)}")
    return value


_Check = Callable[[Any, Any, "str | os.PathLike", str], Any]
#: the check for each generic hint, by its origin (`X | None`, `Literal[...]`, `list[X]`, ...)
_BY_ORIGIN: dict[Any, _Check] = {typing.Union: _union, types.UnionType: _union, typing.Literal: _literal,
                                 list: _sequence, tuple: _sequence, dict: _mapping}
#: the check for each plain type hint
_BY_TYPE: dict[Any, _Check] = {dict: _mapping, type(None): _null, float: _number, int: _exact, str: _exact,
                               bool: _exact}


def _name(hint: Any) -> str:
    names = {int: "an integer", str: "a string", bool: "true or false", float: "a number", type(None): "null"}
    if typing.get_origin(hint) in _UNIONS:
        return " or ".join(_name(a) for a in typing.get_args(hint))
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _show(value: Any) -> str:
    text = json.dumps(value)
    return (text if len(text) <= 40 else text[:37] + "...") + f" ({type(value).__name__})"
