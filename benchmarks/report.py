"""Where benchmark results go: JSON + a Markdown note, each naming the command, commit and machine."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """HEAD's hash of the code that runs (not of wherever the results go), marked '-dirty' when the
    working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def invocation() -> str:
    """The command line that is running, as `python -m benchmarks.<module> ...`."""
    module = Path(sys.argv[0]).stem
    module = "" if module == "__main__" else f".{module}"
    return " ".join(["python", "-m", f"benchmarks{module}", *map(shlex.quote, sys.argv[1:])])


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], object]:
    """Wall times of `repeats` calls and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def write(name: str, results: dict, summary_lines: list[str] | None) -> Path:
    """The recorder: every benchmark's results go through it. Writes results/<name>.json (the results
    with the command, commit, date and machine) and, unless `summary_lines` is None (a page written by
    hand from the JSON), results/<name>.md; returns the JSON path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "command": invocation(),
        "commit": commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "results": results,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    if summary_lines is None:
        return path
    m = record["machine"]
    header = [
        f"# {name}",
        "",
        f"- command: `{record['command']}`",
        f"- commit: `{record['commit']}`, {record['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"Python {m['python']}, torch {m['torch']}",
        "",
    ]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(header + summary_lines) + "\n")
    return path


def previous(name: str) -> dict:
    """The results of an earlier results/<name>.json ({} when there is none), for a benchmark whose parts
    not run now keep their earlier figures; a file written before the recorder is read whole."""
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return {}
    record = json.loads(path.read_text())
    return record["results"] if "results" in record and "command" in record else record


def quick_results() -> None:
    """Send this run's results under results/quick/, as `python -m benchmarks --quick` does, so that a
    benchmark's own command line with --quick leaves the full results alone."""
    global RESULTS_DIR
    RESULTS_DIR = RESULTS_DIR / "quick"


def parser(module: str, doc: str, quick_help: str) -> argparse.ArgumentParser:
    """A benchmark's argument parser, `python -m benchmarks.<module>`, with the --quick every one has."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def fill(args: Any, quick: dict, full: dict) -> Any:
    """The options left unset (None) on the command line, filled with --quick's sizes or the full ones."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def printer(summary: Callable[[dict], Sequence[str]]) -> Callable[[dict], None]:
    """`entry_points`' `show` for a benchmark whose `summary(results)` gives the lines of its page."""
    return lambda results: print("\n".join(summary(results)))


def entry_points(options: Callable[[Sequence[str] | None], Any], measure: Callable[[Any], dict],
                 show: Callable[[dict], object] = lambda results: None) -> tuple[Callable, Callable]:
    """A benchmark's two entry points, from its option parser and its measurement (which writes through
    `write`): `run(quick)` for the suite, with the defaults or --quick's; `main(argv)` for its own command
    line, whose --quick writes under results/quick/."""
    def run(quick: bool = False) -> dict:
        return measure(options(["--quick"] if quick else []))

    def main(argv: list[str] | None = None) -> None:
        args = options(argv)
        if args.quick:
            quick_results()
        show(measure(args))

    return run, main


def main(doc: str, name: str, run: Callable[[bool], object], quick_help: str, argv: list[str] | None = None) -> None:
    """The command line of a benchmark whose only option is --quick: run it, then print its page."""
    quick = parser(f"bench_{name}", doc, quick_help).parse_args(argv).quick
    if quick:
        quick_results()
    run(quick)
    print((RESULTS_DIR / f"{name}.md").read_text())
