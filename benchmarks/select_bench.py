"""Time top-k selection at several densities: does a large k cost little more than a small one?

Two inputs, each timed at every density with DGC's call (``ops.sampled_topk_indices``,
sample ratio 0.01, a fresh start each call):

- ``25M``: one 25,000,000-element fp32 tensor (``randn``);
- ``resnet50``: every ResNet-50 parameter tensor that the reducer compresses (at least
  ``--min-numel`` elements, the reducer's default 4096), one call per tensor, as the
  per-parameter path does; ``randn`` gradients of the parameters' shapes;
- ``resnet50-segmented``: the same tensors end to end, every tensor's own top-k by one
  ``ops.segmented_topk_indices`` call (a bucket's selection in one call).

Rounds interleave the densities (one call of each per round), so load that drifts during the
run hits every density alike. The table gives min / median / max wall ms per call (per step for
``resnet50``), the median as a multiple of the first density's (0.1 %) median measured in the
same run and of one read of the input (``x.sum()``, also timed in the run), and the median CPU
time of the calling thread (``time.thread_time``; with ``--threads 1`` all the work, page faults
included) with its ratio: on a busy machine the wall times wander with other processes, the CPU
times much less. ``uptime`` is printed before and after; compare ratios within one run.

    python -m benchmarks.select_bench                 # both inputs, 1 thread, 9 rounds
    python -m benchmarks.select_bench --inputs 25M --rounds 5 --json out.json

``--check`` also compares every result with ``gradsparse._reference`` once (slow: the
reference runs torch.topk at each density).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from benchmarks.bench_models import make_model  # noqa: E402
from gradsparse import _reference, ops  # noqa: E402

DENSITIES = (0.001, 0.01, 0.0625, 0.1, 0.25)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def _inputs(name: str, min_numel: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if name == "25M":
        return [torch.randn(25_000_000, generator=g)]
    shapes = [p.shape for p in make_model("resnet50").parameters() if p.numel() >= min_numel]
    return [torch.randn(s, generator=g).reshape(-1) for s in shapes]


def _select_all(tensors: list[torch.Tensor], density: float, gen: torch.Generator) -> list[torch.Tensor]:
    return [ops.sampled_topk_indices(x, max(1, math.ceil(density * x.numel())), 0.01, gen) for x in tensors]


def _select_segmented(flat: torch.Tensor, offsets: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """The same selections by one ``segmented_topk_select`` call over the tensors laid end to end (laid out
    once, outside the timing: a bucket is laid out that way already)."""
    ks = torch.tensor([max(1, math.ceil(density * int(n))) for n in offsets[1:] - offsets[:-1]])
    return ops.segmented_topk_indices(flat, offsets, ks, 0.01, gen)


def _time(fn) -> tuple[float, float]:
    """(wall ms, ms of CPU time of the calling thread): the second is less sensitive to other load."""
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3


def run(name: str, densities, rounds: int, min_numel: int, check: bool) -> list[dict]:
    if name == "resnet50-segmented":
        return run_segmented(densities, rounds, min_numel, check)
    tensors = _inputs(name, min_numel)
    gen = torch.Generator().manual_seed(1)
    if check:
        for d in densities:
            for x, got in zip(tensors, _select_all(tensors, d, gen)):
                want = _reference.topk_indices(x, max(1, math.ceil(d * x.numel())))
                assert torch.equal(got, want), (name, d, x.numel())
    return _table(name, tensors, densities, rounds, lambda d: _select_all(tensors, d, gen), len(tensors))


def _table(name: str, tensors: list[torch.Tensor], densities, rounds: int, select, count: int) -> list[dict]:
    """Times ``select(density)`` and one read of ``tensors``, interleaved over the rounds; one row per case."""
    cases = ["read", *(f"{d:g}" for d in densities)]
    wall: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    select(densities[0])  # warm-up: first touch of the allocator and the threads
    for _ in range(rounds):
        for case in cases:
            if case == "read":
                w, c = _time(lambda: [x.sum() for x in tensors])
            else:
                w, c = _time(lambda d=float(case): select(d))
            wall[case].append(w)
            cpu[case].append(c)
    rows = []
    for case in cases:
        med, cpu_med = statistics.median(wall[case]), statistics.median(cpu[case])
        rows.append({"input": name, "case": case, "tensors": count,
                     "numel": sum(x.numel() for x in tensors), "min_ms": min(wall[case]), "median_ms": med,
                     "max_ms": max(wall[case]), "cpu_median_ms": cpu_med,
                     "vs_first_density": med / statistics.median(wall[cases[1]]),
                     "cpu_vs_first_density": cpu_med / statistics.median(cpu[cases[1]]),
                     "read_passes": med / statistics.median(wall["read"])})
    return rows


def run_segmented(densities, rounds: int, min_numel: int, check: bool) -> list[dict]:
    """``resnet50`` as one bucket: every tensor's top-k by one segmented call."""
    parts = _inputs("resnet50", min_numel)
    flat = torch.cat(parts)
    offsets = torch.tensor([0, *(x.numel() for x in parts)]).cumsum(0)
    gen = torch.Generator().manual_seed(1)
    if check:
        for d in densities:
            want = torch.cat([i + int(o) for i, o in zip(_select_all(parts, d, gen), offsets)])
            assert torch.equal(_select_segmented(flat, offsets, d, gen), want), d
    return _table("resnet50-segmented", [flat], densities, rounds, lambda d: _select_segmented(flat, offsets, d, gen),
                  len(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", default="25M,resnet50,resnet50-segmented")
    parser.add_argument("--densities", default=",".join(f"{d:g}" for d in DENSITIES))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-numel", type=int, default=4096)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    densities = tuple(float(d) for d in args.densities.split(","))
    before = _uptime()
    rows = []
    for name in args.inputs.split(","):
        rows += run(name, densities, args.rounds, args.min_numel, args.check)
    after = _uptime()
    print(f"backend {ops.BACKEND}, {args.threads} thread(s), {args.rounds} rounds")
    print(f"uptime before: {before}\nuptime after:  {after}")
    print(f"{'input':<18} {'case':>7} {'min ms':>9} {'median ms':>10} {'max ms':>9} {'x first':>8} {'x read':>7} "
          f"{'cpu ms':>8} {'cpu x first':>12}")
    for r in rows:
        print(f"{r['input']:<18} {r['case']:>7} {r['min_ms']:9.2f} {r['median_ms']:10.2f} {r['max_ms']:9.2f} "
              f"{r['vs_first_density']:8.2f} {r['read_passes']:7.1f} {r['cpu_median_ms']:8.2f} "
              f"{r['cpu_vs_first_density']:12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"uptime_before": before, "uptime_after": after, "threads": args.threads,
                       "backend": ops.BACKEND, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
