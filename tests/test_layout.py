"""Issue 20's bounds on the code's shape: every function of clipzsl/ stays simple enough to read
(radon's cyclomatic complexity at most 15), and the command line stays a thin shell."""
from pathlib import Path

import pytest

radon_complexity = pytest.importorskip("radon.complexity")

PACKAGE = Path(__file__).resolve().parent.parent / "clipzsl"
MAX_COMPLEXITY = 15
MAX_CLI_LINES = 600


def blocks(path: Path):
    for block in radon_complexity.cc_visit(path.read_text(encoding="utf-8")):
        yield block
        yield from getattr(block, "methods", [])


def test_no_function_of_the_library_is_more_complex_than_the_bound():
    tangled = [f"{path.relative_to(PACKAGE.parent)}:{block.lineno} {block.fullname} ({block.complexity})"
               for path in sorted(PACKAGE.rglob("*.py")) for block in blocks(path)
               if block.complexity > MAX_COMPLEXITY]
    assert not tangled, f"split these into short functions (complexity > {MAX_COMPLEXITY}): {tangled}"


def test_the_command_line_is_a_thin_shell():
    lines = len((PACKAGE / "cli.py").read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_CLI_LINES, f"cli.py has {lines} lines: move the workflow into the library's API"
