"""One rank's per-step work on ResNet-50's gradient buckets, in read passes of the gradients.

The pipeline alone: one process, one thread, no network (a ``LocalCommunicator``),
``SparseReducer`` over DDP's buckets of ResNet-50 (25 MB buckets, a 1 MB first one,
the parameters' real shapes, 25.6M elements). A step reduces every bucket once. The
unit is one read pass: the time of ``torch.sum`` over all the gradients, measured in
the same run before every method's round and taken as the median of those (one
measurement moved from 5.6 to 9.2 ms between runs on 2026-12-02), so the ratio says how many
passes over memory a step costs whatever the machine's speed (issue 13's targets: DGC
0.1 % <= 8, TopK 1 % <= 6, warm-up densities within 2x of that)::

    python -m benchmarks.bucket_bench                 # table; JSON in benchmarks/results/bucket_bench.json
    python -m benchmarks.bucket_bench --steps 5 --methods dgc0.1 topk1
    python -m benchmarks.bucket_bench --methods dgc0.1 dgc0.1-nocandidates --rounds 3   # A/B, alternating
    python -m benchmarks.bucket_bench --methods topk1 topk1-nocandidates dgc-warmup0.4 dgc-warmup0.4-nocandidates \
        dgc-warmup1.5625 dgc-warmup1.5625-nocandidates --rounds 3 --grads real   # where the candidates start to pay
    python -m benchmarks.bucket_bench --methods dgc-warmup25 dgc-warmup25-unfused --rounds 3
    python -m benchmarks.bucket_bench --methods dgc-warmup25 dgc-warmup25-eager --rounds 3
    python -m benchmarks.bucket_bench --methods dgc-warmup25 dgc-warmup25-listed --rounds 3 --grads real
    python -m benchmarks.bucket_bench --methods topk1 topk1-separate --rounds 3
    python -m benchmarks.bucket_bench --methods dgc-warmup25 --steps 3 --profile   # and where a step goes
    python -m benchmarks.bucket_bench --methods topk1 dgc0.1 --grads real   # ResNet-50's real gradients

``--grads normal`` (the default) reduces standard normal noise; ``--grads real`` reduces the gradients
of one real backward pass (``real_gradients``), whose zeros and periods noise lacks. Noise hid
that the selection's sample once aliased with them (docs/benchmarks.md, "The sample drawn per stride").

``*-separate`` is the same method with its payload packed after the selection
(``packs_selection = False``: ``pack_gathered`` of the selected positions) instead of written by the
selection's last pass (``segmented_topk_select_pack``; the same bytes).
``*-nocandidates`` is the same method with the selection candidates of the compensation
pass turned off (``selects_from_candidates = False``: every selection reads the whole
parameter; docs/design.md, decision 28). ``*-unfused`` runs the same method through the
path before ``segmented_topk_select_pack``, ``pack_gathered`` and ``index_zero_`` (docs/kernels.md): the sent values
gathered by ``index_select``, packed into a new tensor, and the memory zeroed by one
``index_fill_`` per state tensor (the results are the same bits). ``*-eager`` runs it with DGC's
memory update applied when the reduction lands (``index_zero_``) instead of deferred into the next
compensation pass, the same bits again. That pass reads the sent positions as the bitmap the selection
writes beside them (``dgc_mask_compensate``); ``*-listed`` has it read them from their list instead
(``dgc_zero_compensate``, the path before the bitmap; gradsparse/arena.py). ``*-allreduce``
reduces with ``transport="allreduce"`` (the selection scattered into the bucket, which a dense allreduce would
sum: the path ``"bytes"`` and ``"auto"`` take where pairs do not pay, as in DGC's warm-up).
``--rounds R`` runs the methods' list R times in turn, each a fresh reducer, so an A/B alternates within one
process; the row is the median over every round's steps, with each round's median beside it.

The last column is the part of the work done inside the hook before the collective
is issued (``BucketStats.blocking_s``: compensate, select, pack), which stalls
backward; the rest (unpack-add, memory update) runs when the collective completes, except DGC's
update from 1/32 of the elements, which the next compensation applies (``*-eager`` keeps it there).
Median and spread (min-max) over ``--steps`` steps after one untimed step; ``uptime``'s
load is printed beside the table: a number taken while other jobs run is not a result.
The health check's read (``ops.absmax`` over the same gradients) is timed beside the unit, and so is
a read of fresh copies of them (``fresh_read_pass_ms``): each step reads copies made just before it,
which a repeated read of the same tensors is not. The unit stays the repeated read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from gradsparse import DGC, TopK, ops  # noqa: E402
from gradsparse import memory as memory_module  # noqa: E402
from gradsparse.comm import LocalCommunicator  # noqa: E402
from gradsparse.model_shapes import resnet50  # noqa: E402
from gradsparse.options import ReducerOptions  # noqa: E402
from gradsparse.reducer import Segment, SparseReducer  # noqa: E402
from gradsparse.stepmodel import ddp_bucket_shapes  # noqa: E402

logger = logging.getLogger("benchmarks.bucket_bench")

def _without_candidates(compressor):
    compressor.selects_from_candidates = False
    return compressor


def _packed_after(method):
    """``method`` with its payload packed after the selection (``packs_selection = False``)."""
    def make():
        compressor, select_all = method()
        compressor.packs_selection = False
        return compressor, select_all
    return make


METHODS = {
    "dense-iteration": lambda: (TopK(1.0), True),
    "topk1": lambda: (TopK(0.01), False),
    "topk10": lambda: (TopK(0.10), False),
    "dgc0.1": lambda: (DGC(0.001, warmup=None), False),
    "dgc-warmup25": lambda: (DGC(0.25, warmup=None), False),
    "dgc-warmup6.25": lambda: (DGC(0.0625, warmup=None), False),
    "dgc-warmup1.5625": lambda: (DGC(0.015625, warmup=None), False),
    "dgc-warmup0.4": lambda: (DGC(0.004, warmup=None), False),
    "topk1-nocandidates": lambda: (_without_candidates(TopK(0.01)), False),
    "dgc0.1-nocandidates": lambda: (_without_candidates(DGC(0.001, warmup=None)), False),
    "dgc-warmup1.5625-nocandidates": lambda: (_without_candidates(DGC(0.015625, warmup=None)), False),
    "dgc-warmup0.4-nocandidates": lambda: (_without_candidates(DGC(0.004, warmup=None)), False),
}
UNFUSED, EAGER, SEPARATE, LISTED = "-unfused", "-eager", "-separate", "-listed"
METHODS.update({name + UNFUSED: _packed_after(METHODS[name]) for name in ("dgc0.1", "dgc-warmup25", "dgc-warmup6.25",
                                                                             "topk1")})
METHODS.update({name + SEPARATE: _packed_after(METHODS[name])
                for name in ("topk1", "topk10", "dgc-warmup25", "dgc-warmup6.25", "dgc-warmup1.5625",
                             "dgc-warmup0.4")})
METHODS.update({name + EAGER: METHODS[name] for name in ("dgc-warmup25", "dgc-warmup6.25")})
METHODS.update({name + LISTED: METHODS[name] for name in ("dgc-warmup25", "dgc-warmup6.25")})
DENSE = "-allreduce"
METHODS.update({name + DENSE: METHODS[name] for name in ("topk10", "dgc-warmup25", "dgc-warmup6.25")})
METHODS.update({name + DENSE + SEPARATE: _packed_after(METHODS[name])
                for name in ("topk10", "dgc-warmup25", "dgc-warmup6.25")})


@contextlib.contextmanager
def _eager():
    """DGC's memory update applied when each reduction lands, never deferred into the next compensation."""
    deferred = memory_module.ZERO_IN_PASS_FROM
    memory_module.ZERO_IN_PASS_FROM = 0
    try:
        yield
    finally:
        memory_module.ZERO_IN_PASS_FROM = deferred


@contextlib.contextmanager
def _listed():
    """DGC's deferred update read through its list of positions (``dgc_zero_compensate``), as before the
    selection wrote a bitmap of them (``dgc_mask_compensate``): the reducer asks for no bitmap."""
    defers_at = memory_module.DGCMemory.defers_at
    memory_module.DGCMemory.defers_at = lambda self, count, numel: False
    try:
        yield
    finally:
        memory_module.DGCMemory.defers_at = defers_at


def _variant(name: str):
    """The context a method's name asks for (``-unfused`` includes ``-eager``: the path before both)."""
    if name.endswith(UNFUSED):
        stack = contextlib.ExitStack()
        stack.enter_context(_eager())
        stack.enter_context(_unfused())
        return stack
    if name.endswith(LISTED):
        return _listed()
    return _eager() if name.endswith(EAGER) else contextlib.nullcontext()


@contextlib.contextmanager
def _unfused():
    """The pair handling before the fused ops: ``index_select`` + ``pack`` into a new tensor, and one
    ``index_fill_`` per state tensor (``ops`` is what the reducer and the memory call)."""
    fused = ops.pack_gathered, ops.index_zero_

    def pack_gathered(indices, source, dense, numel, value_dtype, flags=0, out=None):
        return ops.pack(indices, source.index_select(0, indices), dense, numel, value_dtype, flags)

    def index_zero_(targets, positions):
        for t in targets:
            t.index_fill_(0, positions, 0.0)

    ops.pack_gathered, ops.index_zero_ = pack_gathered, index_zero_
    try:
        yield
    finally:
        ops.pack_gathered, ops.index_zero_ = fused


def buckets_of(shapes) -> list[tuple[int, list[Segment]]]:
    """(numel, segments) of each DDP bucket."""
    out = []
    for group in ddp_bucket_shapes(shapes):
        segments, offset = [], 0
        for name, shape in group:
            segments.append(Segment(name, offset, math.prod(shape)))
            offset += math.prod(shape)
        out.append((offset, segments))
    return out


def read_pass_s(grads: list[torch.Tensor], repeats: int = 7, read=torch.sum, fresh: bool = False) -> float:
    """Median seconds of one read of every gradient (``read``: torch.sum, fp32; or the health check's
    ``ops.absmax``, which should cost the same). ``fresh``: each read is of new copies made just before it
    (untimed), as every step reduces copies of the gradients made just before it."""
    times = []
    for _ in range(repeats):
        work = [g.clone() for g in grads] if fresh else grads
        t0 = time.perf_counter()
        for g in work:
            read(g)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def normal_gradients(buckets, seed: int = 0) -> list[torch.Tensor]:
    """Every bucket filled with standard normal noise (seeded): no zeros, no structure."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for n, _ in buckets]


def real_gradients(buckets, seed: int = 0, batch: int = 2) -> list[torch.Tensor]:
    """ResNet-50's gradients from one forward and backward pass (``benchmarks/bench_models.py``'s model, a
    batch of 2 images of 32x32, as ``ddp_bench`` trains it), laid out in DDP's buckets. Real gradients
    have what noise lacks: exact zeros (ReLUs that stay off for the whole batch) and periods. For
    example, a 3x3 convolution on a 1x1 input has gradient only at the kernel's centre.

    >>> grads = real_gradients(buckets_of(resnet50()))
    >>> [g.numel() for g in grads] == [n for n, _ in buckets_of(resnet50())]
    True
    >>> 0.2 < float((torch.cat(grads) == 0).double().mean()) < 0.9      # many exact zeros
    True
    """
    from benchmarks.bench_models import loss_fn, make_batch, make_model

    torch.manual_seed(seed)
    model = make_model("resnet50")
    x, y = make_batch("resnet50", batch, torch.Generator().manual_seed(seed))
    loss_fn("resnet50", model(x), y).backward()
    by_name = {name: p.grad.reshape(-1) for name, p in model.named_parameters()}
    out = []
    for numel, segments in buckets:
        flat = torch.empty(numel)
        for s in segments:
            flat[s.offset:s.offset + s.numel] = by_name[s.key]
        out.append(flat)
    return out


GRADIENTS = {"normal": normal_gradients, "real": real_gradients}


def _stepper(name: str, buckets, grads: list[torch.Tensor]):
    """A fresh reducer for ``name`` and ``step(s, work, on_stats=None)`` reducing every bucket of ``work``
    (copies of ``grads``: the hook reduces a bucket in place) once."""
    compressor, select_all = METHODS[name]()
    dense = name.endswith((DENSE, DENSE + SEPARATE))
    reducer = SparseReducer(compressor, LocalCommunicator(), ReducerOptions(transport="allreduce") if dense else None)

    def step(s: int, work: list[torch.Tensor], on_stats=None) -> None:
        for flat, (_, segments) in zip(work, buckets):
            reducer.reduce(flat, segments, s, select_all=select_all, on_stats=on_stats).wait()

    return step


def time_method(name: str, buckets, steps: int, grads: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    reduce_step = _stepper(name, buckets, grads)
    times, blocking = [], []
    for step in range(steps + 1):
        work = [g.clone() for g in grads]  # the hook reduces the bucket in place
        stats = []
        t0 = time.perf_counter()
        reduce_step(step, work, stats.append)
        if step:  # the first step allocates the memory
            times.append(time.perf_counter() - t0)
            blocking.append(sum(s.blocking_s for s in stats))
    return times, blocking


def profile_method(name: str, buckets, grads: list[torch.Tensor], steps: int = 3) -> str:
    """``torch.profiler``'s operators over ``steps`` steps of ``name`` after one untimed step (the clones of
    the gradients made before each step, outside the profile), self CPU time first: totals over the steps."""
    from torch.profiler import ProfilerActivity, profile

    step = _stepper(name, buckets, grads)
    with _variant(name):
        step(0, [g.clone() for g in grads])
        works = [[g.clone() for g in grads] for _ in range(steps)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for s, work in enumerate(works, 1):
                step(s, work)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=1, help="run the methods' list this many times in turn")
    parser.add_argument("--json", default="benchmarks/results/bucket_bench.json")
    parser.add_argument("--grads", default="normal", choices=list(GRADIENTS),
                        help="the gradients reduced every step: normal noise, or ResNet-50's real ones (zeros, periods)")
    parser.add_argument("--profile", action="store_true",
                        help="then print torch.profiler's operators over --steps steps of each method (totals)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    buckets = buckets_of(resnet50())
    grads = GRADIENTS[args.grads](buckets)
    units = [read_pass_s(grads)]  # the unit, measured again before every run: the machine's speed drifts
    health_pass = read_pass_s(grads, read=ops.absmax)
    fresh_pass = read_pass_s(grads, fresh=True)
    timed: dict[str, list[tuple[list[float], list[float]]]] = {name: [] for name in args.methods}
    runs = [(r, name) for r in range(args.rounds) for name in args.methods]
    for i, (_, name) in enumerate(runs, 1):
        if i > 1:
            units.append(read_pass_s(grads, repeats=3))
        with _variant(name):
            times, blocking = time_method(name, buckets, args.steps, grads)
        timed[name].append((times, blocking))
        med = statistics.median(times)
        logger.info("[%d/%d] %s: %.1f ms (%.1f passes of %.2f ms)", i, len(runs), name, 1e3 * med, med / units[-1],
                    1e3 * units[-1])
    one_pass = statistics.median(units)
    rows = []
    for name, rounds in timed.items():
        times = [t for ts, _ in rounds for t in ts]
        med = statistics.median(times)
        rows.append({"method": name, "median_ms": 1e3 * med, "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
                     "passes": med / one_pass,
                     "blocking_ms": 1e3 * statistics.median([b for _, bs in rounds for b in bs]),
                     "round_medians_ms": [1e3 * statistics.median(ts) for ts, _ in rounds]})
    load = os.getloadavg()[0]
    result = {"read_pass_ms": 1e3 * one_pass, "read_pass_range_ms": [1e3 * min(units), 1e3 * max(units)],
              "read_passes_measured": len(units), "fresh_read_pass_ms": 1e3 * fresh_pass,
              "health_pass_ms": 1e3 * health_pass,
              "elements": sum(n for n, _ in buckets), "buckets": len(buckets), "steps": args.steps,
              "rounds": args.rounds, "grads": args.grads, "load": load, "torch": torch.__version__, "rows": rows}
    print(f"one read pass of {result['elements']:,} fp32 gradients: {1e3 * one_pass:.2f} ms (median of {len(units)}, "
          f"one before each run: {1e3 * min(units):.2f} - {1e3 * max(units):.2f}); "
          f"load average {load:.2f}{'  (loaded machine: not a result)' if load >= 1 else ''}")
    print(f"one read of fresh copies of them, as each step reads them: {1e3 * fresh_pass:.2f} ms "
          f"({fresh_pass / one_pass:.2f} read passes)")
    print(f"the health check's absmax over them: {1e3 * health_pass:.2f} ms ({health_pass / one_pass:.2f} read passes)")
    print("| method | step ms (median) | min - max | read passes | in the hook (stalls backward) ms | per round |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['method']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} - {r['max_ms']:.1f} | {r['passes']:.1f} | "
              f"{r['blocking_ms']:.1f} | {' / '.join(f'{m:.1f}' for m in r['round_medians_ms'])} |")
    if args.profile:
        for name in args.methods:
            print(f"\n{name}: torch.profiler over {args.steps} steps (totals; divide by {args.steps} for a step)")
            print(profile_method(name, buckets, grads, args.steps))
    if args.json:
        write_json(args.json, result)
    return result


def write_json(path: str, result: dict) -> None:
    """Write a benchmark's result to ``path`` (its folder made if missing)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
