"""Benchmark helpers: speed-ups against a baseline measured in the same run.

After a ``pytest benchmarks --benchmark-only`` run, every benchmark group gets a
table of medians, the speed-up ``torch_topk median / case median`` (above 1:
faster than torch.topk), and each case's time as a multiple of one memory pass
(``memory_pass_clone``) and of one dense write (``memory_write_zero``), all
measured in the same run.
The table is printed and written to ``benchmarks/results/<group-slug>.md``.
"""

from __future__ import annotations

import os
import platform
import re

import torch

BASELINE = "torch_topk"
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _medians(config) -> dict[str, dict[str, float]]:
    session = getattr(config, "_benchmarksession", None)
    groups: dict[str, dict[str, float]] = {}
    for bench in getattr(session, "benchmarks", []) or []:
        if bench.stats.rounds:
            case = bench.name.split("[")[0].removeprefix("test_")
            groups.setdefault(bench.group or "", {})[case] = bench.stats.median
    return groups


def pytest_terminal_summary(terminalreporter, config):
    groups = _medians(config)
    if not groups:
        return
    os.makedirs(RESULTS, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    for group, cases in sorted(groups.items()):
        base = cases.get(BASELINE)
        clone, write = cases.get("memory_pass_clone"), cases.get("memory_write_zero")
        lines = [f"### {group}", "", f"Machine: {machine}", "",
                 "| case | median ms | speed-up vs torch.topk | time / one clone | time / one zero-fill |",
                 "|---|---:|---:|---:|---:|"]

        def ratio(a, b):
            return f"{a / b:.1f}x" if a and b else "n/a"

        for case, median in sorted(cases.items(), key=lambda kv: kv[1]):
            lines.append(f"| {case} | {1e3 * median:.1f} | {ratio(base, median)} | {ratio(median, clone)} "
                         f"| {ratio(median, write)} |")
        text = "\n".join(lines) + "\n"
        terminalreporter.write_line("")
        terminalreporter.write(text)
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", group).strip("-")
        with open(os.path.join(RESULTS, f"{slug}.md"), "w") as f:
            f.write(text)
