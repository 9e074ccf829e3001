"""The one error family: every error clipzsl raises on purpose derives from `ClipzslError`.

So a caller (the command line, the service, a user's script) can tell "the input or a file is
wrong, and the message says how to fix it" from a bug, whose traceback must be seen. Each
error also keeps the built-in class it replaced (ValueError, RuntimeError), so `except
ValueError` in older user code still catches it.
"""
from __future__ import annotations


class ClipzslError(Exception):
    """Base of every error clipzsl raises on purpose; its message says what to change."""


class InputError(ClipzslError, ValueError):
    """An argument, option or input that cannot be used as given (the message names it and the fix)."""


class InputTypeError(InputError, TypeError):
    """An argument of a type that cannot be used (the message says which types can); still a TypeError."""


class MissingExtra(ClipzslError, ImportError):
    """A feature needs a package that is not installed; the message gives the `pip install` that adds it."""
