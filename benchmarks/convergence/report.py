"""Summarise the matrix: a markdown table, a JSON summary and PNG curves.

Reads the per-run JSON files written by :mod:`benchmarks.convergence.run` and
writes ``<docs>/convergence<tag>-results.json`` (per-run finals, curves and byte
counts plus mean ± spread per configuration), ``<docs>/img/convergence<tag>-<task>-w<world>.png``
(validation metric per epoch, mean over seeds, min-max band) and prints the table.

Example::

    python -m benchmarks.convergence report --results benchmarks/results/convergence --docs docs
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import logging
import os
import statistics

from .methods import METHODS
from .run import DEFAULT_OUT

logger = logging.getLogger("convergence")
LABELS = {"dense": "dense (allreduce)", "gradient_dropping": "gradient dropping (TopK 0.1 %, no MC)",
          "dgc": "DGC 99.9 % (MC + warm-up)", "dgc_no_warmup": "DGC without warm-up",
          "dgc_no_momentum_correction": "DGC without momentum correction",
          "per_sign": "per-sign 0.1 % + means (Dryden et al.)", "per_sign_values": "per-sign 0.1 %, values (no means)",
          "aji_heafield": "gradient dropping, sampled (Aji & Heafield)"}


def load(folder: str) -> list[dict]:
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def merge_runs(runs: list[dict], previous: str) -> list[dict]:
    """``runs`` plus the runs of a previous results JSON that ``runs`` does not redo."""
    key = lambda r: (r["task"], r["method"], r["seed"], r["world"])  # noqa: E731
    with open(previous) as f:
        old = json.load(f)["runs"]
    done = {key(r) for r in runs}
    kept = [r for r in old if key(r) not in done]
    logger.info("%d runs from %s kept, %d redone", len(kept), previous, len(old) - len(kept))
    return sorted(runs + kept, key=key)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (task, world, method): final metric mean / min / max over seeds, gap to dense, ratios."""
    groups = collections.defaultdict(list)
    for r in runs:
        groups[(r["task"], r["world"], r["method"])].append(r)
    rows = []
    for (task, world, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], METHODS.index(kv[0][2]))):
        finals = [r["final"] for r in rs]
        dense = groups.get((task, world, "dense"))
        dense_mean = statistics.mean(r["final"] for r in dense) if dense else float("nan")
        mean = statistics.mean(finals)
        gap = (mean - dense_mean) * 100 if rs[0]["metric"] == "accuracy" else (mean / dense_mean - 1) * 100
        rows.append({"task": task, "world": world, "method": method, "metric": rs[0]["metric"],
                     "seeds": sorted(r["seed"] for r in rs), "mean": mean, "min": min(finals), "max": max(finals),
                     "std": statistics.stdev(finals) if len(finals) > 1 else 0.0, "gap_to_dense": gap,
                     "ratio_after_warmup": statistics.mean(r["ratio_after_warmup"] for r in rs),
                     "ratio_all_steps": statistics.mean(r["ratio_all_steps"] for r in rs),
                     "bytes_sent_per_step": statistics.mean(r["bytes_sent_per_step"] for r in rs),
                     "steps": rs[0]["steps"], "seconds": statistics.mean(r["seconds"] for r in rs)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| task | world | method | seeds | final (mean ± std) | min – max | vs dense | compression after warm-up "
             "| compression all steps | bytes sent/step/rank |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = r["metric"] == "accuracy"
        fmt = (lambda v: f"{100 * v:.2f} %") if acc else (lambda v: f"{v:.2f}")
        gap = f"{r['gap_to_dense']:+.2f} pp" if acc else f"{r['gap_to_dense']:+.2f} %"
        lines.append(f"| {r['task']} ({'val accuracy' if acc else 'val perplexity'}) | {r['world']} | {LABELS[r['method']]} "
                     f"| {len(r['seeds'])} | {fmt(r['mean'])} ± {fmt(r['std']).split()[0]} | {fmt(r['min'])} – "
                     f"{fmt(r['max'])} | {gap} | {r['ratio_after_warmup']:.0f}× | {r['ratio_all_steps']:.0f}× "
                     f"| {r['bytes_sent_per_step']:,.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict], img: str, tag: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, world in sorted({(r["task"], r["world"]) for r in runs}):
        fig, (ax, lx) = plt.subplots(1, 2, figsize=(12, 4.4))
        metric = "accuracy"
        for method in METHODS:
            rs = [r for r in runs if (r["task"], r["world"], r["method"]) == (task, world, method)]
            if not rs:
                continue
            metric = rs[0]["metric"]
            epochs = [p["epoch"] for p in rs[0]["curve"]]
            for axis, key, scale in ((ax, metric, 100 if metric == "accuracy" else 1), (lx, "train_loss", 1)):
                values = [[p[key] * scale for p in r["curve"]] for r in rs]
                line, = axis.plot(epochs, [statistics.mean(v) for v in zip(*values)],
                                  label=f"{LABELS[method]} ({len(rs)} seeds)")
                axis.fill_between(epochs, [min(v) for v in zip(*values)], [max(v) for v in zip(*values)],
                                  color=line.get_color(), alpha=0.15)
        ax.set_ylabel("validation accuracy (%)" if metric == "accuracy" else "validation perplexity")
        if metric == "accuracy":
            ax.set_ylim(80, 100)
        else:
            ax.set_yscale("log")
        lx.set_yscale("log")
        lx.set_ylabel("training loss (rank 0, epoch mean)")
        epochs_run = next(r["config"]["epochs"] for r in runs if (r["task"], r["world"]) == (task, world))
        fig.suptitle(f"{task}, {world} ranks (gloo), {epochs_run} epochs; mean over seeds, band: min-max", fontsize=11)
        for axis in (ax, lx):
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(img, f"convergence{tag}-{task}-w{world}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=DEFAULT_OUT)
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--tag", default="", help="inserted into the output file names (e.g. -long)")
    parser.add_argument("--keep", metavar="RESULTS_JSON",
                        help="a previous convergence-results.json: its runs join the table unless --results "
                             "has a run of the same task, method, seed and world (re-running part of the matrix)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = load(args.results)
    if args.keep:
        runs = merge_runs(runs, args.keep)
    if not runs:
        raise SystemExit(f"no results in {args.results}; run `python -m benchmarks.convergence run` first")
    rows = summarise(runs)
    os.makedirs(os.path.join(args.docs, "img"), exist_ok=True)
    with open(os.path.join(args.docs, f"convergence{args.tag}-results.json"), "w") as f:
        json.dump({"summary": rows, "runs": runs}, f, indent=1)
    for path in plot(runs, os.path.join(args.docs, "img"), args.tag):
        logger.info("wrote %s", path)
    print(table(rows))
