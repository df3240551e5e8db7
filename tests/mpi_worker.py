"""One rank of the MPI tests; launched by tests/multiprocess/test_mpi.py under ``mpirun``.

``python -m tests.mpi_worker OUTDIR``: exercises :class:`gradsparse.comm.mpi.MPICommunicator`
and the pipeline over it (no torch.distributed) and saves this rank's findings to
``OUTDIR/rank{r}.pt``. mpi4py is imported inside ``main`` only (pytest collects this module
for doctests, and importing mpi4py.MPI initialises MPI).
"""

import os
import sys

import torch

from gradsparse import DGC, Segment, SparseReducer, Threshold, TopK

from .models import loss_of, make_model, params_hash
from .multiprocess.test_ddp import DGC_CFG, DGC_STEPS, LR, MIN_NUMEL


def payload_for(rank: int, length_of) -> torch.Tensor:
    n = length_of(rank)
    return ((torch.arange(n) * 7 + 31 * rank) % 251).to(torch.uint8)


def allgather_checks(comm, rank, world):
    """Variable lengths (one rank empty), equal lengths, all empty; each rank's bytes checked."""
    out = {}
    patterns = {"varying_with_empty": lambda r: 0 if r == 1 else 5 + 1000 * r,
                "equal": lambda r: 64,
                "all_empty": lambda r: 0}
    for name, length_of in patterns.items():
        mine = payload_for(rank, length_of)
        sizes = comm.exchange_sizes(mine.numel(), mine.device)
        got = comm.allgather(mine, None if name == "equal" else sizes).wait()
        out[name] = {"sizes": sizes, "ok": len(got) == world and all(
            torch.equal(got[r], payload_for(r, length_of)) for r in range(world))}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.full((10,), float(rank + 1), dtype=dtype)
        out[f"allreduce_{dtype}"] = comm.allreduce_sum(t).wait().tolist()
    return out


def train(reducer, model, rank, steps, scale_of=lambda step: 1.0, start_iter=1, on_stats=None):
    """Plain SGD where every parameter's gradient goes through ``reducer`` (one segment per parameter)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(steps):
        opt.zero_grad()
        (scale_of(step) * loss_of(model, "mlp", rank, step)).backward()
        for name, p in model.named_parameters():
            reducer.reduce(p.grad.view(-1), [Segment(name, 0, p.numel())], step,
                           select_all=step < start_iter, on_stats=on_stats).wait()
        opt.step()


def main(outdir: str) -> None:
    from gradsparse.comm.mpi import MPICommunicator

    torch.set_num_threads(1)
    comm = MPICommunicator()
    rank, world = comm.rank, comm.world_size
    result = {"rank": rank, "world": world, "allgather": allgather_checks(comm, rank, world)}

    model = make_model("mlp")
    train(SparseReducer(DGC(**DGC_CFG), comm, min_compress_numel=MIN_NUMEL), model, rank, DGC_STEPS)
    result["dgc"] = [p.detach().clone() for p in model.parameters()]

    hashes = {}
    for name, compressor in {"threshold_last_rank_silent": Threshold(0.02), "topk": TopK(0.01)}.items():
        model = make_model("mlp")
        silent = name.endswith("silent") and rank == world - 1
        stats, before = [], (comm.bytes_sent, comm.bytes_received)
        train(SparseReducer(compressor, comm), model, rank, 6, scale_of=lambda step: 0.0 if silent else 1.0,
              on_stats=stats.append)
        hashes[name] = params_hash(model)
        # what the reducer reports against what MPI moved (Allgatherv: payloads of differing sizes, unpadded)
        result[f"bytes_{name}"] = {"reported": (sum(b.bytes_sent for b in stats), sum(b.bytes_received for b in stats)),
                                   "moved": (comm.bytes_sent - before[0], comm.bytes_received - before[1])}
    for transport in ("allgather", "split"):  # the split transport gives the allgather's bits, step after step
        model = make_model("mlp")
        stats = []
        train(SparseReducer(TopK(0.25), comm, transport=transport), model, rank, 4, on_stats=stats.append)
        hashes[f"topk25.{transport}"] = params_hash(model)
        result[f"transports.{transport}"] = sorted({b.transport for b in stats[len(list(model.parameters())):]})
    result["hashes"] = hashes
    result["bytes_sent"] = comm.bytes_sent
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    comm.comm.Barrier()


if __name__ == "__main__":
    main(sys.argv[1])
