"""CPU cost per rank of one bucket's flat and hierarchical reduction on one node (no network).

Run under ``torchrun --nproc-per-node L`` (one node of ``L`` ranks, gloo on loopback): the same
bucket (``--numel`` elements in 10 equal parameters, DGC 0.1 %) is reduced by a
:class:`~gradsparse.hierarchical.HierarchicalReducer` forced ``flat`` (every rank compresses the
whole bucket) and forced ``hierarchical`` through shared memory and through the node's allreduces,
alternating, ``--steps`` times each; per rank the median wall time and CPU time
(``time.process_time``) of ``reduce(...).wait()`` after the first 3. With one rank per core this
says what the hierarchical path's node passes cost against what compressing a shard saves.

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
        "hierarchical, node allreduces": hier.HierarchicalReducer(DGC(0.001, warmup=None), groups,
                                                                  transport="hierarchical", shared_memory=False),
    }
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
        logger.info("rank %d %-30s wall %s ms, cpu %s ms", dist.get_rank(), name,
                    " / ".join(f"{v:.2f}" for v in r["wall_ms"]), " / ".join(f"{v:.2f}" for v in r["cpu_ms"]))
    if dist.get_rank() == 0:
        logger.info("json %s", json.dumps({"numel": 10 * size, "local": local, "results": results}))
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
