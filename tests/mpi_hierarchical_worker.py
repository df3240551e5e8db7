"""One rank of the hierarchical MPI tests; launched by tests/multiprocess/test_mpi_hierarchical.py.

``mpirun -np 4 python -m tests.mpi_hierarchical_worker OUTDIR``: 4 processes as 2 emulated nodes
x 2 ranks (``Groups.from_mpi(2)``: sub-communicators by ``Split``). Saves this rank's findings to
``OUTDIR/rank{r}.pt``. mpi4py is imported inside ``main`` only (pytest collects this module).
"""

import io
import os
import sys

import torch

from gradsparse import DGC, TopK
from gradsparse.hierarchical import Groups, HierarchicalReducer
from gradsparse.reducer import Segment

from .horovod_worker import _error
from .models import loss_of, make_model, params_hash
from .tolerances import is_close, rejects_planted_errors

LOCAL = 2


def _step(model, opt, reducer, rank, step, dense=None):
    """One training step, each parameter reduced through ``reducer`` (and, with ``dense``, by MPI's Allreduce)."""
    opt.zero_grad()
    loss_of(model, "mlp", rank, step).backward()
    report = {"close": True, "sensitive": True, "done": True}
    for name, p in model.named_parameters():
        expected = None
        if dense is not None:
            expected = dense.allreduce_sum(p.grad.detach().clone()).wait() / dense.world_size
        fut = reducer.reduce(p.grad.view(-1), [Segment(name, 0, p.numel())], step, select_all=step == 0)
        report["done"] = report["done"] and fut.done()  # MPI: blocking, every collective in this thread
        fut.wait()
        if expected is not None:
            report["close"] = report["close"] and is_close(p.grad, expected, torch.float32)
            report["sensitive"] = report["sensitive"] and rejects_planted_errors(expected, torch.float32)
    opt.step()
    return report


def equivalence(groups, world, rank, steps=4):
    """Nothing dropped: every reduced gradient equals MPI's own Allreduce average of the same gradients."""
    out = {}
    for name, compressor in {"topk_1": TopK(1.0), "dgc_1_no_momentum": DGC(1.0, momentum=0.0, warmup=None)}.items():
        model = make_model("mlp")
        reducer = HierarchicalReducer(compressor, groups, min_compress_numel=1000)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        reports = [_step(model, opt, reducer, rank, step, dense=world) for step in range(steps)]
        out[name] = {"close": all(r["close"] for r in reports), "sensitive": all(r["sensitive"] for r in reports),
                     "done": all(r["done"] for r in reports), "hash": params_hash(model),
                     "pieces": sorted(reducer.memory.state)}
    return out


def dgc(groups, rank, steps=8):
    model = make_model("mlp")
    start = params_hash(model)
    reducer = HierarchicalReducer(DGC(0.01, warmup=None), groups)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = []
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, "mlp", rank, step).backward()
        for name, p in model.named_parameters():
            reducer.reduce(p.grad.view(-1), [Segment(name, 0, p.numel())], step, select_all=step == 0,
                           on_stats=stats.append).wait()
        opt.step()
    last = [s for s in stats[-6:]]
    return {"hash": params_hash(model), "start": start, "transports": sorted({s.transport for s in last}),
            "selected": sum(s.selected for s in last), "numel": sum(s.numel for s in last),
            "whole": sum(s.whole for s in last), "intra": sum(s.intra_bytes for s in last)}


def conservation(groups, rank, steps=5, numel=20_000):
    """One bucket of three parameters (the DDP test's): results, gradients and every piece's residual."""
    reducer = HierarchicalReducer(TopK(0.05), groups, min_compress_numel=1000)
    segments = [Segment("w", 0, 12_000), Segment("b", 12_000, numel - 12_000 - 5), Segment("tiny", numel - 5, 5)]
    outs, grads = [], []
    for step in range(steps):
        g = torch.randn(numel, generator=torch.Generator().manual_seed(100 * step + rank)) * (1 + step)
        grads.append(g.clone())
        outs.append(reducer.reduce(g, segments, step).wait().clone())
    return {"outs": outs, "grads": grads, "memory": {k: v["residual"].clone() for k, v in reducer.memory.state.items()}}


def checkpoint(groups, rank, save_at=4, after=6):
    def build():
        return make_model("mlp"), HierarchicalReducer(DGC(0.02, warmup=None), groups)

    def train(model, reducer, steps):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in steps:
            _step(model, opt, reducer, rank, step)

    model, reducer = build()
    train(model, reducer, range(save_at))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "gradsparse": reducer.state_dict()}, buf)
    train(model, reducer, range(save_at, save_at + after))
    uninterrupted = params_hash(model)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, reducer = build()
    model.load_state_dict(ckpt["model"])
    reducer.load_state_dict(ckpt["gradsparse"])
    train(model, reducer, range(save_at, save_at + after))
    return {"uninterrupted": uninterrupted, "resumed": params_hash(model),
            "pieces": sorted(ckpt["gradsparse"]["hierarchical"]["memory"]["state"])}


def refusals(rank):
    seen = {"not_dividing": _error(lambda: Groups.from_mpi(3)),
            "disagreeing": _error(lambda: Groups.from_mpi(1 if rank == 0 else 2))}
    auto = Groups.from_mpi("auto")
    seen["auto"] = (auto.nodes, auto.local)
    return seen


def main(outdir: str) -> None:
    from gradsparse.comm.mpi import MPICommunicator

    torch.set_num_threads(1)
    world = MPICommunicator()
    rank = world.rank
    groups = Groups.from_mpi(LOCAL)
    result = {"rank": rank, "shape": (groups.nodes, groups.local, groups.node_index, groups.local_rank),
              "equivalence": equivalence(groups, world, rank), "dgc": dgc(groups, rank),
              "conservation": conservation(groups, rank), "checkpoint": checkpoint(groups, rank),
              "refusals": refusals(rank)}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    world.comm.Barrier()
    sys.stdout.flush()
    sys.stderr.flush()


if __name__ == "__main__":
    main(sys.argv[1])
