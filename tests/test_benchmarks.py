"""The benchmark harness: every benchmark registered with one entry point, and one recorder for results."""
from __future__ import annotations

import ast
import importlib
import inspect
import json
from pathlib import Path

import pytest

from benchmarks import __main__ as suite
from benchmarks import report

BENCH_DIR = Path(suite.__file__).parent
MODULES = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def test_every_benchmark_module_is_registered():
    assert sorted(suite.discover()) == MODULES
    assert set(suite.BY_NAME_ONLY) < set(suite.BENCHMARKS)
    assert suite.default_run() and not set(suite.default_run()) & set(suite.BY_NAME_ONLY)


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_has_the_same_entry_points(name):
    module = importlib.import_module(f"benchmarks.bench_{name}")
    params = inspect.signature(module.run).parameters
    assert list(params)[0] == "quick" and params["quick"].default is False
    assert all(p.default is not p.empty for p in params.values())  # the suite calls run(quick=...) alone
    assert list(inspect.signature(module.main).parameters) == ["argv"]


@pytest.mark.parametrize("path", sorted(BENCH_DIR.glob("*.py")), ids=lambda p: p.name)
def test_no_benchmark_runs_python_from_a_string_or_writes_results_itself(path):
    tree = ast.parse(path.read_text())
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert "-c" not in strings, f"{path.name}: code for a subprocess belongs in benchmarks.children"
    if path.name.startswith("bench_"):  # their results/*.json are written by the recorder, report.write, only
        writes = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Attribute) and n.func.attr == "write_text"]
        assert not [w for w in writes if "json.dumps" in w and ("RESULTS" in w or "out" in w)], writes


def test_the_listing_names_every_benchmark(capsys):
    assert suite.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in MODULES) and "by name: needs Ray" in out


def test_a_quick_run_writes_its_result_with_command_commit_and_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS_DIR", report.RESULTS_DIR)  # restored after the test
    monkeypatch.setattr("sys.argv", [str(BENCH_DIR / "__main__.py"), "--only", "head", "--quick", "--out", str(tmp_path)])
    assert suite.main(["--only", "head", "--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "head.json").read_text())
    assert record["command"] == f"python -m benchmarks --only head --quick --out {tmp_path}"
    assert record["commit"] != "unknown" and len(record["commit"].split("-")[0]) == 12
    assert {"cpu", "cores", "python", "torch"} <= set(record["machine"])
    assert record["results"]["quick"] is True and record["results"]["labels"] == 20_000
    md = (tmp_path / "head.md").read_text()
    assert f"- commit: `{record['commit']}`" in md and "- machine:" in md
    assert "## Top-k labels with probabilities" in (tmp_path / "RESULTS.md").read_text()


def test_unknown_benchmark_is_refused(capsys):
    with pytest.raises(SystemExit):
        suite.main(["--only", "nope"])
    assert "unknown benchmark(s) ['nope']" in capsys.readouterr().err
