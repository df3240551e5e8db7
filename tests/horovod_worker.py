"""One rank of the Horovod tests; launched by tests/multiprocess/test_horovod.py under ``horovodrun --gloo``.

``python -m tests.horovod_worker SCENARIO OUTDIR``: runs the scenario's checks with real
Horovod collectives and saves this rank's findings to ``OUTDIR/rank{r}.pt`` for the test to
assert on. Horovod and torch.distributed are imported inside ``main`` only (pytest collects
this module for doctests).
"""

import io
import os
import sys

import torch
import torch.nn as nn

from gradsparse import DGC, DGCSGD, Threshold, TopK

from .docblocks import block_with
from .models import loss_of, make_model, pairs_at, params_hash, train_past_default_warmup
from .multiprocess.test_ddp import DGC_CFG, DGC_STEPS, LR, MIN_NUMEL
from .tolerances import is_close, rejects_planted_errors


def _train(model, opt, kind, rank, steps, first=0):
    for step in range(first, first + steps):
        opt.zero_grad()
        loss_of(model, kind, rank, step).backward()
        opt.step()


def _error(fn) -> str:
    """Run ``fn``; return ``"TypeName: message"`` of what it raised, or ``"no error"``."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test inspects type and message
        return f"{type(err).__name__}: {err}"
    return "no error"


def equivalence(hvd, gh, rank, steps=6):
    """Gradients, step by step, with gradsparse compressions that drop nothing vs no compression.

    Compared with the tolerance rule (tests/tolerances.py): a few ulps of the gradient's
    dtype at the gradient's own scale, so a halved gradient or 15 % of it lost fails.
    """
    cases = {
        "topk_ratio_1": ("mlp", lambda: TopK(1.0)),
        "topk_fewer_nonzeros_than_k": ("embed", lambda: TopK(0.05)),
        "threshold_tiny_tau": ("embed", lambda: Threshold(1e-30)),
        "fp16_sparse": ("embed", lambda: TopK(0.05), torch.float16),
        # with a parameter of zero elements: Horovod hands its empty gradient to compress() like any other
        "topk_ratio_1_with_empty": ("mlp", lambda: TopK(1.0)),
        # nn.Embedding(sparse=True): Horovod reduces its gradient itself (a sparse allgather) and calls
        # decompress() with no context; the other parameters go through gradsparse
        "topk_sparse_embedding": ("embed", lambda: TopK(0.05)),
    }
    out = {}
    for name, (kind, factory, *dtype) in cases.items():
        dtype = dtype[0] if dtype else torch.float32
        params, grads = {}, {}
        compression = None
        for variant in ("plain", "sparse"):
            model = make_model(kind).to(dtype)
            if name.endswith("_with_empty"):
                model.empty = torch.nn.Parameter(torch.zeros(0, dtype=dtype))
            if name == "topk_sparse_embedding":
                model.embed.sparse = True
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            if variant == "plain":
                opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
            else:
                compression = gh.SparseCompression(factory(), min_compress_numel=1000)
                opt = gh.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=compression)
            grads[variant] = []
            for step in range(steps):
                opt.zero_grad()
                loss_of(model, kind, rank, step).backward()
                opt.step()  # the averaged gradient stays in p.grad
                grads[variant].append([(p.grad.to_dense() if p.grad.is_sparse else p.grad).detach().clone()
                                       for p in model.parameters()])
            params[variant] = [p.detach().clone() for p in model.parameters()]
        worst = max(float((a.float() - b.float()).abs().max()) for a, b in zip(params["plain"], params["sparse"])
                    if a.numel())
        pairs = [(a, b) for plain, sparse in zip(grads["plain"], grads["sparse"]) for a, b in zip(plain, sparse)
                 if a.numel()]  # an empty gradient has no error to plant
        sparse_buckets = sum(s["buckets"] - s["allreduce_buckets"] for s in list(compression.history)[1:])
        out[name] = {"worst": worst, "close": all(is_close(b, a, dtype) for a, b in pairs),
                     "sensitive": all(rejects_planted_errors(a, dtype) for a, _ in pairs),
                     "sparse_buckets": sparse_buckets, "steps": len(compression.history),
                     "empty_reduced": getattr(getattr(model, "empty", None), "grad", None) is not None}
    return out


def dgc_run(gh, hvd, rank, timeline=None):
    """The DGC configuration of tests/multiprocess/test_ddp.py through Horovod; optionally record a timeline."""
    model = make_model("mlp")
    compression = gh.SparseCompression(DGC(**DGC_CFG), min_compress_numel=MIN_NUMEL)
    opt = gh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                  named_parameters=model.named_parameters(), compression=compression)
    for step in range(DGC_STEPS):
        if timeline and step == 1:
            hvd.start_timeline(timeline)
            hvd.barrier()  # no rank starts step 1 before rank 0 (which writes the timeline) records
        opt.zero_grad()
        loss_of(model, "mlp", rank, step).backward()
        opt.step()
    if timeline:
        hvd.stop_timeline()
    return model, compression


def dgc_through_ddp(rank, world):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradsparse import ddp as gddp

    model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gddp.register(model, DGC(**DGC_CFG), optimizer=opt, min_compress_numel=MIN_NUMEL)
    _train(model, opt, "mlp", rank, DGC_STEPS)
    params = [p.detach().clone() for p in model.parameters()]
    del model, opt
    dist.barrier()
    return params


def refusals(hvd, gh, rank, world):
    seen = {}
    model = make_model("mlp")

    def sgd(m=model, **kw):
        return torch.optim.SGD(m.parameters(), lr=0.1, **kw)

    seen["adasum"] = _error(lambda: gh.DistributedOptimizer(
        sgd(), named_parameters=model.named_parameters(), compression=gh.SparseCompression(TopK(0.01)), op=hvd.Adasum))
    seen["sparse_as_dense"] = _error(lambda: gh.DistributedOptimizer(
        sgd(), named_parameters=model.named_parameters(), compression=gh.SparseCompression(TopK(0.01)),
        sparse_as_dense=True))
    seen["momentum"] = _error(lambda: gh.DistributedOptimizer(
        sgd(momentum=0.9), named_parameters=model.named_parameters(), compression=gh.SparseCompression(DGC(0.01))))

    # the compressor itself, or the class, where a SparseCompression instance belongs
    seen["bare_compressor"] = _error(lambda: gh.DistributedOptimizer(
        sgd(), named_parameters=model.named_parameters(), compression=DGC(0.01)))
    seen["compression_class"] = _error(lambda: gh.DistributedOptimizer(
        sgd(), named_parameters=model.named_parameters(), compression=gh.SparseCompression))

    shared = gh.SparseCompression(TopK(0.01))
    gh.DistributedOptimizer(sgd(), named_parameters=model.named_parameters(), compression=shared)
    other = make_model("mlp")
    seen["shared"] = _error(lambda: gh.DistributedOptimizer(
        sgd(other), named_parameters=other.named_parameters(), compression=shared))

    # mismatched parameter sets: the last rank's model has one more layer
    mismatched = make_model("mlp")
    if rank == world - 1:
        mismatched.add_module("extra", nn.Linear(3, 3))
    seen["mismatch"] = _error(lambda: gh.DistributedOptimizer(
        sgd(mismatched), named_parameters=mismatched.named_parameters(), compression=gh.SparseCompression(TopK(0.01))))

    # The same refusals when the compression goes straight to an unmodified hvd.DistributedOptimizer.
    def plain_step(kind, m, **kw):
        opt = hvd.DistributedOptimizer(sgd(m), named_parameters=m.named_parameters(), **kw)
        opt.zero_grad()
        loss_of(m, kind, rank, 0).backward()
        opt.step()

    m = make_model("mlp")
    seen["plain_bare_compressor"] = _error(lambda: plain_step("mlp", m, compression=DGC(0.01)))
    m = make_model("mlp")
    seen["plain_unbound"] = _error(lambda: plain_step("mlp", m, compression=gh.SparseCompression(TopK(0.01))))
    m = make_model("mlp")
    seen["plain_sum"] = _error(lambda: plain_step(
        "mlp", m, compression=gh.SparseCompression(TopK(0.01), named_parameters=m.named_parameters()), op=hvd.Sum))
    m = make_model("embed")
    m.embed.sparse = True
    seen["plain_sparse_as_dense"] = _error(lambda: plain_step(
        "embed", m, compression=gh.SparseCompression(TopK(0.01), named_parameters=m.named_parameters()),
        sparse_as_dense=True))
    m, m2 = make_model("mlp"), make_model("mlp")
    c = gh.SparseCompression(TopK(0.01), named_parameters=m.named_parameters())
    seen["plain_shared"] = _error(lambda: plain_step("mlp", m2, compression=c))
    m = make_model("mlp")
    seen["plain_adasum"] = _error(lambda: plain_step(
        "mlp", m, compression=gh.SparseCompression(TopK(0.01), named_parameters=m.named_parameters()), op=hvd.Adasum))

    # DGCSGD passes through Horovod (which rebuilds the optimizer from its param_groups), and the
    # optimizer check holds at every step: momentum added later raises before the step is applied.
    m = make_model("mlp")
    opt = gh.DistributedOptimizer(DGCSGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
                                  named_parameters=m.named_parameters(), compression=gh.SparseCompression(DGC(0.01)))
    seen["dgcsgd"] = _error(lambda: _train(m, opt, "mlp", rank, 2))
    m = make_model("mlp")
    opt = gh.DistributedOptimizer(sgd(m), named_parameters=m.named_parameters(),
                                  compression=gh.SparseCompression(DGC(0.01)))
    _train(m, opt, "mlp", rank, 1)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "momentum": 0.9})
    before = [p.detach().clone() for p in m.parameters()]
    opt.zero_grad()
    loss_of(m, "mlp", rank, 1).backward()
    seen["momentum_later"] = _error(opt.step)
    opt.synchronize()  # finish the reductions the refused step left in flight
    seen["momentum_later_unchanged"] = all(torch.equal(p, b) for p, b in zip(m.parameters(), before))

    # After every refusal Horovod still works: a sparse run completes.
    m = make_model("mlp")
    c = gh.SparseCompression(TopK(0.01), named_parameters=m.named_parameters())
    plain_step("mlp", m, compression=c)
    seen["after"] = c.steps
    return seen


def checkpoint(hvd, gh, rank):
    """Save at step 4, resume in a fresh model/optimizer/compression; compare with the uninterrupted run."""
    def build():
        model = make_model("mlp")
        compression = gh.SparseCompression(DGC(0.02, warmup=None), min_compress_numel=MIN_NUMEL)
        opt = gh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                      named_parameters=model.named_parameters(), compression=compression)
        return model, opt, compression

    model, opt, compression = build()
    _train(model, opt, "mlp", rank, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "gradsparse": compression.state_dict()}, buf)
    gh.register_elastic()
    state = hvd.elastic.TorchState(model=model, optimizer=opt, compression=compression)
    state.commit()
    committed = {k: {n: t.clone() for n, t in s.items()} for k, s in compression.reducer.memory.state.items()}
    _train(model, opt, "mlp", rank, 8, first=4)
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    moved = any(not torch.equal(t, committed[k][n]) for k, s in compression.reducer.memory.state.items()
                for n, t in s.items())
    state.restore()
    restored = all(torch.equal(t, committed[k][n]) for k, s in compression.reducer.memory.state.items()
                   for n, t in s.items()) and all(v == 4 for v in compression.steps.values())
    state.sync()  # same world: residuals kept
    kept = all(torch.equal(t, committed[k][n]) for k, s in compression.reducer.memory.state.items()
               for n, t in s.items())
    # as if the job had been resized since the commit: sync() must drop the per-rank residuals
    state._handlers["compression"]._saved["world_size"] += 1
    state.sync()
    dropped = compression.reducer.memory.state == {} and all(v == 4 for v in compression.steps.values())

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, compression2 = build()
    model2.load_state_dict(ckpt["model"])
    compression2.load_state_dict(ckpt["gradsparse"])
    _train(model2, opt2, "mlp", rank, 8, first=4)
    resumed = [p.detach().clone() for p in model2.parameters()]
    bad = dict(ckpt["gradsparse"], world_size=ckpt["gradsparse"]["world_size"] + 1)
    return {"resume_equal": all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)),
            "elastic_moved": moved, "elastic_restored": restored, "elastic_kept": kept, "elastic_dropped": dropped,
            "wrong_world": _error(lambda: compression2.load_state_dict(bad))}


def uneven(hvd, gh, rank, world, steps=12):
    """Threshold with a silent last rank (empty payloads), DGC and TopK: every rank ends identical."""
    out = {}
    for name, factory in {"threshold": lambda: Threshold(0.02), "topk": lambda: TopK(0.01),
                          "dgc": lambda: DGC(0.01, warmup=None)}.items():
        model = make_model("mlp")
        compression = gh.SparseCompression(factory())
        opt = gh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                      named_parameters=model.named_parameters(), compression=compression)
        for step in range(steps):
            opt.zero_grad()
            scale = 0.0 if (name == "threshold" and rank == world - 1) else 1.0
            (scale * loss_of(model, "mlp", rank, step)).backward()
            opt.step()
        out[name] = {"hash": params_hash(model), "history": list(compression.history)}
    return out


def split_against_allgather(hvd, gh, rank, steps=6):
    """DGC in its 25 % warm-up stage and TopK 25 %, transport "split" against "allgather" (the same bits)."""
    out = {}
    for name, factory in {"dgc": lambda: DGC(0.01), "topk": lambda: TopK(0.25)}.items():
        for transport in ("allgather", "split"):
            model = make_model("mlp")
            compression = gh.SparseCompression(factory(), transport=transport, min_compress_numel=MIN_NUMEL)
            opt = gh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                          named_parameters=model.named_parameters(), compression=compression)
            _train(model, opt, "mlp", rank, steps)
            out[f"{name}.{transport}"] = {"hash": params_hash(model),
                                          "split_buckets": sum(h.get("split_buckets", 0)
                                                               for h in compression.history)}
    return out


def communicator(rank, world):
    """HorovodCommunicator's side of the Communicator contract: futures resolve only in complete(tag)."""
    from gradsparse.comm.horovod import HorovodCommunicator

    comm = HorovodCommunicator()
    out = {"needs_complete": comm.needs_complete, "rank": comm.rank, "world_size": comm.world_size}
    mine = ((torch.arange(3 + 5 * rank) * 7 + 31 * rank) % 251).to(torch.uint8)
    with comm.tagged("contract"):
        sizes = comm.exchange_sizes(mine.numel(), mine.device)
        fut = comm.allgather(mine, sizes)
        out["second_under_tag"] = _error(lambda: comm.allgather(mine, sizes))
    out["pending"] = {"done": fut.done(), "in_flight": comm.in_flight()}
    out["process_set_while_pending"] = _error(lambda: comm.use_process_set(None))
    comm.complete("contract")
    out["completed"] = {"done": fut.done(), "in_flight": comm.in_flight(),
                        "got": [t.tolist() for t in fut.wait()], "sizes": sizes}
    out["complete_again"] = _error(lambda: comm.complete("contract"))
    out["float_payload"] = _error(lambda: comm.allgather(torch.zeros(4)))
    with comm.tagged("contract.ints"):
        out["ints"] = comm.allgather_ints([rank, 2**40 + rank], torch.device("cpu"))
        out["broadcast"] = comm.broadcast_ints([10 + rank, -rank], torch.device("cpu"), root=world - 1)
    comm.use_process_set(None)
    out["after"] = comm.world_size
    return out


def amp(gh, rank, steps=8, overflow_step=5, cut_step=3):
    """Horovod's AMP recipe with a real CPU GradScaler whose scale grows, is cut, and skips one overflowing step.

    Returns the parameter hashes of the unscaled run (which skips the same step), the scaled run told
    the scaler (``grad_scaler=``) and the scaled run not told, per compressor, plus the scales seen.
    """
    from torch.amp import GradScaler

    def run(make, scaled, tell):
        model = make_model("mlp")
        scaler = GradScaler("cpu", init_scale=2.0**8, growth_interval=1) if scaled else None
        compression = gh.SparseCompression(make(), min_compress_numel=MIN_NUMEL,
                                           grad_scaler=scaler if tell else None)
        opt = gh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR),
                                      named_parameters=model.named_parameters(), compression=compression)
        scales = []
        for step in range(steps):
            opt.zero_grad()
            loss = loss_of(model, "mlp", rank, step)
            if step == overflow_step and rank == 1:
                loss = loss * float("inf")  # one rank overflows: every rank must skip the step
            (loss if scaler is None else scaler.scale(loss)).backward()
            opt.synchronize()  # docs/horovod.md's recipe
            if scaler is not None:
                scaler.unscale_(opt)
            with opt.skip_synchronize():
                if scaler is not None:
                    scaler.step(opt)
                    scales.append(scaler.get_scale())
                    scaler.update(2.0**4 if step == cut_step else None)
                elif step != overflow_step:
                    opt.step()
        return params_hash(model), scales

    out = {}
    for name, make in {"dgc": lambda: DGC(0.01, warmup=None), "topk": lambda: TopK(0.02),
                       "threshold": lambda: Threshold(2e-3)}.items():
        plain, _ = run(make, False, False)
        told, scales = run(make, True, True)
        untold, _ = run(make, True, False)
        out[name] = {"plain": plain, "told": told, "untold": untold, "scales": scales}
    return out


def readme(rank):
    """The README's Horovod lines, exactly as written, reach the target density with no other call."""
    import gradsparse

    block = block_with("README.md", "gradsparse.horovod")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    namespace = {"gradsparse": gradsparse, "model": model,
                 "opt": torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0)}
    exec(compile(block, "README.md", "exec"), namespace)
    opt = namespace["opt"]
    train_past_default_warmup(model, opt, rank, features=256, batch=8)
    return {"selected": opt._compression.last_stats.selected, "expected": pairs_at(model)}


def main(scenario: str, outdir: str) -> None:
    import horovod.torch as hvd

    import gradsparse.horovod as gh

    torch.set_num_threads(1)
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    result = {"rank": rank, "world": world}
    dist = None
    if scenario == "main":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{os.environ['GS_TEST_PORT']}",
                                rank=rank, world_size=world)
        result["equivalence"] = equivalence(hvd, gh, rank)
        model, compression = dgc_run(gh, hvd, rank, timeline=os.path.join(outdir, "timeline.json"))
        result["dgc_horovod"] = [p.detach().clone() for p in model.parameters()]
        result["dgc_history"] = list(compression.history)
        result["dgc_ddp"] = dgc_through_ddp(rank, world)
        result["refusals"] = refusals(hvd, gh, rank, world)
        result["checkpoint"] = checkpoint(hvd, gh, rank)
        result["readme"] = readme(rank)
        result["amp"] = amp(gh, rank)
        result["communicator"] = communicator(rank, world)
    elif scenario == "world3":
        result["equivalence"] = equivalence(hvd, gh, rank, steps=4)
        model, _ = dgc_run(gh, hvd, rank)
        result["dgc_horovod"] = [p.detach().clone() for p in model.parameters()]
        result["uneven"] = uneven(hvd, gh, rank, world)
        result["split"] = split_against_allgather(hvd, gh, rank)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    hvd.barrier()
    hvd.shutdown()
    if dist is not None:
        dist.destroy_process_group()
    # Skip interpreter teardown (torch 2.13 + gloo may abort there after the work is done; docs/ddp.md).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
