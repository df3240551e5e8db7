"""One rank of the hierarchical Horovod tests; launched by tests/multiprocess/test_horovod_hierarchical.py.

``horovodrun -np 4 -H localhost:4 --gloo python -m tests.horovod_hierarchical_worker OUTDIR``: 4
processes as 2 emulated nodes x 2 ranks (``Hierarchy(local_size=2)``; Horovod itself sees one
host). Runs every scenario with real Horovod collectives on real process sets and saves this
rank's findings to ``OUTDIR/rank{r}.pt`` for the test to assert on. Horovod is imported inside
``main`` only (pytest collects this module for doctests).
"""

import io
import os
import sys

import torch

from gradsparse import DGC, TopK
from gradsparse.hierarchical import Hierarchy

from .horovod_worker import _error, _train
from .models import loss_of, make_model, params_hash
from .tolerances import is_close, rejects_planted_errors

LOCAL = 2
HIER = Hierarchy(local_size=LOCAL)  # transport="hierarchical": every parameter goes the hierarchical way


def without_dynamic_process_sets(hvd, gh):
    """Before ``hvd.init(process_sets="dynamic")``: the hierarchy cannot add its process sets."""
    return _error(lambda: gh.SparseCompression(TopK(0.01), hierarchy=HIER))


def equivalence(hvd, gh, rank, steps=4):
    """Nothing dropped: gradients equal an unmodified ``hvd.DistributedOptimizer``'s average at every step."""
    cases = {"topk_1": lambda: TopK(1.0), "dgc_1_no_momentum": lambda: DGC(1.0, momentum=0.0, warmup=None)}
    out = {}
    for name, factory in cases.items():
        plain, sparse = make_model("mlp"), make_model("mlp")
        opt_plain = hvd.DistributedOptimizer(torch.optim.SGD(plain.parameters(), lr=0.1),
                                             named_parameters=plain.named_parameters())
        compression = gh.SparseCompression(factory(), hierarchy=HIER, min_compress_numel=1000, log_every=0)
        opt = gh.DistributedOptimizer(torch.optim.SGD(sparse.parameters(), lr=0.1),
                                      named_parameters=sparse.named_parameters(), compression=compression)
        close, sensitive = True, True
        for step in range(steps):
            for model, o in ((plain, opt_plain), (sparse, opt)):
                o.zero_grad()
                loss_of(model, "mlp", rank, step).backward()
                o.step()  # the averaged gradient stays in p.grad
            for a, b in zip(plain.parameters(), sparse.parameters(), strict=True):
                close = close and is_close(b.grad, a.grad, torch.float32)
                sensitive = sensitive and rejects_planted_errors(a.grad, torch.float32)
        history = list(compression.history)
        out[name] = {"close": close, "sensitive": sensitive, "hash": params_hash(sparse),
                     "intra": [h["intra_bytes"] for h in history], "selected": [h["selected"] for h in history],
                     "pieces": sorted(compression.reducer.memory.state),
                     "flat_memory": sorted(compression.reducer.flat.memory.state)}
    return out


def switching(hvd, gh, rank, steps=6):
    """DGC(1.0, momentum 0.9) equals dense momentum SGD only if the momentum follows every switch of path
    (hierarchical -> flat -> hierarchical: the memory moves inside the node, named after the parameter)."""
    plain, sparse = make_model("mlp"), make_model("mlp")
    opt_plain = hvd.DistributedOptimizer(torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9),
                                         named_parameters=plain.named_parameters())
    compression = gh.SparseCompression(DGC(1.0, momentum=0.9, warmup=None), hierarchy=HIER, log_every=0)
    opt = gh.DistributedOptimizer(torch.optim.SGD(sparse.parameters(), lr=0.1),
                                  named_parameters=sparse.named_parameters(), compression=compression)
    close, intra = True, []
    for step in range(steps):
        compression.reducer.transport = ("hierarchical", "flat", "hierarchical")[step // 2]
        for model, o in ((plain, opt_plain), (sparse, opt)):
            o.zero_grad()
            loss_of(model, "mlp", rank, step).backward()
            o.step()
        for a, b in zip(plain.parameters(), sparse.parameters(), strict=True):
            # the compression's result is DGC's momentum: the dense optimizer's buffer (16 ulps: sums over 2 paths)
            close = close and is_close(b.grad, opt_plain.state[a]["momentum_buffer"], torch.float32, ulps=16)
        intra.append(compression.last_stats.intra_bytes)
    return {"close": close, "intra": intra, "flat_keys": sorted(compression.reducer.flat.memory.state),
            "piece_keys": sorted(compression.reducer.memory.state)}


def by_cost(gh, rank, steps=3):
    """transport="auto": links measured over the process sets at construction, the choice the same on every rank."""
    model = make_model("mlp")
    compression = gh.SparseCompression(DGC(0.01, warmup=None), hierarchy=Hierarchy(local_size=LOCAL, transport="auto"),
                                       log_every=0)
    opt = gh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(), compression=compression)
    _train(model, opt, "mlp", rank, steps)
    topology = compression.reducer.topology
    return {"hash": params_hash(model), "shape": (topology.nodes, topology.local),
            "links": (topology.inter is not None, topology.intra is not None),
            "paths": dict(compression.reducer.paths)}


def nonfinite(hvd, gh, rank, steps=3):
    """A NaN gradient on the last rank at step 1: NaN gradients on every rank, no memory changed, training goes on
    (the flat path, hierarchy=None, too: its decompress once raised CollectiveOrderError there)."""
    out = {}
    for name, hierarchy in (("flat", None), ("hierarchical", HIER)):
        model = make_model("mlp")
        compression = gh.SparseCompression(TopK(0.05), hierarchy=hierarchy, log_every=0)
        opt = gh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      named_parameters=model.named_parameters(), compression=compression)
        seen, memory = [], None
        for step in range(steps):
            opt.zero_grad()
            loss = loss_of(model, "mlp", rank, step)
            if step == 1 and rank == hvd.size() - 1:
                loss = loss * float("nan")
            loss.backward()
            if step == 1:
                memory = {k: {n: t.clone() for n, t in v.items()} for k, v in compression.reducer.memory.state.items()}
            seen.append(_error(opt.synchronize))
            nan = [bool(torch.isnan(p.grad).all()) for p in model.parameters()]
            with opt.skip_synchronize():
                if not any(nan):
                    opt.step()
            seen.append(nan)
            if step == 1:
                unchanged = all(torch.equal(t, memory[k][n]) for k, v in compression.reducer.memory.state.items()
                                for n, t in v.items())
        out[name] = {"seen": seen, "memory_unchanged": unchanged, "hash": params_hash(model)}
    return out


def dgc(gh, rank, steps=8):
    """DGC 1 %: trains, every rank ends with the same bits."""
    model = make_model("mlp")
    start = params_hash(model)
    compression = gh.SparseCompression(DGC(0.01, warmup=None), hierarchy=HIER, log_every=0)
    opt = gh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(), compression=compression)
    _train(model, opt, "mlp", rank, steps)
    return {"hash": params_hash(model), "start": start, "last": compression.last_stats.as_dict(),
            "steps": dict(compression.steps)}


def conservation(hvd, gh, rank, steps=5):
    """Horovod's contract driven by hand (compress, Horovod's marker allreduce, decompress) on known gradients."""
    sizes = {"w": 12_000, "b": 7_995, "tiny": 5}
    params = {name: torch.nn.Parameter(torch.zeros(n)) for name, n in sizes.items()}
    compression = gh.SparseCompression(TopK(0.05), named_parameters=list(params.items()), hierarchy=HIER,
                                       min_compress_numel=1000, log_every=0)
    outs, grads = [], []
    for step in range(steps):
        started, outs_step, grads_step = [], {}, {}
        for i, (name, p) in enumerate(params.items()):
            gen = torch.Generator().manual_seed(1000 * step + 100 * rank + i)
            p.grad = torch.randn(p.numel(), generator=gen) * (1 + step)
            grads_step[name] = p.grad.clone()
            marker, ctx = compression.compress(p.grad)
            started.append((name, hvd.allreduce_async(marker, name=f"marker.{name}", op=hvd.Average), ctx))
        for name, handle, ctx in started:
            outs_step[name] = compression.decompress(hvd.synchronize(handle), ctx).clone()
        outs.append(outs_step)
        grads.append(grads_step)
    memory = {k: v["residual"].clone() for k, v in compression.reducer.memory.state.items()}
    return {"outs": outs, "grads": grads, "memory": memory, "flat_memory": dict(compression.reducer.flat.memory.state)}


def checkpoint(gh, rank, save_at=4, after=6):
    """state_dict at step 4, resumed in a fresh model/optimizer/compression: bit for bit the uninterrupted run."""
    def build(hierarchy=HIER):
        model = make_model("mlp")
        compression = gh.SparseCompression(DGC(0.02, warmup=None), hierarchy=hierarchy, log_every=0)
        opt = gh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                      named_parameters=model.named_parameters(), compression=compression)
        return model, opt, compression

    model, opt, compression = build()
    _train(model, opt, "mlp", rank, save_at)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "gradsparse": compression.state_dict()}, buf)
    _train(model, opt, "mlp", rank, after, first=save_at)
    uninterrupted = params_hash(model)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, compression2 = build()
    model2.load_state_dict(ckpt["model"])
    compression2.load_state_dict(ckpt["gradsparse"])
    _train(model2, opt2, "mlp", rank, after, first=save_at)
    saved = ckpt["gradsparse"]
    other_shape = {**saved, "hierarchical": {**saved["hierarchical"], "nodes": 4, "local_size": 1}}
    _, _, flat = build(hierarchy=None)
    return {"uninterrupted": uninterrupted, "resumed": params_hash(model2),
            "pieces": sorted(saved["hierarchical"]["memory"]["state"]),
            "other_shape": _error(lambda: compression2.load_state_dict(other_shape)),
            "into_flat": _error(lambda: flat.load_state_dict(saved))}


def refusals(hvd, gh, rank):
    """What cannot work raises a typed error on every rank, before any collective can hang."""
    seen = {"not_dividing": _error(lambda: gh.SparseCompression(TopK(0.01), hierarchy=Hierarchy(local_size=3))),
            "disagreeing": _error(lambda: gh.SparseCompression(
                TopK(0.01), hierarchy=Hierarchy(local_size=1 if rank == 0 else 2)))}
    column = gh.hierarchy_groups(LOCAL).cross.process_set
    seen["process_set"] = _error(lambda: gh.SparseCompression(TopK(0.01), process_set=column, hierarchy=HIER))
    auto = gh.SparseCompression(TopK(0.01), hierarchy="auto")
    seen["auto"] = (auto.reducer.groups.nodes, auto.reducer.groups.local, hvd.local_size())
    return seen


def main(outdir: str) -> None:
    import horovod.torch as hvd

    import gradsparse.horovod as gh

    torch.set_num_threads(1)
    hvd.init()
    result = {"without_dynamic": without_dynamic_process_sets(hvd, gh)}
    hvd.shutdown()
    hvd.init(process_sets="dynamic")
    rank = hvd.rank()
    result.update(rank=rank, world=hvd.size(), equivalence=equivalence(hvd, gh, rank), dgc=dgc(gh, rank),
                  conservation=conservation(hvd, gh, rank), checkpoint=checkpoint(gh, rank),
                  switching=switching(hvd, gh, rank), by_cost=by_cost(gh, rank), nonfinite=nonfinite(hvd, gh, rank),
                  refusals=refusals(hvd, gh, rank))
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    hvd.barrier()
    hvd.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown, as tests/horovod_worker.py does


if __name__ == "__main__":
    main(sys.argv[1])
