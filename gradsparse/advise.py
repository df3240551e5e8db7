"""Does gradsparse pay on my cluster? Measure the links and the compression cost, predict a step per method.

Run it on your own nodes before adopting gradsparse, under torchrun, as the training job would run::

    torchrun --nnodes 2 --nproc-per-node 8 --node-rank R --master-addr HOST -m gradsparse.advise \\
        --model resnet50 --compute-ms 120 --json advice.json

or in one process (no link to measure: pass the link you expect; only the compression cost is measured)::

    python -m gradsparse.advise --model mypackage.models:build --link-gbit 10

What it does:

1. Links (under torchrun): times allreduce and allgather at a few sizes (``--sizes``, fp32
   elements), the slowest rank per repetition, and fits :class:`gradsparse.cost.LinkModel`
   (latency and bandwidth). With several ranks per node (``LOCAL_WORLD_SIZE``) it measures
   the link inside a node (each node's ranks among themselves) and between nodes (rank 0
   of every node) separately, and where the node's ranks share ``/dev/shm`` the round a
   CPU bucket takes through shared memory inside the node, which the hierarchical
   prediction then uses as the node's link (as the reducer does).
2. Kernels: on your model's gradient shapes (``--model``: a built-in name of
   :data:`gradsparse.model_shapes.BUILTIN` or ``module:factory`` returning an
   ``nn.Module``), bucketed as DDP does, times gradsparse's pipeline (DGC 0.1 %, TopK 1 %)
   on one process, the unpack-add of received pairs, the fp16 cast and PowerSGD's matrix
   work (rank 4). Models above ``--max-measure`` elements are measured on their first
   buckets and scaled per element.
3. Prediction: :func:`gradsparse.stepmodel.step_time` per method for the cluster (the one
   it runs on, or ``--nodes`` x ``--ranks-per-node``), with your compute time per step
   (``--compute-ms``; without it, 0: the prediction is then what the exchange adds).
   The recommendation is the method with the smallest predicted step.

Rank 0 logs its progress, prints a table and writes ``--json``. Nothing here changes
your job; gradsparse's hook itself does not read this output.

Example (one process, a link given; measured numbers differ per machine)::

    >>> from gradsparse.advise import main
    >>> advice = main(["--model", "mlp", "--link-gbit", "1", "--quiet"])
    >>> advice["recommendation"]["method"] == min(advice["predicted"], key=lambda m: advice["predicted"][m]["step_s"])
    True
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import statistics
import sys
import time

import torch

from . import model_shapes
from .cost import KernelCost, LinkModel, Observation, Topology
from .errors import InvalidConfigError
from .stepmodel import METHODS, Algorithms, Kernels, ddp_buckets, step_time

logger = logging.getLogger("gradsparse.advise")

DEFAULT_SIZES = "16384,131072,1048576,4194304"          # fp32 elements: 64 kB .. 16 MB
SPARSE_METHODS = {"dgc0.1": ("DGC", 0.001), "topk1": ("TopK", 0.01)}


# --------------------------------------------------------------------------------------------- the model
def load_shapes(spec: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter shapes of a built-in model name or of ``module:factory()``'s trainable parameters.

    >>> len(load_shapes("resnet50"))
    161
    """
    if spec in model_shapes.BUILTIN:
        return model_shapes.BUILTIN[spec]()
    if ":" not in spec:
        raise InvalidConfigError(f"--model must be one of {sorted(model_shapes.BUILTIN)} or module:factory "
                                 f"(a function returning an nn.Module), got {spec!r}")
    module, _, factory = spec.partition(":")
    build = getattr(importlib.import_module(module), factory, None)
    if not callable(build):
        raise InvalidConfigError(f"--model {spec}: module {module!r} has no function {factory!r} (module:factory, "
                                 "a function returning an nn.Module)")
    model = build()
    if not isinstance(model, torch.nn.Module):
        raise InvalidConfigError(f"--model {spec}: {factory}() returned {type(model).__name__}, not an nn.Module")
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    if not shapes:
        raise InvalidConfigError(f"{spec}() has no trainable parameters")
    return shapes


# ------------------------------------------------------------------------------------------------ links
def _host_busy_s() -> float | None:
    """Busy CPU seconds of the whole host so far (``/proc/stat``: every core, every process, the kernel's
    threads and soft interrupts), or None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...: all but idle and iowait, in clock ticks
    ticks = [int(x) for x in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _timed(fn, repeats: int, group) -> tuple[list[float], list[float], list[float]]:
    """Per repetition (one untimed call first): the slowest rank's seconds, the ranks' mean CPU seconds, and
    the host's busy CPU seconds (mean over the ranks' readings; nan without ``/proc/stat``; counted in clock
    ticks, usually 10 ms: time collectives of tens of ms or more, and average them).

    The CPU seconds are this process's (``time.process_time``: every thread, gloo's included; user and
    system time, so the TCP stack's copies made in the ranks' system calls count): the work a collective
    takes from the cores, which on a machine whose ranks share cores competes with their backward pass.
    The host's adds what is charged to no rank (soft interrupts and kernel threads moving packets, e.g.
    through an emulated link's queue); it counts every rank on the host and anything else running there.
    """
    import torch.distributed as dist

    fn()
    times, cpu, host = [], [], []
    for _ in range(repeats):
        dist.barrier(group=group)
        h0, c0, t0 = _host_busy_s(), time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        h1 = _host_busy_s()
        host.append(h1 - h0 if h0 is not None and h1 is not None else math.nan)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    c = torch.tensor([cpu, host], dtype=torch.float64)
    dist.all_reduce(c, group=group)
    c /= dist.get_world_size(group)
    return t.tolist(), c[0].tolist(), c[1].tolist()


CPU_KINDS = ("allreduce", "allgather", "allreduce_fp16")   # the collectives whose CPU work is fitted


def measure_link(sizes: list[int], repeats: int, group=None) -> dict:
    """Time allreduce (fp32) and allgather (bytes) at every size on ``group``; fit a LinkModel.

    Also the CPU each collective takes per rank (:func:`_timed`), fp16 allreduces included (its
    sums run on the CPU here), fitted per kind as a :class:`LinkModel` of CPU time: ``latency_s``
    CPU seconds per round, ``bytes_per_s`` bytes through the busiest hop per CPU second (``cpu``;
    :func:`gradsparse.stepmodel.step_time` charges it where the ranks share their cores).
    """
    import torch.distributed as dist

    world = dist.get_world_size(group)
    observations, rows, cpu_obs = [], [], {k: [] for k in CPU_KINDS}
    for n in sizes:
        buf = torch.ones(n)
        half = torch.ones(n, dtype=torch.float16)
        payload = torch.zeros(n * 4 // world or 1, dtype=torch.uint8)   # the same bytes as the allreduce moves
        outs = [torch.empty_like(payload) for _ in range(world)]
        for kind, nbytes, fn in (("allreduce", 4 * n, lambda: dist.all_reduce(buf, group=group)),
                                 ("allgather", payload.numel(), lambda: dist.all_gather(outs, payload, group=group)),
                                 ("allreduce_fp16", 2 * n, lambda: dist.all_reduce(half, group=group))):
            times, cpu, host = _timed(fn, repeats, group)
            ring = "allreduce" if kind == "allreduce_fp16" else kind
            if kind != "allreduce_fp16":                    # the link is fitted on fp32 and bytes, as before
                observations += [Observation.collective(kind, nbytes, world, t) for t in times]
            cpu_obs[kind] += [Observation.collective(ring, nbytes, world, c) for c in cpu if c > 0]
            rows.append({"op": kind, "bytes": nbytes, "median_s": statistics.median(times),
                         "cpu_s": statistics.median(cpu),
                         "host_cpu_s": statistics.fmean(host)})              # mean: whole clock ticks
    model, fit = _fit_link(observations)
    cpu_models = {}
    for kind, obs in cpu_obs.items():
        try:
            cpu_models[kind] = LinkModel.fit(obs).as_dict()
        except InvalidConfigError:        # CPU times too small to resolve (or too few): bytes per CPU second only
            cpu_models[kind] = _bandwidth_only(obs).as_dict() if obs else None
    logger.info("CPU per rank: %s", ", ".join(f"{k} {_cpu_text(m)}" for k, m in cpu_models.items()))
    return {"world": world, "model": model.as_dict(), "fit": fit, "timings": rows, "cpu": cpu_models}


def _cpu_text(m: dict | None) -> str:
    if m is None:
        return "not resolved"
    return f"{1e6 * m['latency_s']:.1f} us per round + {1e9 / m['bytes_per_s']:.2f} ns per byte"


def _fit_link(observations: list[Observation]) -> tuple[LinkModel, str]:
    """Latency and bandwidth fitted to the timings, or, where no line fits them (timings that do not grow
    with size: a loaded or very fast link), the bandwidth of the largest transfers (logged); and which."""
    try:
        return LinkModel.fit(observations), "latency and bandwidth"
    except InvalidConfigError as err:
        model = _bandwidth_only(observations)
        logger.warning("link fit: %s; using the bandwidth of the largest transfers and no latency: %s", err,
                       _link_text(model.as_dict()))
        return model, "bandwidth only"


def _bandwidth_only(observations: list[Observation]) -> LinkModel:
    """No latency, the median bandwidth of the largest transfers: what is left when no line fits the timings."""
    largest = max(o.link_bytes for o in observations)
    rates = [o.link_bytes / o.seconds for o in observations if o.link_bytes == largest]
    return LinkModel(0.0, statistics.median(rates))


def measure_links(sizes: list[int], repeats: int, local: int) -> dict:
    """Every link level of the running job: ``flat`` (all ranks), ``intra`` and ``inter`` when nodes hold
    several ranks. Every rank must call it."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    nodes = world // local
    out = {"flat": measure_link(sizes, repeats)}
    logger.info("all %d ranks: %s", world, _link_text(out["flat"]["model"]))
    if local > 1 and nodes > 1:
        node_groups = [dist.new_group(list(range(n * local, (n + 1) * local))) for n in range(nodes)]
        index_groups = [dist.new_group(list(range(i, world, local))) for i in range(local)]
        out["intra"] = measure_link(sizes, repeats, node_groups[rank // local])     # every node at once
        logger.info("inside a node (%d ranks): %s", local, _link_text(out["intra"]["model"]))
        if rank % local == 0:
            out["inter"] = measure_link(sizes, repeats, index_groups[0])            # one rank per node
        dist.barrier()
        out["inter"] = _broadcast_link(out.get("inter"), nodes, len(sizes))
        logger.info("between nodes (%d nodes, one rank each): %s", nodes, _link_text(out["inter"]["model"]))
        shared = measure_shared_memory(sizes, repeats, local)
        if shared is not None:
            out["intra_shared"] = shared
            logger.info("inside a node through shared memory: %s", _link_text(shared["model"]))
    return out


def measure_shared_memory(sizes: list[int], repeats: int, local: int) -> dict | None:
    """What the hierarchical reducer does inside a node with a CPU bucket of each size (through shared memory,
    :meth:`~gradsparse.hierarchical.HierarchicalReducer.node_round`), every node at once, timed as the node's
    allreduce of it and fitted as its link; None where the node's ranks do not share ``/dev/shm``. Every rank
    must call it."""
    import torch.distributed as dist

    from .compressors import TopK
    from .hierarchical import Groups, HierarchicalReducer

    reducer = HierarchicalReducer(TopK(0.01), Groups.create(local), transport="hierarchical")
    agreed = torch.tensor([float(reducer.shared is not None)])  # the same on a node's ranks; nodes must agree
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if not agreed.item():
        return None
    observations, rows = [], []
    for n in sizes:
        times, _, _ = _timed(lambda: reducer.node_round(n), repeats, None)
        observations += [Observation.collective("allreduce", 4 * n, local, t) for t in times]
        rows.append({"op": "shared_memory_round", "bytes": 4 * n, "median_s": statistics.median(times)})
    model, fit = _fit_link(observations)
    return {"world": local, "model": model.as_dict(), "fit": fit, "timings": rows}


def _broadcast_link(link: dict | None, world: int, n_sizes: int) -> dict:
    """Rank 0's measured link, sent to every rank as numbers (a float64 tensor: nothing is unpickled)."""
    import torch.distributed as dist

    kinds = ("allreduce", "allgather", "allreduce_fp16")
    fits = ("latency and bandwidth", "bandwidth only")
    head_len = 3 + 2 * len(CPU_KINDS)                 # link model, fit, then each CPU model (nan: not resolved)
    flat = torch.zeros(head_len + 5 * len(kinds) * n_sizes, dtype=torch.float64)
    if link is not None:
        rows = [x for r in link["timings"]
                for x in (kinds.index(r["op"]), r["bytes"], r["median_s"], r["cpu_s"], r["host_cpu_s"])]
        cpu = [x for k in CPU_KINDS for x in ((link["cpu"][k]["latency_s"], link["cpu"][k]["bytes_per_s"])
                                              if link["cpu"].get(k) else (math.nan, math.nan))]
        head = [link["model"]["latency_s"], link["model"]["bytes_per_s"], fits.index(link["fit"]), *cpu]
        flat[:head_len + len(rows)] = torch.tensor([*head, *rows], dtype=torch.float64)
    dist.broadcast(flat, src=0)
    values = flat.tolist()
    rows = [{"op": kinds[int(values[i])], "bytes": int(values[i + 1]), "median_s": values[i + 2],
             "cpu_s": values[i + 3], "host_cpu_s": values[i + 4]} for i in range(head_len, len(values), 5)]
    cpu = {k: None if math.isnan(values[3 + 2 * j]) else LinkModel(values[3 + 2 * j], values[4 + 2 * j]).as_dict()
           for j, k in enumerate(CPU_KINDS)}
    return {"world": world, "model": LinkModel(values[0], values[1]).as_dict(), "fit": fits[int(values[2])],
            "timings": rows, "cpu": cpu}


def _link_text(m: dict) -> str:
    return f"latency {1e6 * m['latency_s']:.1f} us, {m['gbit_per_s']:.3g} Gbit/s"


# ---------------------------------------------------------------------------------------------- kernels
def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_kernels(shapes, repeats: int = 3, max_measure: int = 2**25, seed: int = 0) -> dict:
    """Per-element costs on this process of gradsparse (per sparse method), fp16 and PowerSGD (rank 4)."""
    from .comm import LocalCommunicator
    from .compressors import DGC, TopK
    from .reducer import Segment, SparseReducer

    gen = torch.Generator().manual_seed(seed)
    buckets, measured = [], 0
    for b in _shape_buckets(shapes):
        if measured and measured + sum(math.prod(s) for _, s in b) > max_measure:
            break
        buckets.append(b)
        measured += sum(math.prod(s) for _, s in b)
    flats = [torch.randn(sum(math.prod(s) for _, s in b), generator=gen) for b in buckets]
    work = [torch.empty_like(f) for f in flats]
    segments = []
    for b in buckets:
        offset, segs = 0, []
        for name, s in b:
            segs.append(Segment(name, offset, math.prod(s)))
            offset += math.prod(s)
        segments.append(segs)
    out = {"measured_elements": measured, "elements": model_shapes.numel(shapes)}
    for name, (kind, density) in SPARSE_METHODS.items():
        compressor = DGC(density, warmup=None) if kind == "DGC" else TopK(density)
        reducer = SparseReducer(compressor, LocalCommunicator())
        compressed = sum(s.numel for segs in segments for s in segs if s.numel >= reducer.options.min_compress_numel)
        step = [1]

        def run(reducer=reducer):
            for flat, buf, segs in zip(flats, work, segments):
                buf.copy_(flat)
                reducer.reduce(buf, segs, step[0]).wait()
            step[0] += 1

        seconds = _median_time(run, repeats)
        copy_s = _median_time(lambda: [buf.copy_(f) for f, buf in zip(flats, work)], repeats)  # not the reducer's
        out[name] = {"per_element_s": max(seconds - copy_s, 0.0) / max(compressed, 1),
                     "step_s": seconds - copy_s, "compressed_elements": compressed}
        logger.info("%s: %.1f ms per step on %d elements", name, 1e3 * (seconds - copy_s), measured)
    # unpack-add: 8 payloads against 1 of the largest bucket's 1 % pairs
    from . import ops

    big = max(flats, key=torch.Tensor.numel)
    k = max(1, big.numel() // 100)
    idx = torch.sort(torch.randperm(big.numel(), generator=gen)[:k]).values.to(torch.int32)
    payload = ops.pack(idx, big[idx.long()], big.new_empty(0), big.numel(), torch.float32)
    dest = torch.empty_like(big)
    one = _median_time(lambda: ops.unpack_add([payload], dest, torch.float32, overwrite=True), repeats)
    eight = _median_time(lambda: ops.unpack_add([payload] * 8, dest, torch.float32, overwrite=True), repeats)
    out["unpack_per_pair_s"] = max(eight - one, 0.0) / (7 * k)
    # fp16_compress_hook's own work: cast into a new fp16 tensor, divide by the world size, and (after the
    # allreduce) copy back into the bucket
    out["fp16_per_element_s"] = _median_time(
        lambda: [w.copy_(f.to(torch.float16).div_(2)) for f, w in zip(flats, work)], repeats) / measured
    measured_shapes = [(n, s) for b in buckets for n, s in b]
    # PowerSGD: PyTorch's hook itself, on DDP's buckets and on one bucket (how it runs under gloo)
    out["powersgd"] = {layout: _powersgd_cost(measured_shapes, 4, repeats, gen, bucket_mb)
                       for layout, bucket_mb in (("ddp", 25.0), ("one_bucket", math.inf))}
    out["powersgd_per_element_s"] = out["powersgd"]["ddp"]["per_element_s"]
    logger.info("unpack %.2f ns/pair, fp16 cast %.2f ns/element, PowerSGD rank 4 (PyTorch's hook) %s",
                1e9 * out["unpack_per_pair_s"], 1e9 * out["fp16_per_element_s"],
                "; ".join(f"{k}: {1e3 * v['step_s']:.1f} ms ({1e9 * v['per_element_s']:.2f} ns/element)"
                          for k, v in out["powersgd"].items()))
    return out


def _shape_buckets(shapes, bucket_mb: float = 25.0, first_mb: float = 1.0):
    """The parameters (name, shape) of each DDP bucket, in the order of gradsparse.stepmodel.ddp_buckets."""
    out, current, size, cap = [], [], 0, first_mb * 2**20
    for name, shape in reversed(shapes):
        current.append((name, shape))
        size += 4 * math.prod(shape)
        if size >= cap:
            out.append(current)
            current, size, cap = [], 0, bucket_mb * 2**20
    return out + ([current] if current else [])


class _HookBucket:
    """What PyTorch's ``powerSGD_hook`` reads of a DDP ``GradBucket`` (which Python cannot construct): the flat
    buffer, the gradients as views of it, the bucket's index and whether it is the last of the step."""

    def __init__(self, index: int, count: int, buffer: torch.Tensor, shapes):
        self._index, self._last, self._buffer = index, index == count - 1, buffer
        self._grads, offset = [], 0
        for s in shapes:
            self._grads.append(buffer[offset:offset + math.prod(s)].view(s))
            offset += math.prod(s)

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return self._grads

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last


def _one_rank_group():
    """A process group of this process alone, for PyTorch's hook to run on without moving bytes: its allreduce
    returns the tensors as they are (the sum over one rank) through an already completed future. Plain Python:
    no gloo threads (a gloo group kept for the hook's callbacks can abort the interpreter as it exits)."""
    import torch.distributed as dist

    class Done(dist._Work):
        def __init__(self, tensors):
            super().__init__()
            self._future = torch.futures.Future()
            self._future.set_result(tensors)

        def wait(self, timeout=None):
            return True

        def get_future(self):
            return self._future

    class OneRank(dist.ProcessGroup):
        def __init__(self):
            super().__init__(0, 1)

        def allreduce(self, tensors, opts=None):
            return Done(tensors)

        def size(self):
            return 1

        def getBackendName(self):
            return "one-rank"

    return OneRank()


def _powersgd_cost(shapes, rank: int, repeats: int, gen, bucket_mb: float = math.inf) -> dict:
    """Seconds of PyTorch's own ``powerSGD_hook`` (rank ``rank``, error feedback, warm start) per step on these
    gradient shapes, bucketed as DDP does (``bucket_mb=inf``: one bucket, as the benchmarks run it under gloo).

    Run in this process on a one-rank group (:func:`_one_rank_group`), after the two dense steps of
    ``start_powerSGD_iter=2`` and one PowerSGD step (which allocates P and Q): everything the hook does
    (error feedback, copying the bucket, orthogonalising Q and P one matrix at a time, the three products,
    the new error) but moving bytes. Its allreduces complete at once on one rank, so the callbacks run
    inside the call: ``step_s`` is the whole, ``per_element_s`` per element of the matrices it compresses.
    """
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, powerSGD_hook

    groups = _shape_buckets(shapes, bucket_mb=bucket_mb, first_mb=1.0 if bucket_mb == 25.0 else bucket_mb)  # as DDP
    flats = [torch.randn(sum(math.prod(s) for _, s in g), generator=gen) for g in groups]
    buffers = [torch.empty_like(f) for f in flats]
    buckets = [_HookBucket(i, len(groups), buf, [s for _, s in g]) for i, (g, buf) in enumerate(zip(groups, buffers))]
    group = _one_rank_group()
    state = PowerSGDState(group, matrix_approximation_rank=rank, start_powerSGD_iter=2, random_seed=0)
    hook_logger = logging.getLogger("torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook")
    level, hook_logger.level = hook_logger.level, logging.WARNING       # its per-bucket allocation notes

    def step() -> float:
        total = 0.0
        for flat, buf, bucket in zip(flats, buffers, buckets):
            buf.copy_(flat)                                             # fresh gradients: not timed
            t0 = time.perf_counter()
            powerSGD_hook(state, bucket).wait()
            total += time.perf_counter() - t0
        return total

    try:
        for _ in range(3):                                              # 2 dense steps, then the first PowerSGD
            step()
        seconds = statistics.median(step() for _ in range(repeats))
    finally:
        hook_logger.level = level
    compressed = sum(math.prod(s) for g in groups for _, s in g
                     if len(s) >= 2 and (s[0] + math.prod(s[1:])) * min(rank, s[0], math.prod(s[1:])) * 2
                     < s[0] * math.prod(s[1:]))
    return {"buckets": len(groups), "bucket_mb": bucket_mb, "step_s": seconds, "compressed_elements": compressed,
            "per_element_s": seconds / max(compressed, 1),
            "compression_rate": state.total_numel_before_compression / max(state.total_numel_after_compression, 1)}


# ------------------------------------------------------------------------------------------- prediction
def predict(shapes, topology: Topology, kernels: dict, compute_s: float, algorithms: Algorithms = Algorithms()) -> dict:
    """Predicted step per method (see :mod:`gradsparse.stepmodel`) from measured kernels."""
    buckets = ddp_buckets(shapes)
    names = ["dense", "fp16", "powersgd4", "topk1", "dgc0.1"]
    if topology.nodes > 1 and topology.local > 1:
        names.append("dgc0.1hier")
    names.append("dgc0.1auto")
    out = {}
    for name in names:
        method = METHODS[name]
        sparse = kernels["dgc0.1" if name.startswith("dgc") else "topk1"]["per_element_s"]
        k = Kernels(KernelCost(sparse, kernels["unpack_per_pair_s"]), kernels["fp16_per_element_s"],
                    kernels["powersgd_per_element_s"])
        t = step_time(method, buckets, topology, k, compute_s, algorithms=algorithms)
        out[name] = {"label": method.label, "step_s": t["step"], "hook_s": t["hook"], "comm_s": t["comm"],
                     "exposed_s": t["exposed"], "transports": t["transports"]}
    return out


def recommend(predicted: dict) -> dict:
    best = min(predicted, key=lambda m: (predicted[m]["step_s"], list(predicted).index(m)))
    dense = predicted["dense"]["step_s"]
    sparse_best = min((m for m in predicted if m.startswith(("dgc", "topk"))), key=lambda m: predicted[m]["step_s"])
    pays = predicted[sparse_best]["step_s"] < dense
    if best.startswith("dgc"):
        config = {"compressor": "DGC", "density": 0.001,
                  "transport": {"dgc0.1": "flat allgather", "dgc0.1hier": "hierarchical",
                                "dgc0.1auto": "chosen per bucket by cost"}[best]}
    elif best.startswith("topk"):
        config = {"compressor": "TopK", "density": 0.01, "transport": "flat allgather"}
    else:
        config = {"compressor": None, "hook": predicted[best]["label"]}
    return {"method": best, "label": predicted[best]["label"], "speedup_vs_dense": dense / predicted[best]["step_s"],
            "sparse_pays": pays, "best_sparse": {"method": sparse_best, "label": predicted[sparse_best]["label"],
                                                 "speedup_vs_dense": dense / predicted[sparse_best]["step_s"]},
            "config": config}


def verdict(recommendation: dict) -> str:
    """One sentence on sparse for this cluster: it is the best, it beats dense but another method is faster,
    or it does not beat dense."""
    r, sparse = recommendation, recommendation["best_sparse"]
    if r["method"] == sparse["method"]:
        return "sparse pays here."
    if r["sparse_pays"]:
        return (f"sparse beats dense here ({sparse['label']}: {sparse['speedup_vs_dense']:.2f}x dense), "
                f"but {r['label']} is faster.")
    return f"sparse does NOT pay here (best: {sparse['label']}, {sparse['speedup_vs_dense']:.2f}x dense)."


def table(predicted: dict, compute_s: float) -> str:
    dense = predicted["dense"]["step_s"]
    head = f"{'method':<44}{'step ms':>10}{'hook ms':>10}{'comm ms':>10}{'vs dense':>10}"
    lines = [head, "-" * len(head)]
    for name, p in predicted.items():
        lines.append(f"{p['label']:<44}{1e3 * p['step_s']:>10.1f}{1e3 * p['hook_s']:>10.1f}{1e3 * p['comm_s']:>10.1f}"
                     f"{dense / p['step_s']:>9.2f}x")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gradsparse.advise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", help=f"one of {sorted(model_shapes.BUILTIN)} or module:factory "
                                                      "(default mlp: small and fast; pass your own)")
    parser.add_argument("--compute-ms", type=float, default=0.0, help="your step's compute time (forward, backward, "
                                                                      "optimizer) in ms; default 0")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="fp32 elements per timed collective")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-measure", type=int, default=2**25, help="elements timed at most (larger models scale)")
    parser.add_argument("--nodes", type=int, default=None,
                        help="predict for this many nodes (default: as run; 2 in one process)")
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="ranks per node (default: LOCAL_WORLD_SIZE under torchrun, else 1)")
    parser.add_argument("--link-gbit", type=float, default=None, help="link between nodes to assume (world 1)")
    parser.add_argument("--latency-us", type=float, default=50.0, help="its latency (world 1)")
    parser.add_argument("--intra-gbit", type=float, default=1200.0, help="link inside a node to assume if not "
                                                                           "measured (default 1200 = 150 GB/s)")
    parser.add_argument("--algorithm", default="ring", choices=("ring", "tree"),
                        help="latency rounds of allreduce (gloo: ring; NCCL at scale: tree)")
    parser.add_argument("--json", default=None, help="write the advice here (rank 0)")
    parser.add_argument("--quiet", action="store_true", help="no table, no progress lines")
    return parser


def _measure(args, sizes: list[int]) -> tuple[dict, int, int, int, bool]:
    """Join the job when under torchrun and time its links: ``(links, rank, ranks per node, nodes, distributed)``."""
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if not distributed:
        if args.link_gbit is None:
            raise InvalidConfigError("in one process no link can be measured: pass --link-gbit (and --latency-us), "
                                     "or run under torchrun on your nodes")
        return {}, 0, args.ranks_per_node or 1, 1, False
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank != 0:
        logging.getLogger("gradsparse").setLevel(logging.WARNING)
    local = args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if dist.get_world_size() % local:
        raise InvalidConfigError(f"world size {dist.get_world_size()} is not a multiple of {local} ranks per node")
    return measure_links(sizes, args.repeats, local), rank, local, dist.get_world_size() // local, True


def _links_for(links: dict, local: int, nodes: int, args) -> tuple[LinkModel | None, LinkModel | None]:
    """The (between nodes, inside a node) links to predict with: measured where they were, else given."""
    given = LinkModel(args.latency_us * 1e-6, args.link_gbit * 1e9 / 8) if args.link_gbit else None
    if links.get("inter"):  # inside a node: shared memory where the reducer will use it, else the collectives
        inter = LinkModel(**_model(links["inter"]))
        intra = LinkModel(**_model(links.get("intra_shared") or links["intra"]))
    elif links and local == 1:
        inter, intra = LinkModel(**_model(links["flat"])), None
    elif links:                          # one node of several ranks: the measured link is the one inside it
        inter, intra = given, LinkModel(**_model(links["flat"]))
    else:
        inter, intra = given, None
    if local > 1 and intra is None:
        intra = LinkModel(5e-6, args.intra_gbit * 1e9 / 8)
    if nodes > 1 and inter is None:
        raise InvalidConfigError("no link between nodes was measured (one node): pass --link-gbit to predict for "
                                 "--nodes > 1")
    return inter, intra


def busy_warning(load: float, cores: int, threads: int) -> str | None:
    """A warning when the machine is too busy for the kernel timings to mean anything, else None.

    With more runnable work than cores (1-minute load average ``load`` >= ``cores``), each parallel
    op waits for its descheduled worker threads: on a 2-core machine at load 4.7 every kernel took
    about 24 ms whatever its size (DGC on 134k elements 23.9 ms, 1.1 ms at one thread; the fp16 cast
    179 ns per element against 0.8), and the recommendation flipped to dense.

    >>> busy_warning(0.5, 8, 8) is None
    True
    >>> "load 4.7 on 2 cores" in busy_warning(4.7, 2, 2)
    True
    """
    if load < cores:
        return None
    if threads > 1:
        return (f"this machine is busy (load {load:.1f} on {cores} cores, {threads} torch threads): the kernel "
                f"timings include waits for descheduled threads and can be many times too long, so the prediction "
                f"and the recommendation are not reliable. Run on a quiet machine, or with OMP_NUM_THREADS=1 (as "
                f"torchrun sets it for several ranks per node)")
    return (f"this machine is busy (load {load:.1f} on {cores} cores): the timings share the cores with other work "
            f"and can be too long, so the prediction and the recommendation are not reliable. Run on a quiet machine")


def _report(advice: dict, args) -> None:
    r, target = advice["recommendation"], advice["predicted_for"]
    sys.stdout.write(f"\n{args.model}: {advice['parameters']:,} parameters; predicted for {target['nodes']} node(s) x "
                     f"{target['ranks_per_node']} rank(s), compute {args.compute_ms:g} ms per step\n"
                     f"{table(advice['predicted'], advice['compute_s'])}\n\nrecommended: {r['label']} "
                     f"({r['speedup_vs_dense']:.2f}x dense); {verdict(r)}\n")
    if advice["machine"]["warning"]:
        sys.stdout.write(f"WARNING: {advice['machine']['warning']}\n")


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    shapes = load_shapes(args.model)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    machine = {"load_average": os.getloadavg()[0], "cores": cores, "threads": torch.get_num_threads()}
    machine["warning"] = busy_warning(machine["load_average"], cores, machine["threads"])
    links, rank, local, nodes_run, distributed = _measure(args, [int(float(s)) for s in args.sizes.split(",")])
    if machine["warning"] and rank == 0:
        logger.warning("%s", machine["warning"])
    kernels = measure_kernels(shapes, args.repeats, args.max_measure) if rank == 0 else None
    nodes = args.nodes or (nodes_run if distributed else 2)
    inter, intra = _links_for(links, local, nodes, args)
    advice = None
    if rank == 0:
        topology = Topology(nodes, inter, local=local, intra=intra)
        compute_s = args.compute_ms / 1e3
        predicted = predict(shapes, topology, kernels, compute_s, Algorithms(allreduce=args.algorithm))
        advice = {"model": args.model, "parameters": model_shapes.numel(shapes), "tensors": len(shapes),
                  "measured_on": {"world": nodes_run * local if distributed else 1, "ranks_per_node": local},
                  "predicted_for": {"nodes": nodes, "ranks_per_node": local,
                                    "inter": inter.as_dict() if inter else None,
                                    "intra": intra.as_dict() if intra else None,
                                    "link_source": "measured" if links else "given (--link-gbit)"},
                  "compute_s": compute_s, "links": links, "kernels": kernels, "predicted": predicted,
                  "recommendation": recommend(predicted), "load_average": list(os.getloadavg()), "machine": machine,
                  "torch": torch.__version__}
        if not args.quiet:
            _report(advice, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(advice, f, indent=1)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return advice


def _model(link: dict) -> dict:
    return {"latency_s": link["model"]["latency_s"], "bytes_per_s": link["model"]["bytes_per_s"]}


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    if "WORLD_SIZE" in os.environ:
        os._exit(0)  # torch 2.13 + gloo can abort in interpreter teardown (docs/ddp.md, "Shutting down")
