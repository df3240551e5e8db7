"""Time single extension ops on ResNet-50's gradient buckets, caches flushed between calls.

``bucket_bench`` times whole steps; this times one op at a time over the same 5 DDP buckets
(25.6M fp32), so a change to one CPU loop can be seen apart from the rest of the step:

- ``sum``: ``torch.sum`` of every bucket (one read pass, the unit);
- ``absmax``: the health check's read (``torch.ops.gradsparse.absmax``);
- ``unpack D xW``: ``unpack_add`` of W payloads at density D (random ascending positions) into the
  buckets, overwriting them, as the reducer lands an allgather;
- ``select D``: ``segmented_topk_select`` of every bucket, each parameter of 4,096 elements or more
  selecting D of itself (no candidates: TopK 10 %'s and DGC's large warm-up stages' case, and any
  step whose candidate lists missed);
- ``pack D``: ``pack_gathered`` of D x each bucket's positions into a payload kept between calls;
- ``zero D``: ``index_zero_`` of two buffers at those positions (DGC's momentum and velocity);
- ``compensate``: DGC's in-place compensation of every bucket (``dgc_compensate_into``);
- ``zero, compensate D``: ``zero D`` then ``compensate``, DGC's memory update applied when the
  reduction lands and the next step's compensation; ``zero_compensate D`` the same in one pass
  (``dgc_zero_compensate``: the update deferred into the compensation, from the list of positions);
  ``mask_compensate D`` the same from the positions' bitmap (``dgc_mask_compensate``, what the reducer's
  deferred update reads on the CPU, gradsparse/arena.py).

Each call is preceded by a write over a 160 MB buffer, so the buckets come from memory, not the
32 MB L3. One thread. The row is the median (and min-max) over ``--repeats`` calls::

    python -m benchmarks.op_bench                       # table; JSON in benchmarks/results/op_bench.json
    python -m benchmarks.op_bench --densities 0.25 --worlds 1,2 --repeats 21
    python -m benchmarks.op_bench --densities 0.001,0.01,0.25 --ops select   # only the rows starting so

To compare two builds of the extension, run it with each (the ops are registered once per
process), alternating, several times.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from benchmarks.bucket_bench import buckets_of, write_json  # noqa: E402
from gradsparse import _reference, ops  # noqa: E402
from gradsparse.model_shapes import resnet50  # noqa: E402
from gradsparse.payload import PayloadLayout  # noqa: E402

logger = logging.getLogger("benchmarks.op_bench")
FLUSH_ELEMENTS = 40_000_000  # 160 MB of fp32: five times the L3
MIN_COMPRESS_NUMEL = 4096  # the reducer's default min_compress_numel: smaller parameters are sent whole


def _timed(fn, repeats: int, flush: torch.Tensor) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn``, each after a write over ``flush``."""
    times = []
    for _ in range(repeats):
        flush.add_(1.0)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _segments(buckets, density: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per bucket, ``segmented_topk_select``'s offsets and ks: every parameter of at least MIN_COMPRESS_NUMEL
    elements selects ``density`` of itself (at least 1), the others nothing, as the reducer's parameters do."""
    out = []
    for n, segments in buckets:
        offsets = torch.tensor([s.offset for s in segments] + [n])
        ks = torch.tensor([max(1, int(s.numel * density)) if s.numel >= MIN_COMPRESS_NUMEL else 0 for s in segments])
        out.append((offsets, ks))
    return out


def _positions(n: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """``density`` x ``n`` (at least 1) random positions in [0, n), ascending, int64."""
    return torch.randperm(n, generator=gen)[:max(1, int(n * density))].sort().values


def _payloads(grads: list[torch.Tensor], density: float, world: int, gen: torch.Generator) -> list[list[torch.Tensor]]:
    """Per bucket, ``world`` payloads of ``density`` x its size pairs at random ascending positions."""
    out = []
    for g in grads:
        n = g.numel()
        per_rank = []
        for _ in range(world):
            idx = _positions(n, density, gen)
            per_rank.append(ops.pack(idx, g[idx], g.new_empty(0), n, torch.float32))
        out.append(per_rank)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default="0.001,0.01,0.25")
    parser.add_argument("--worlds", default="1,2", help="payloads per unpack_add, comma-separated")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default="benchmarks/results/op_bench.json")
    parser.add_argument("--ops", nargs="+", default=None, metavar="PREFIX",
                        help="only the rows whose name starts with one of these (default: every row)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    buckets = buckets_of(resnet50())
    grads = [torch.randn(n, generator=gen) for n, _ in buckets]
    outs = [g.clone() for g in grads]  # unpack_add's destinations, and with momenta index_zero_'s
    momenta = [g.clone() for g in grads]
    flush = torch.zeros(FLUSH_ELEMENTS)
    cases = {"sum": lambda: [g.sum() for g in grads],
             "absmax": lambda: [torch.ops.gradsparse.absmax(g) for g in grads],
             "compensate": lambda: [ops.dgc_compensate_into(m, o, g, 0.9, False, m, o)
                                    for g, o, m in zip(grads, outs, momenta)]}
    for density in (float(d) for d in args.densities.split(",")):
        for world in (int(w) for w in args.worlds.split(",")):
            payloads = _payloads(grads, density, world, gen)
            alpha = 1.0 / world
            cases[f"unpack {density:g} x{world}"] = (
                lambda p=payloads, a=alpha: [torch.ops.gradsparse.unpack_add(q, o, torch.float32, None, a, True)
                                             for q, o in zip(p, outs)])
        # each output freed before the next call, as the reducer's are: five 25 % outputs alive at once (51 MB)
        # are fresh pages to fault in on every call (11k faults, 31 against 14 ms)
        cases[f"select {density:g}"] = lambda sel=_segments(buckets, density): [
            torch.ops.gradsparse.segmented_topk_select(g, offsets, ks, 0.01, 7).numel()
            for g, (offsets, ks) in zip(grads, sel)]
        positions = [_positions(g.numel(), density, gen) for g in grads]
        buffers = [torch.empty(PayloadLayout(p.numel(), 0, torch.float32).nbytes, dtype=torch.uint8)
                   for p in positions]
        cases[f"pack {density:g}"] = lambda ps=positions, bs=buffers: [
            ops.pack_gathered(p, g, g.new_empty(0), g.numel(), torch.float32, out=b)
            for p, g, b in zip(ps, grads, bs)]
        cases[f"zero {density:g}"] = lambda ps=positions: [ops.index_zero_([o, m], p)
                                                            for p, o, m in zip(ps, outs, momenta)]
        cases[f"zero, compensate {density:g}"] = lambda ps=positions: [
            (ops.index_zero_([m, o], p), ops.dgc_compensate_into(m, o, g, 0.9, False, m, o))
            for p, g, o, m in zip(ps, grads, outs, momenta)]
        cases[f"zero_compensate {density:g}"] = lambda ps=positions: [
            ops.dgc_zero_compensate_(m, o, g, 0.9, False, p) for p, g, o, m in zip(ps, grads, outs, momenta)]
        bitmaps = [torch.empty(ops.bitmap_words(g.numel()), dtype=torch.int64) for g in grads]
        for p, b in zip(positions, bitmaps):
            _reference.mark_bitmap(b, p)
        cases[f"mask_compensate {density:g}"] = lambda bs=bitmaps: [
            ops.dgc_mask_compensate_(m, o, g, 0.9, False, b) for b, g, o, m in zip(bs, grads, outs, momenta)]
    if args.ops:
        cases = {name: fn for name, fn in cases.items() if name.startswith(tuple(args.ops))}
    rows = []
    for name, fn in cases.items():
        times = _timed(fn, args.repeats, flush)
        rows.append({"op": name, "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
                     "max_ms": 1e3 * max(times)})
        logger.info("%s: %.2f ms", name, rows[-1]["median_ms"])
    load = os.getloadavg()[0]
    result = {"elements": sum(g.numel() for g in grads), "repeats": args.repeats, "load": load,
              "torch": torch.__version__, "rows": rows}
    print(f"{result['elements']:,} fp32 gradients in {len(grads)} buckets, one thread; load average {load:.2f}"
          f"{'  (loaded machine: not a result)' if load >= 1 else ''}")
    print("| op | median ms | min - max |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['op']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} - {r['max_ms']:.2f} |")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
