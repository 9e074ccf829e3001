"""Where benchmark results go: JSON + a Markdown note, each naming the command, commit and machine."""
from __future__ import annotations

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
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """HEAD's hash, marked '-dirty' when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS_DIR.parent).stdout.strip()

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


def write(name: str, results: dict, summary_lines: list[str]) -> Path:
    """Write results/<name>.json and results/<name>.md; returns the JSON path."""
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


def main(doc: str, name: str, run: Callable[[bool], object], quick_help: str) -> None:
    """The command line of a benchmark whose only option is --quick: run it, then print its page.

    --quick writes under results/quick/, as `python -m benchmarks --quick` does, so the full results stay."""
    import argparse

    global RESULTS_DIR
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    quick = parser.parse_args().quick
    if quick:
        RESULTS_DIR = RESULTS_DIR / "quick"
    run(quick)
    print((RESULTS_DIR / f"{name}.md").read_text())
