"""The benchmark suite: every benchmark in turn, then one page, benchmarks/results/RESULTS.md.

  python -m benchmarks                   # everything (about an hour on 2 shared cores)
  python -m benchmarks --quick           # small sizes, under 10 minutes; results in benchmarks/results/quick/
  python -m benchmarks --only pipeline   # some benchmarks; RESULTS.md keeps the others' latest results
  python -m benchmarks --page-only       # rebuild RESULTS.md and speed.png from the JSON, running nothing
  python -m benchmarks --list            # every benchmark, and which run by name only

Each benchmark is a module benchmarks/bench_<name>.py, registered in BENCHMARKS, with one entry point
for the suite, `run(quick: bool = False) -> dict`, and its own command line, `main(argv)` (`python -m
benchmarks.bench_<name> --quick ...`). Its results go through one recorder, `report.write`: <name>.json
(command, commit, date, machine) and, unless written by hand, <name>.md. Code that runs in a fresh
process is a function of benchmarks.children. A benchmark that fails is reported on the
page with its error and the others still run; a data set that cannot be fetched is reported as
skipped with the reason. The page assembles every benchmark's Markdown, a summary of the targets,
and the plots: accuracy.png (per data set and template set) and speed.png (speed ratios).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from . import common, report

#: every benchmark, in page order: name (benchmarks/bench_<name>.py) -> title
BENCHMARKS = {
    "accuracy": "Zero-shot accuracy per data set and template set",
    "descriptions": "WordNet descriptions (`clipzsl labels wordnet`) against templates, and both ensembled",
    "classifier_build": "Speed 1: classifier building, clipzsl vs open_clip.build_zero_shot_classifier",
    "pipeline": "Speed 2: classification, clipzsl `hf:` backend vs transformers' zero-shot pipeline",
    "image_encoding": "Speed 3: image encoding, clipzsl vs a plain loop, and faster modes",
    "default": "The packaged default, chosen by measurement: each direction's gain, calibration, cost",
    "head": "Top-k labels with probabilities: the old FAISS path of `predict` against `clipzsl.head.top_k`",
    "view_rule": "The packaged default's view per image: the whole image, or a crop for photos",
    "localisation": "Heat maps against ground truth: pointing, label sensitivity, bias checks",
    "zoom": "The attention-guided zoom: top-1 with and without it, on photos, objects in photos and cut-outs",
    "adapter": "Cross-attention adapter vs zero-shot, linear probe, CLIP-Adapter and Tip-Adapter-F",
    "tip": "Few-shot without training: zero-shot vs Tip-Adapter, Tip-Adapter-F and the cross-attention adapter",
    "retrieval": "Zero-shot retrieval (CLIP_benchmark's recall@k) on Tux Paint stamps and emoji with their captions",
    "linear_probe": "Linear probe (CLIP_benchmark's) at 1-16 shots and full, next to zero-shot and the adapter",
    "dedup": "Near-duplicate detection: the embedding and a perceptual hash, precision and recall on planted copies of real images",
    "store": "Label store and label search at scale",
    "store_scale": "The embedding store at scale: append, open, label cache, from-shards, index images",
    "compressed": "An index under a memory budget (--max-memory), built in one pass over shards",
    "ann": "Approximate indexes for text-like and image-like queries: recall@10 against ms per query",
    "filter": "Search inside a metadata filter (--where) against the unfiltered search: overhead and recall",
    "serve": "`clipzsl serve` under load, and its page in a real browser",
    "gpu": "Device and precision: images/s end to end, fp32 against bf16, the pipeline's memory",
    "distributed": "Ray Data's overhead at equal cores",
    "onnx": "ONNX export against torch: install size, image-tower speed on the CPU, what serving imports",
}
#: run only when named (--only), and why: the plain run stays about an hour on 2 cores
BY_NAME_ONLY = {
    "adapter": "trains every method over 3 seeds on two data sets",
    "tip": "fits four methods at 1/4/16 shots over 2 seeds (a few minutes)",
    "store": "encodes 100k labels (25-50 min)",
    "store_scale": "a million rows, autofaiss in its own venv",
    "compressed": "a million rows, built under two budgets (about 15 min on 2 cores)",
    "ann": "six indexes over a million rows (about 30 min)",
    "filter": "a million rows, one index for four selectivities (about 10 min)",
    "serve": "load tests of a live server, a browser for the screenshot",
    "gpu": "a GPU measurement",
    "distributed": "needs Ray",
}


def discover() -> list[str]:
    """Every registered benchmark, in page order."""
    return list(BENCHMARKS)


def default_run() -> list[str]:
    """The benchmarks that `python -m benchmarks` runs when none is named."""
    return [name for name in BENCHMARKS if name not in BY_NAME_ONLY]


def listing() -> list[str]:
    """One line per benchmark: its name, when it runs, its title."""
    return [f"{name:17} {'by name: ' + BY_NAME_ONLY[name] if name in BY_NAME_ONLY else 'default'}\n"
            f"{'':17} {title}" for name, title in BENCHMARKS.items()]


def run_one(name: str, quick: bool) -> dict:
    """Run bench_<name>.run(quick); a failure is written as that benchmark's result, with the error."""
    from .datasets import DatasetUnavailable

    start = time.perf_counter()
    print(f"== {name}{' (quick)' if quick else ''}", flush=True)
    try:
        module = importlib.import_module(f"{__package__}.bench_{name}")
        results = module.run(quick=quick)
        status = "ok"
    except DatasetUnavailable as err:
        status, results = "skipped", {"error": str(err), "markdown": [f"**Skipped**: {err}"]}
    except Exception as err:  # noqa: BLE001 - report it and go on with the next benchmark
        tail = traceback.format_exc().strip().splitlines()[-12:]
        status = "failed"
        results = {"error": f"{type(err).__name__}: {err}", "traceback": tail,
                   "markdown": [f"**Failed**: `{type(err).__name__}: {err}`", "", "```", *tail, "```"]}
        traceback.print_exc()
    wall = time.perf_counter() - start
    if status != "ok":
        results.update(quick=quick, load_average={"after": common.load_average()})
        report.write(name, results, results["markdown"])
    print(f"== {name}: {status} in {wall:.0f} s", flush=True)
    return {"status": status, "wall_s": wall}


def load_records(names: list[str]) -> dict[str, dict]:
    """The latest <name>.json of each benchmark in the results directory (this run's or an earlier one's)."""
    records = {}
    for name in names:
        path = report.RESULTS_DIR / f"{name}.json"
        record = json.loads(path.read_text()) if path.exists() else {}
        if "results" in record and "command" in record:  # written by the recorder (not a hand-made file)
            records[name] = record
    return records


def plot_speed(records: dict[str, dict], path: Path) -> Path | None:
    """Every speed ratio (higher is better for clipzsl / the mode), with its target where it has one."""
    rows = [r for rec in records.values() for r in rec["results"].get("ratios", []) if r.get("value")]
    if not rows:
        return None
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]
    colors = ["#9e9e9e" if r["target"] is None else ("#3a9d5d" if r["value"] >= r["target"] else "#d0543c")
              for r in rows]
    ax.barh(y, [r["value"] for r in rows], color=colors, height=0.6)
    for yi, r in zip(y, rows):
        ax.text(max(r["value"], r["target"] or 0) * 1.08, yi,
                f"{r['value']:.2f}x" + (f"  (target {r['target']:g}x)" if r["target"] else ""), va="center", fontsize=8)
        if r["target"]:
            ax.plot([r["target"]] * 2, [yi - 0.38, yi + 0.38], color="black", linewidth=2)
    ax.set_xscale("log")
    values = [r["value"] for r in rows] + [r["target"] for r in rows if r["target"]]
    ax.set_xlim(min(values) / 1.5, max(values) * 4)
    ticks = [t for t in (0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if min(values) / 1.5 <= t <= max(values) * 4]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.minorticks_off()
    ax.axvline(1, color="black", linewidth=0.8, linestyle=":")
    ax.set_yticks(y, [r["name"] for r in rows], fontsize=8)
    ax.set_xlabel("speed ratio (log scale; > 1: clipzsl / the mode is faster)")
    ax.set_title("Speed ratios, medians of runs (black tick: target; green met, red missed, grey no target)",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3, which="both")
    return common.save(fig, path)


def suite_commit(records: dict[str, dict]) -> str:
    """The commit the page's results came from (several, if benchmarks ran at different commits)."""
    return "`, `".join(dict.fromkeys(record["commit"] for record in records.values())) or report.commit()


def page(records: dict[str, dict], statuses: dict[str, dict], command: str, total_s: float, date: str) -> list[str]:
    machine = report.machine()
    ran = ", ".join(f"{name} {s['status']} in {s['wall_s']:.0f} s" for name, s in statuses.items())
    lines = [
        "# clipzsl benchmark results",
        "",
        f"- command: `{command}` (this run: {ran}; total {total_s / 60:.1f} min)",
        f"- commit: `{suite_commit(records)}` (each section names its own), finished {date}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
        f"Python {machine['python']}, torch {machine['torch']}, {machine['platform']}",
        "- Absolute times on these shared 2-core machines are noisy (the load average of each benchmark is "
        "given: above 2 means other work shared the cores); read the ratios, each from one run that "
        "interleaves its sides.",
        "",
        "## Targets",
        "",
        "| benchmark | measure | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for name, record in records.items():
        for check in record["results"].get("checks", []):
            lines.append(f"| {name} | {check['name']} | {check['value']} | {check['target']} "
                         f"| {'yes' if check['met'] else '**no**'} |")
        if "error" in record["results"]:
            lines.append(f"| {name} | — | {record['results']['error'][:120]} | — | **not run** |")
    if (report.RESULTS_DIR / "speed.png").exists():
        lines += ["", "![speed ratios](speed.png)"]
    for name, record in records.items():
        res = record["results"]
        load = res.get("load_average") or {}
        when = "this run" if name in statuses else "an earlier run"
        lines += [
            "",
            f"## {BENCHMARKS.get(name, name)}",
            "",
            f"_From {when}: `{record['command']}` at commit `{record['commit']}`, {record['date']}"
            + (", --quick sizes" if res.get("quick") else "")
            + (f"; load average {load.get('before')} before, {load.get('after')} after" if load else "")
            + f". Raw data: [{name}.json]({name}.json)._",
            "",
            *res.get("markdown", [f"See [{name}.md]({name}.md)."]),
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under 10 minutes on 2 cores")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (any of --list)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--page-only", action="store_true",
                        help="run nothing: rebuild RESULTS.md and speed.png from the results directory's JSON")
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results, "
                                                 "benchmarks/results/quick with --quick)")
    args = parser.parse_args(argv)
    names = discover()
    if args.list:
        print("\n".join(listing()))
        return 0
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(names)}")
    report.RESULTS_DIR = (args.out or (report.RESULTS_DIR / "quick" if args.quick else report.RESULTS_DIR)).resolve()
    report.RESULTS_DIR.mkdir(parents=True, exist_ok=True)

    suite_path = report.RESULTS_DIR / "suite.json"
    if args.page_only:  # the last run's command, statuses and time, as suite.json recorded them
        if not suite_path.exists():
            parser.error(f"--page-only: no {suite_path}; run the suite first")
        suite = json.loads(suite_path.read_text())
        command, statuses, total, date = suite["command"], suite["benchmarks"], suite["total_s"], suite["date"]
    else:
        start = time.perf_counter()
        statuses = {name: run_one(name, args.quick) for name in (args.only or default_run())}
        total = time.perf_counter() - start
        command, date = report.invocation(), datetime.now(timezone.utc).isoformat(timespec="seconds")
        suite = {"command": command, "commit": report.commit(), "machine": report.machine(), "total_s": total,
                 "benchmarks": statuses, "date": date}
        suite_path.write_text(json.dumps(suite, indent=2) + "\n")

    records = load_records(names)
    try:
        plot_speed(records, report.RESULTS_DIR / "speed.png")
    except Exception:  # noqa: BLE001 - the page is still written without the plot
        traceback.print_exc()
    (report.RESULTS_DIR / "RESULTS.md").write_text("\n".join(page(records, statuses, command, total, date)) + "\n")
    print(f"wrote {report.RESULTS_DIR / 'RESULTS.md'}" + ("" if args.page_only else f" in {total / 60:.1f} min"),
          flush=True)
    return 0 if all(s["status"] == "ok" for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
