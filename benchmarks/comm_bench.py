"""Communication microbenchmark: dense allreduce vs sparse allgather of the gradsparse payload.

Run under torchrun, normally on an emulated cluster (benchmarks/cluster_bench.py does)::

    python -m launch.cluster --nodes 4 --rate 1gbit -- benchmarks/comm_bench.py --link-bps 0.95e9 --out comm.json

For each gradient size n and density d, with the slowest rank's time per repetition:

- ``dense``: ``allreduce`` of n fp32 through :class:`~gradsparse.comm.TorchDistCommunicator`.
- ``allgather``: one allgather of this rank's payload of the top ``d*n`` pairs
  (``ops.topk_indices`` + ``ops.pack``: int32 indices, fp32 values, 16-byte header).
- ``reducer``: one whole :class:`~gradsparse.reducer.SparseReducer` step with ``TopK(d)``
  (compensate, select, pack, allgather, validate, unpack-add): what the DDP hook costs per bucket.
- ``alltoall``: the same payload cut into W equal pieces, piece j to rank j (one alltoall:
  what the split transport's first step moves); ``reducer_split``: the reducer step with
  ``transport="split"`` (:mod:`gradsparse.split`).

Bytes on the wire are this node's interface counter. The ideal times follow
from the measured link rate R (``--link-bps``): a ring allreduce sends
``2 (W-1)/W * 4n`` bytes per rank, an allgather ``(W-1) * payload`` bytes, an alltoall
``(W-1)/W * payload`` bytes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script by torchrun
from benchmarks.teardown import exit_without_teardown
from benchmarks.wire import gather_floats, per_rank_wire_bytes, slowest, summarize, tx_bytes, wire_iface
from gradsparse import TopK, ops
from gradsparse.comm import TorchDistCommunicator
from gradsparse.reducer import Segment, SparseReducer

logger = logging.getLogger("comm_bench")


def timed(fn, repeats: int) -> tuple[list[float], float]:
    """(per-repetition seconds of this rank, wire bytes per repetition); one untimed warm-up call."""
    fn()
    times, before = [], tx_bytes()
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # a rank's own last sends may still sit in the shaped link's queue when its collective returns;
    # once every rank is past the barrier they have all left this interface and are counted
    dist.barrier()
    return times, per_rank_wire_bytes(tx_bytes() - before) / repeats


def run(sizes: list[int], densities: list[float], repeats: int, link_bps: float | None) -> list[dict]:
    comm = TorchDistCommunicator()
    world, rank = comm.world_size, comm.rank
    rows = []
    for n in sizes:
        g = torch.Generator().manual_seed(rank)
        grad = torch.randn(n, generator=g)
        buf = grad.clone()
        times, wire = timed(lambda: comm.allreduce_sum(buf).wait(), repeats)
        ideal = 2 * (world - 1) / world * 4 * n * 8 / link_bps if link_bps else None
        rows.append({"op": "dense", "n": n, "density": 1.0, "payload_bytes": 4 * n, "wire_bytes_per_rank": wire,
                     "ideal_s": ideal, "time_s": summarize(slowest(gather_floats(times)))})
        logger.info("n=%d dense allreduce: %.1f ms (ideal %s)", n, 1e3 * rows[-1]["time_s"]["median"],
                    f"{1e3 * ideal:.1f} ms" if ideal else "n/a")
        for d in densities:
            k = max(1, int(round(d * n)))
            idx = ops.topk_indices(grad, k)
            payload = ops.pack(idx, grad[idx], grad.new_empty(0), n, torch.float32)
            times, wire = timed(lambda: comm.allgather(payload).wait(), repeats)
            ideal = (world - 1) * payload.numel() * 8 / link_bps if link_bps else None
            rows.append({"op": "allgather", "n": n, "density": d, "payload_bytes": payload.numel(),
                         "wire_bytes_per_rank": wire, "ideal_s": ideal,
                         "time_s": summarize(slowest(gather_floats(times)))})
            for op, transport in (("reducer", "bytes"), ("reducer_split", "split")):
                reducer = SparseReducer(TopK(d), comm, min_compress_numel=1, transport=transport)
                step = [0]

                def reduce_once(reducer=reducer, step=step):
                    buf.copy_(grad)
                    reducer.reduce(buf, [Segment("g", 0, n)], step[0]).wait()
                    step[0] += 1

                times, wire = timed(reduce_once, repeats)
                rows.append({"op": op, "n": n, "density": d, "payload_bytes": payload.numel(),
                             "wire_bytes_per_rank": wire, "ideal_s": ideal,
                             "time_s": summarize(slowest(gather_floats(times)))})
            bounds = [(j * payload.numel()) // world for j in range(world + 1)]
            pieces = [payload[a:b] for a, b in zip(bounds, bounds[1:])]
            sizes = [[b - a for a, b in zip(bounds, bounds[1:])]] * world
            times, wire = timed(lambda: comm.alltoall(pieces, sizes), repeats)
            a2a_ideal = (world - 1) / world * payload.numel() * 8 / link_bps if link_bps else None
            rows.append({"op": "alltoall", "n": n, "density": d, "payload_bytes": payload.numel(),
                         "wire_bytes_per_rank": wire, "ideal_s": a2a_ideal,
                         "time_s": summarize(slowest(gather_floats(times)))})
            logger.info("n=%d d=%g allgather %.2f ms, reducer %.2f ms, split reducer %.2f ms (ideal %s), "
                        "alltoall %.2f ms (ideal %s)", n, d, 1e3 * rows[-4]["time_s"]["median"],
                        1e3 * rows[-3]["time_s"]["median"], 1e3 * rows[-2]["time_s"]["median"],
                        f"{1e3 * ideal:.2f} ms" if ideal else "n/a", 1e3 * rows[-1]["time_s"]["median"],
                        f"{1e3 * a2a_ideal:.2f} ms" if a2a_ideal else "n/a")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,5000000,25000000", help="comma-separated element counts")
    parser.add_argument("--densities", default="0.001,0.01")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--link-bps", type=float, default=None, help="measured link rate, for the ideal times")
    parser.add_argument("--out", default=None, help="JSON file (written by rank 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    logging.basicConfig(level=logging.INFO if dist.get_rank() == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    rows = run(sizes, densities, args.repeats, args.link_bps)
    if dist.get_rank() == 0:
        result = {"world_size": dist.get_world_size(), "iface": wire_iface()[0], "link_bps": args.link_bps,
                  "repeats": args.repeats, "kernels": ops.BACKEND, "rows": rows}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    dist.barrier()
    exit_without_teardown()


if __name__ == "__main__":
    main()
