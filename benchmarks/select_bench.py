"""Time top-k selection at several densities: does a large k cost little more than a small one?

Two inputs, each timed at every density with DGC's call (``ops.sampled_topk_indices``,
sample ratio 0.01, a fresh start each call):

- ``25M``: one 25,000,000-element fp32 tensor (``randn``);
- ``resnet50``: every ResNet-50 parameter tensor that the reducer compresses (at least
  ``--min-numel`` elements, the reducer's default 4096), one call per tensor, as the
  per-parameter path does; ``randn`` gradients of the parameters' shapes;
- ``resnet50-segmented``: the same tensors end to end, every tensor's own top-k by one
  ``ops.segmented_topk_indices`` call (a bucket's selection in one call);
- ``resnet50-candidates`` (not in the default list): the same bucket, the compensation pass with and
  without collecting selection candidates (``dgc_compensate_candidates``, floors at 0.9x the true k-th
  magnitudes) and the segmented selection with and without them; ``x plain`` and ``cpu x plain`` are
  each one's median (wall, CPU time) as a multiple of the plain op's in the same run.

Rounds interleave the densities (one call of each per round), so load that drifts during the
run hits every density alike. The table gives min / median / max wall ms per call (per step for
``resnet50``), the median as a multiple of the first density's (0.1 %) median measured in the
same run and of one read of the input (``x.sum()``, also timed in the run), and the median CPU
time of the calling thread (``time.thread_time``; with ``--threads 1`` all the work, page faults
included) with its ratio: on a busy machine the wall times wander with other processes, the CPU
times much less. ``uptime`` is printed before and after; compare ratios within one run.

    python -m benchmarks.select_bench                 # both inputs, 1 thread, 9 rounds
    python -m benchmarks.select_bench --inputs 25M --rounds 5 --json out.json
    python -m benchmarks.select_bench --inputs resnet50-candidates --densities 0.001,0.01 --check
    python -m benchmarks.select_bench --inputs resnet50-candidates --densities 0.001,0.01 --grad-dtype bfloat16

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
from gradsparse import _reference, model_shapes, ops  # noqa: E402

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


def run_candidates(densities, rounds: int, min_numel: int, check: bool,
                   grad_dtype: torch.dtype = torch.float32) -> list[dict]:
    """``resnet50-candidates``: the compressed ResNet-50 tensors (``gradsparse.model_shapes.resnet50``, at least
    ``min_numel`` elements) laid end to end as one bucket, DGC's compensation and selection with and without
    the candidates collected in the compensation pass. Per density: ``dgc_compensate_into`` alone against
    ``dgc_compensate_candidates`` (floors at 0.9x each segment's true k-th magnitude, caps 4k + 64), and
    ``segmented_topk_select`` against ``segmented_topk_select_candidates`` on the same compensated buffer.
    ``into+cand@inf`` is the candidate pass with every floor +inf (collects nothing: the driver's own cost).
    The gradient is ``grad_dtype``. The state is not advanced (outputs into scratch buffers), so every call
    sees the same input."""
    sizes = [math.prod(shape) for _, shape in model_shapes.resnet50() if math.prod(shape) >= min_numel]
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    n = int(offsets[-1])
    g = torch.Generator().manual_seed(0)
    u, v, grad = torch.randn(n, generator=g) * 0.1, torch.randn(n, generator=g), torch.randn(n, generator=g)
    grad = grad.to(grad_dtype)
    no_floors, no_caps = torch.full((len(sizes),), math.inf, dtype=torch.float64), torch.zeros(len(sizes),
                                                                                               dtype=torch.int64)
    u_out, v_out = torch.empty(n), torch.empty(n)
    ops.dgc_compensate_into(u, v, grad, 0.9, False, u_out, v_out)
    plans = {}
    for d in densities:
        ks = torch.tensor([max(1, math.ceil(d * m)) for m in sizes])
        kth = [float(v_out[int(a):int(b)].abs().topk(int(k)).values[-1]) for a, b, k in zip(offsets, offsets[1:], ks)]
        floors = torch.tensor([0.9 * t for t in kth], dtype=torch.float64)
        caps = ks * 4 + 64
        _, cand, counts, values = ops.dgc_compensate_candidates(u, v, grad, 0.9, False, u_out, v_out, offsets, floors,
                                                               caps)
        plans[d] = (ks, floors, caps, cand, counts, values)
        if check:
            pos, _ = ops.segmented_topk_candidates(v_out, offsets, ks, cand, counts, caps, values=values)
            assert torch.equal(pos, ops.segmented_topk_indices(v_out, offsets, ks)), d
            assert bool((counts <= caps).all()) and bool((counts >= ks).all()), d  # every segment from candidates

    def case(name: str):
        kind, _, density = name.partition("@")
        if kind == "read":
            return lambda: v_out.sum()
        if kind == "into":
            return lambda: ops.dgc_compensate_into(u, v, grad, 0.9, False, u_out, v_out)
        if name == "into+cand@inf":
            return lambda: ops.dgc_compensate_candidates(u, v, grad, 0.9, False, u_out, v_out, offsets, no_floors,
                                                         no_caps)
        ks, floors, caps, cand, counts, values = plans[float(density)]
        if kind == "into+cand":
            return lambda: ops.dgc_compensate_candidates(u, v, grad, 0.9, False, u_out, v_out, offsets, floors, caps)
        if kind == "select":
            return lambda: torch.ops.gradsparse.segmented_topk_select(v_out, offsets, ks, 0.01, 0)
        return lambda: torch.ops.gradsparse.segmented_topk_select_candidates(v_out, offsets, ks, cand, counts, caps,
                                                                             0.01, 0, values)

    names = ["read", "into", "into+cand@inf",
             *(f"{k}@{d:g}" for d in densities for k in ("into+cand", "select", "select+cand"))]
    wall: dict[str, list[float]] = {c: [] for c in names}
    cpu: dict[str, list[float]] = {c: [] for c in names}
    for name in names:  # warm-up
        case(name)()
    for _ in range(rounds):
        for name in names:
            w, c = _time(case(name))
            wall[name].append(w)
            cpu[name].append(c)
    read = statistics.median(wall["read"])
    rows = []
    for name in names:
        med, cpu_med = statistics.median(wall[name]), statistics.median(cpu[name])
        kind = name.partition("@")[0]
        plain = {"into+cand": "into", "select+cand": name.replace("select+cand", "select")}.get(kind)
        rows.append({"input": f"resnet50-candidates-{str(grad_dtype).removeprefix('torch.')}", "case": name,
                     "tensors": len(sizes), "numel": n,
                     "min_ms": min(wall[name]), "median_ms": med, "max_ms": max(wall[name]),
                     "cpu_median_ms": cpu_med, "read_passes": med / read,
                     "vs_plain": med / statistics.median(wall[plain]) if plain else None,
                     "cpu_vs_plain": cpu_med / statistics.median(cpu[plain]) if plain else None})
    return rows


def _print_candidates(rows: list[dict]) -> None:
    print(f"{'input':<29} {'case':>17} {'min ms':>9} {'median ms':>10} {'max ms':>9} {'x read':>7} {'x plain':>8} "
          f"{'cpu ms':>8} {'cpu x plain':>12}")
    for r in rows:
        plain = f"{r['vs_plain']:8.2f}" if r["vs_plain"] else f"{'':>8}"
        cpu_plain = f"{r['cpu_vs_plain']:12.2f}" if r["cpu_vs_plain"] else f"{'':>12}"
        print(f"{r['input']:<29} {r['case']:>17} {r['min_ms']:9.2f} {r['median_ms']:10.2f} {r['max_ms']:9.2f} "
              f"{r['read_passes']:7.1f} {plain} {r['cpu_median_ms']:8.2f} {cpu_plain}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", default="25M,resnet50,resnet50-segmented")
    parser.add_argument("--densities", default=",".join(f"{d:g}" for d in DENSITIES))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-numel", type=int, default=4096)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--grad-dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                        help="the gradient's dtype in resnet50-candidates")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    densities = tuple(float(d) for d in args.densities.split(","))
    before = _uptime()
    rows = []
    candidate_rows = []
    for name in args.inputs.split(","):
        if name == "resnet50-candidates":
            candidate_rows += run_candidates(densities, args.rounds, args.min_numel, args.check,
                                             getattr(torch, args.grad_dtype))
        else:
            rows += run(name, densities, args.rounds, args.min_numel, args.check)
    after = _uptime()
    print(f"backend {ops.BACKEND}, {args.threads} thread(s), {args.rounds} rounds")
    print(f"uptime before: {before}\nuptime after:  {after}")
    if rows:
        print(f"{'input':<18} {'case':>7} {'min ms':>9} {'median ms':>10} {'max ms':>9} {'x first':>8} "
              f"{'x read':>7} {'cpu ms':>8} {'cpu x first':>12}")
    for r in rows:  # resnet50-candidates: its own table below
        print(f"{r['input']:<18} {r['case']:>7} {r['min_ms']:9.2f} {r['median_ms']:10.2f} {r['max_ms']:9.2f} "
              f"{r['vs_first_density']:8.2f} {r['read_passes']:7.1f} {r['cpu_median_ms']:8.2f} "
              f"{r['cpu_vs_first_density']:12.2f}")
    if candidate_rows:
        _print_candidates(candidate_rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"uptime_before": before, "uptime_after": after, "threads": args.threads,
                       "backend": ops.BACKEND, "rows": rows + candidate_rows}, f, indent=1)


if __name__ == "__main__":
    main()
