"""The README's examples run as written: every `clipzsl` command line parses, every label or template set
it names is shipped, and every Python block compiles."""
from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest

from clipzsl.cli import build_parser
from clipzsl.prompts import load_labels, load_templates

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def command_lines() -> list[str]:
    """Each `clipzsl ...` command of the bash blocks, continuation lines joined, comments dropped."""
    text = "\n".join(blocks("bash")).replace("\\\n", " ")
    return [line.split("  #")[0].strip() for line in text.splitlines() if line.startswith("clipzsl ")]


def untyped(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The parser without its argument types: the checks that look at files (an --adapter folder that the
    example's reader makes first) are not this test's; option names, choices and counts still are."""
    for action in parser._actions:
        action.type = None
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                untyped(sub)
    return parser


def test_the_readme_has_command_examples():
    assert len(command_lines()) >= 15


@pytest.mark.parametrize("line", command_lines())
def test_each_command_line_parses_and_names_shipped_sets(line):
    argv = shlex.split(line)[1:]
    args = untyped(build_parser()).parse_args(argv)
    labels, templates = getattr(args, "labels", None), getattr(args, "templates", None)
    for value in labels if isinstance(labels, list) else [labels]:
        if value and "," not in value:
            assert load_labels(value), value
    if templates:
        assert load_templates(templates), templates


@pytest.mark.parametrize("number", range(len(blocks("python"))))
def test_each_python_block_compiles(number):
    ast.parse(blocks("python")[number])
