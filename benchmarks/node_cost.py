"""CPU cost per rank of one bucket's flat and hierarchical reduction on one node (no network).

Run under ``torchrun --nproc-per-node L`` (one node of ``L`` ranks, gloo on loopback): the same
bucket (``--numel`` elements in 10 equal parameters, DGC 0.1 %) is reduced by a
:class:`~gradsparse.hierarchical.HierarchicalReducer` forced ``flat`` (every rank compresses the
whole bucket) and forced ``hierarchical`` through shared memory (taking the others' results back
where their pairs landed, and, for comparison, as whole pieces) and through the node's allreduces,
alternating, ``--steps`` times each; per rank the median wall time and CPU time
(``time.process_time``) of ``reduce(...).wait()`` after the first 3. With one rank per core this
says what the hierarchical path's node passes cost against what compressing a shard saves.
``--phases`` also times, per rank, the CPU of each phase of the shared-memory path (the node's sum
into the shard, the column's compression and exchange, the copy back of every rank's pieces) and
the flat reducer's synchronous part.

Example::

    .venv/bin/torchrun --nproc-per-node 2 -m benchmarks.node_cost --numel 6250000
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
import torch.distributed as dist

from gradsparse import DGC
from gradsparse import hierarchical as hier
from gradsparse.reducer import Segment

logger = logging.getLogger("benchmarks.node_cost")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=6_250_000, help="bucket elements (default: one 25 MB bucket)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="times each method is run, alternating")
    parser.add_argument("--phases", action="store_true", help="also time the phases of each reduction (CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    local = dist.get_world_size()
    groups = hier.Groups.create(local)
    reducers = {
        "flat": hier.HierarchicalReducer(DGC(0.001, warmup=None), groups, transport="flat"),
        "hierarchical, shared memory": hier.HierarchicalReducer(DGC(0.001, warmup=None), groups,
                                                                transport="hierarchical"),
        "hierarchical, shared memory, whole pieces back": hier.HierarchicalReducer(DGC(0.001, warmup=None), groups,
                                                                                   transport="hierarchical"),
        "hierarchical, node allreduces": hier.HierarchicalReducer(DGC(0.001, warmup=None), groups,
                                                                  transport="hierarchical", shared_memory=False),
    }
    reducers["hierarchical, shared memory, whole pieces back"].sparse_gather = False  # the A/B of the gather
    phases: dict[str, list[float]] = {}
    if args.phases:
        shared = reducers["hierarchical, shared memory"]
        _timed(shared, "_shared_reduce", "shared memory: the node's sum into the shard", phases)
        _timed(shared.inner, "reduce", "shared memory: the shard's compression and exchange", phases)
        _timed(shared, "_shared_land", "shared memory: every rank's pieces copied back", phases)
        _timed(reducers["flat"].flat, "reduce", "flat: the synchronous part (compress, issue)", phases)
    size = args.numel // 10
    segments = [Segment(f"p{i}", i * size, size) for i in range(10)]
    gradient = torch.randn(10 * size, generator=torch.Generator().manual_seed(dist.get_rank()))
    results: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.rounds):
        for name, reducer in reducers.items():
            wall, cpu = [], []
            for step in range(args.steps):
                bucket = gradient.clone()
                dist.barrier()
                c0, t0 = time.process_time(), time.perf_counter()
                reducer.reduce(bucket, segments, step).wait()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            slot = results.setdefault(name, {"wall_ms": [], "cpu_ms": []})
            slot["wall_ms"].append(1e3 * statistics.median(wall[3:]))
            slot["cpu_ms"].append(1e3 * statistics.median(cpu[3:]))
    for name, r in results.items():
        logger.info("rank %d %-48s wall %s ms, cpu %s ms", dist.get_rank(), name,
                    " / ".join(f"{v:.2f}" for v in r["wall_ms"]), " / ".join(f"{v:.2f}" for v in r["cpu_ms"]))
    phase_ms = {}
    for name, seconds in phases.items():  # every step of every round but each round's first 3
        kept = [t for i, t in enumerate(seconds) if i % args.steps >= 3]
        phase_ms[name] = 1e3 * statistics.median(kept)
        logger.info("rank %d %-55s cpu %.2f ms (median of %d)", dist.get_rank(), name, phase_ms[name], len(kept))
    if dist.get_rank() == 0:
        logger.info("json %s", json.dumps({"numel": 10 * size, "local": local, "results": results,
                                           "phases_cpu_ms": phase_ms}))
    dist.destroy_process_group()
    return results


def _timed(obj, method: str, label: str, into: dict[str, list[float]]) -> None:
    """Wrap ``obj.method`` so that each call's CPU time (``time.process_time``) is appended to ``into[label]``."""
    inner = getattr(obj, method)
    times = into.setdefault(label, [])

    def timed(*args, **kwargs):
        c0 = time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            times.append(time.process_time() - c0)

    setattr(obj, method, timed)


if __name__ == "__main__":
    main()
