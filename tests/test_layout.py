"""Issue 20's bounds on the code's shape: every function of clipzsl/ stays simple enough to read
(radon's cyclomatic complexity at most 15), and the command line stays a thin shell."""
import ast
from pathlib import Path

import pytest

radon_complexity = pytest.importorskip("radon.complexity")

PACKAGE = Path(__file__).resolve().parent.parent / "clipzsl"
MAX_COMPLEXITY = 15
MAX_CLI_MODULE_LINES = 250  # one module per group of commands (clipzsl/cli/)
MAX_COMMAND_LINES = 25  # a command function reads its arguments, calls the library once and prints


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
    """Bounds per module and per function, not on the whole: new commands add modules, but no command
    grows a workflow of its own (`register`, which only declares arguments, is exempt)."""
    long_modules, long_functions = [], []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        if len(source.splitlines()) > MAX_CLI_MODULE_LINES:
            long_modules.append(path.name)
        long_functions += [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
                           for node in ast.walk(ast.parse(source))
                           if isinstance(node, ast.FunctionDef) and node.name != "register"
                           and node.end_lineno - node.lineno + 1 > MAX_COMMAND_LINES]
    assert not long_modules, f"over {MAX_CLI_MODULE_LINES} lines: {long_modules}; split the group of commands"
    assert not long_functions, f"move the workflow into the library's API: {long_functions}"
