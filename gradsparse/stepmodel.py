"""Predicted time of one data-parallel training step, per way of exchanging the gradients.

Built on :mod:`gradsparse.cost` (links, collectives, transports). A step is modelled
as DDP runs it:

1. The gradients fall into buckets as DDP makes them (:func:`ddp_buckets`: parameters
   in reverse order, a first bucket of 1 MB, then ``bucket_mb``), ready one after
   another during the backward pass (each after its share of the backward time,
   proportional to its size; the backward pass is ``backward_share`` of the compute).
2. The hook's synchronous work for a bucket (compression, fp16 cast, PowerSGD's
   matrix products, and gradsparse's blocking descriptor exchange, which waits for
   the collectives queued before it) delays the rest of the backward pass.
3. The collectives run one at a time, in bucket order, each as soon as its bucket is
   ready and the previous one is done; the step ends when both the backward pass and
   the last collective (with its unpack) are done.
4. Only where the ranks share too few cores (``cores_per_rank``, e.g. several emulated
   ranks on one small machine; ``None``, the default, where every rank has cores of its
   own and the NIC and copy engines move the bytes, as on GPU nodes): the CPU work of the
   collectives (:class:`CollectiveCpu`: gloo's copies, sums and TCP system calls, measured
   per byte) and of the unpack behind them competes with the backward pass. The step
   is then at least the CPU work of one rank over the cores it has (:func:`cpu_bound`),
   whichever of the two schedules is longer.

Methods (:class:`Method`): ``compute`` (no communication), ``dense`` (fp32 ring
allreduce), ``fp16`` (PyTorch's fp16_compress_hook), ``powersgd`` (PyTorch's hook at a
rank: an allreduce of the uncompressed tensors, of P and of Q), ``sparse`` (gradsparse's
flat allgather), ``allreduce`` (gradsparse's selection scattered into the bucket and allreduced:
``transport="allreduce"``), ``hierarchical`` (intra-node reduce-scatter, inter-node sparse
exchange of shards, intra-node allgather), ``split`` (``transport="split"``: each region's
pairs to its owner by an alltoall that blocks the hook, the reduced regions allgathered) and
``auto`` (per bucket the cheapest of dense, sparse and hierarchical by
:func:`gradsparse.cost.choose`'s rule).

Example::

    >>> from gradsparse.cost import KernelCost, LinkModel, Topology
    >>> from gradsparse.model_shapes import resnet50
    >>> from gradsparse.stepmodel import Kernels, METHODS, ddp_buckets, step_time
    >>> buckets = ddp_buckets(resnet50())
    >>> len(buckets), sum(b.numel for b in buckets)
    (5, 25557032)
    >>> topo = Topology(nodes=2, inter=LinkModel(50e-6, 1.25e8))
    >>> kernels = Kernels(sparse=KernelCost(per_element_s=4e-9))
    >>> dense = step_time(METHODS["dense"], buckets, topo, kernels, compute_s=0.25)
    >>> dgc = step_time(METHODS["dgc0.1"], buckets, topo, kernels, compute_s=0.25)
    >>> round(dense["step"], 2), round(dgc["step"], 2)
    (0.92, 0.35)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ._validate import real
from .cost import KernelCost, LinkModel, Topology, collective_time, payload_bytes
from .model_shapes import Shapes
from .reducer import DESCRIPTOR_BYTES  # one blocking allgather per bucket (verify_every=1)
from .split import HEADER_BYTES

KINDS = ("compute", "dense", "fp16", "powersgd", "sparse", "allreduce", "hierarchical", "split", "auto")


@dataclasses.dataclass(frozen=True)
class Bucket:
    """One DDP bucket: its elements, those gradsparse compresses, and PowerSGD's matrices."""

    numel: int
    compressed: int                          # elements of tensors with >= min_compress_numel elements
    matrices: tuple[tuple[int, int], ...]    # (shape[0], rest) of every tensor with 2 or more dimensions

    @property
    def whole(self) -> int:
        return self.numel - self.compressed


def ddp_bucket_shapes(shapes: Shapes, *, bucket_mb: float = 25.0, first_bucket_mb: float = 1.0,
                      element_bytes: int = 4) -> list[Shapes]:
    """The parameters of each DDP bucket, in the order DDP fills them: in reverse, a small first bucket,
    then ``bucket_mb``. ``bucket_mb=math.inf`` gives one bucket (as PowerSGD runs under gloo).

    >>> from gradsparse.model_shapes import resnet50
    >>> [len(b) for b in ddp_bucket_shapes(resnet50())]
    [2, 15, 12, 51, 81]
    """
    buckets, current, cap = [], [], first_bucket_mb * 2**20
    size = 0
    for name, shape in reversed(shapes):
        current.append((name, shape))
        size += math.prod(shape) * element_bytes
        if size >= cap:
            buckets.append(current)
            current, size, cap = [], 0, bucket_mb * 2**20
    if current:
        buckets.append(current)
    return buckets


def ddp_buckets(shapes: Shapes, *, bucket_mb: float = 25.0, first_bucket_mb: float = 1.0, element_bytes: int = 4,
                min_compress_numel: int = 4096) -> list[Bucket]:
    """:func:`ddp_bucket_shapes` as sizes: elements, compressed elements and PowerSGD's matrices per bucket."""
    out = []
    for group in ddp_bucket_shapes(shapes, bucket_mb=bucket_mb, first_bucket_mb=first_bucket_mb,
                                   element_bytes=element_bytes):
        sizes = [math.prod(s) for _, s in group]
        out.append(Bucket(sum(sizes), sum(n for n in sizes if n >= min_compress_numel),
                          tuple((s[0], math.prod(s[1:])) for _, s in group if len(s) >= 2)))
    return out


@dataclasses.dataclass(frozen=True)
class Method:
    """A way to exchange gradients: ``kind`` from :data:`KINDS`, density (sparse kinds), rank (PowerSGD)."""

    name: str
    kind: str
    label: str
    density: float = 1.0
    rank: int = 4
    one_bucket: bool = False     # PowerSGD under gloo (with several buckets PyTorch's hook aborts)
    control: bool = True         # gradsparse's descriptor exchange before every bucket (hierarchical: among nodes)


METHODS = {m.name: m for m in (
    Method("compute", "compute", "compute only (no communication)"),
    Method("dense", "dense", "dense fp32 allreduce"),
    Method("fp16", "fp16", "fp16_compress_hook"),
    Method("powersgd4", "powersgd", "PowerSGD rank 4", rank=4),
    Method("powersgd4_1b", "powersgd", "PowerSGD rank 4 (one bucket)", rank=4, one_bucket=True),
    Method("topk1", "sparse", "gradsparse TopK 1 %", density=0.01),
    Method("dgc0.1", "sparse", "gradsparse DGC 0.1 % (flat)", density=0.001),
    Method("dgc0.1hier", "hierarchical", "gradsparse DGC 0.1 % (hierarchical)", density=0.001),
    Method("dgc0.1auto", "auto", "gradsparse DGC 0.1 % (transport by cost)", density=0.001),
    Method("dgc0.1split", "split", "gradsparse DGC 0.1 % (split)", density=0.001),
    # DGC's first warm-up stage, as the split transport's emulated runs measured it
    Method("dgc25allreduce", "allreduce", "gradsparse DGC 25 % (allreduce of the selection)", density=0.25),
    Method("dgc25split", "split", "gradsparse DGC 25 % (split)", density=0.25),
)}


@dataclasses.dataclass(frozen=True)
class CollectiveCpu:
    """CPU seconds one rank spends in its collectives, per kind, as a :class:`~gradsparse.cost.LinkModel` of CPU
    time: ``latency_s`` CPU seconds per latency round, ``bytes_per_s`` bytes through the busiest hop per CPU
    second (measured by :func:`gradsparse.advise.measure_link`: ``time.process_time`` of the ranks).

    Example::

        >>> cpu = CollectiveCpu(allreduce=LinkModel(0.0, 2e9), allgather=LinkModel(0.0, 2e9))
        >>> round(cpu.seconds("allreduce", 100e6, 2), 3)        # 100 MB between 2 ranks: 100 MB through a hop
        0.05
        >>> round(cpu.seconds("allreduce", 50e6, 2, fp16=True), 3)   # no fp16 model given: the fp32 one
        0.025
    """

    allreduce: LinkModel
    allgather: LinkModel
    allreduce_fp16: LinkModel | None = None

    def seconds(self, kind: str, nbytes: float, world: int, *, fp16: bool = False, algorithm: str = "ring") -> float:
        """CPU seconds of one collective (``nbytes`` as :func:`gradsparse.cost.collective_terms` reads them)."""
        if kind == "allreduce":
            link = self.allreduce_fp16 if fp16 and self.allreduce_fp16 is not None else self.allreduce
        else:
            link = self.allgather if kind == "allgather" else self.allreduce
        return collective_time(kind, nbytes, world, link, algorithm=algorithm)

    def as_dict(self) -> dict:
        return {k: None if v is None else v.as_dict() for k, v in
                (("allreduce", self.allreduce), ("allgather", self.allgather), ("allreduce_fp16", self.allreduce_fp16))}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Local work: ``sparse`` (compression per element at the method's density, unpack per pair, per-bucket
    overhead), the fp16 cast per element, PowerSGD's work per element of the matrices it compresses (all of
    it counted as the hook's synchronous work: with one bucket, as PyTorch's hook runs under gloo, its
    callbacks run after the backward pass like the hook call itself); ``collective_cpu``: the CPU work of
    the collectives (used only with ``cores_per_rank``, see :func:`step_time`); ``ddp_per_element_s``: DDP's
    own work per gradient element on the training thread (copying gradients into its buckets and back),
    which a compute-only step does not do. ``node_shared_memory``: the hierarchical reduction's steps inside
    a node go through shared memory (CPU buckets, ``Hierarchy(shared_memory=True)``), so the intra link's
    times (``Topology.intra``: the round through shared memory, fitted as ``gradsparse.advise`` does) are the
    ranks' own copies, on the training thread before the exchange and in its callback after it, not the
    CPU of gloo's collectives."""

    sparse: KernelCost = KernelCost()
    fp16_per_element_s: float = 0.0
    powersgd_per_element_s: float = 0.0
    collective_cpu: CollectiveCpu | None = None
    ddp_per_element_s: float = 0.0
    node_shared_memory: bool = False

    def as_dict(self) -> dict:
        return {"sparse": self.sparse.as_dict(), "fp16_per_element_s": self.fp16_per_element_s,
                "powersgd_per_element_s": self.powersgd_per_element_s,
                "collective_cpu": None if self.collective_cpu is None else self.collective_cpu.as_dict(),
                "ddp_per_element_s": self.ddp_per_element_s}


@dataclasses.dataclass(frozen=True)
class Algorithms:
    """Which collective algorithm sets the latency rounds (:data:`gradsparse.cost.ALGORITHMS`), and the share of
    the link's bandwidth an alltoall achieves (``alltoall_efficiency``; 1: the link's own).

    gloo runs rings; NCCL allreduces with trees at scale but allgathers with rings. gloo's pairwise alltoall
    moved its bytes at 57 % of the emulated 1 Gbit/s link (docs/scale.md, the split transport measured).
    """

    allreduce: str = "ring"
    allgather: str = "ring"
    alltoall_efficiency: float = 1.0

    def __post_init__(self):
        real(self.alltoall_efficiency, "alltoall_efficiency", low=0, high=1, low_open=True)


def _powersgd_split(bucket: Bucket, rank: int) -> tuple[int, int, int]:
    """(elements allreduced uncompressed, elements of P and Q, elements of the compressed matrices)."""
    pq = compressed = 0
    for m, k in bucket.matrices:
        if (m + k) * rank * 2 < m * k:       # PyTorch's rule with min_compression_rate=2
            pq += (m + k) * rank
            compressed += m * k
    return bucket.numel - compressed, pq, compressed


def bucket_cost(method: Method, bucket: Bucket, topology: Topology, kernels: Kernels,
                algorithms: Algorithms = Algorithms()) -> dict:
    """Seconds of one bucket: ``control`` (blocking, waits for queued collectives), ``sync`` (the hook's own
    work), ``comm`` (collectives and the unpack after them); ``cpu``: the CPU seconds of the collectives (from
    ``kernels.collective_cpu``, 0 without it) and of the work after them (the unpack); for
    ``auto`` also the transport chosen; for ``split`` also ``after`` (its alltoall and the exchange of the
    regions' sizes: blocking, after ``sync``, waiting for queued collectives) and ``post`` (the hook's work
    after them: summing its region's pieces).

    ``split``'s reduced region holds the coordinates any rank selected: ``1 - (1 - density) ** p`` of the
    region's compressed elements where the ranks' selections are independent (an upper bound: correlated
    gradients overlap more), plus its whole elements, sent as pairs or as fp32 values, whichever is smaller."""
    p, link = topology.world, topology.flat_link
    ar, ag = algorithms.allreduce, algorithms.allgather

    def cpu(kind, nbytes, world, *, fp16=False, algorithm=ar):
        if kernels.collective_cpu is None or world == 1:
            return 0.0
        return kernels.collective_cpu.seconds(kind, nbytes, world, fp16=fp16, algorithm=algorithm)

    if method.kind == "compute" or p == 1 and method.kind in ("dense", "fp16"):
        return {"control": 0.0, "sync": 0.0, "comm": 0.0, "cpu": 0.0}
    if method.kind == "dense":
        return {"control": 0.0, "sync": 0.0, "comm": collective_time("allreduce", 4 * bucket.numel, p, link,
                                                                      algorithm=ar),
                "cpu": cpu("allreduce", 4 * bucket.numel, p)}
    if method.kind == "fp16":
        return {"control": 0.0, "sync": kernels.fp16_per_element_s * bucket.numel,
                "comm": collective_time("allreduce", 2 * bucket.numel, p, link, algorithm=ar),
                "cpu": cpu("allreduce", 2 * bucket.numel, p, fp16=True)}
    if method.kind == "powersgd":
        plain, pq, compressed = _powersgd_split(bucket, method.rank)
        sizes = [4 * n for n in (plain, pq / 2, pq / 2) if n]
        comm = sum(collective_time("allreduce", n, p, link, algorithm=ar) for n in sizes)
        return {"control": 0.0, "sync": kernels.powersgd_per_element_s * compressed, "comm": comm,
                "cpu": sum(cpu("allreduce", n, p) for n in sizes)}
    control = collective_time("allgather", DESCRIPTOR_BYTES, p, link, algorithm=ag) if method.control else 0.0
    control_cpu = cpu("allgather", DESCRIPTOR_BYTES, p, algorithm=ag) if method.control else 0.0
    options = {}
    if method.kind in ("sparse", "auto"):
        count = math.ceil(method.density * bucket.compressed)
        nbytes = payload_bytes(bucket.compressed, method.density, n_dense=bucket.whole)
        exchange = collective_time("allgather", nbytes, p, link, algorithm=ag)
        unpack = kernels.sparse.unpack(p * (count + bucket.whole))
        options["sparse"] = {"control": control, "sync": kernels.sparse.compress(bucket.compressed),
                             "comm": exchange + unpack,
                             "cpu": control_cpu + cpu("allgather", nbytes, p, algorithm=ag) + unpack}
    if method.kind in ("hierarchical", "auto") and topology.nodes > 1 and topology.local > 1:
        n, L = topology.nodes, topology.local
        shard, whole = math.ceil(bucket.compressed / L), math.ceil(bucket.whole / L)
        rs = collective_time("reduce_scatter", 4 * bucket.numel, L, topology.intra, algorithm=ar)
        nbytes = payload_bytes(shard, method.density, n_dense=whole)
        exchange = collective_time("allgather", nbytes, n, topology.inter, algorithm=ag, share=L)
        back = collective_time("allgather", 4 * math.ceil(bucket.numel / L), L, topology.intra, algorithm=ag)
        unpack = kernels.sparse.unpack(n * (math.ceil(method.density * shard) + whole))
        # the descriptors are compared among the ranks that exchange payloads: one per node
        checked = collective_time("allgather", DESCRIPTOR_BYTES, n, topology.inter, algorithm=ag) \
            if method.control else 0.0
        # inside the node: gloo's collectives (their CPU from the model), or shared memory, where the copy back
        # is the callback's own work (the reduce-scatter, in ``sync``, is the training thread's already)
        node = back if kernels.node_shared_memory else (
            cpu("reduce_scatter", 4 * bucket.numel, L) + cpu("allgather", 4 * math.ceil(bucket.numel / L), L,
                                                             algorithm=ag))
        work = (node + cpu("allgather", nbytes, n, algorithm=ag) + unpack
                + (cpu("allgather", DESCRIPTOR_BYTES, n, algorithm=ag) if method.control else 0.0))
        options["hierarchical"] = {"control": checked, "sync": rs + kernels.sparse.compress(shard),
                                   "comm": exchange + unpack + back, "cpu": work}
    if method.kind == "allreduce":
        return {"control": control, "sync": kernels.sparse.compress(bucket.compressed),
                "comm": collective_time("allreduce", 4 * bucket.numel, p, link, algorithm=ar),
                "cpu": control_cpu + cpu("allreduce", 4 * bucket.numel, p)}
    if method.kind == "split":
        count = math.ceil(method.density * bucket.compressed)
        nbytes = payload_bytes(bucket.compressed, method.density, n_dense=bucket.whole)
        # the alltoall's pieces leave every rank of a node at once: the node's ranks share its link (a ring's
        # collectives cross it in one flow)
        pieces = collective_time("alltoall", nbytes / algorithms.alltoall_efficiency, p, link, share=topology.local) \
            + collective_time("allgather", 8, p, link, algorithm=ag)
        region = math.ceil(bucket.numel / p)
        reduced = (1.0 - (1.0 - method.density) ** p) * bucket.compressed / p + bucket.whole / p
        message = HEADER_BYTES + min(8 * reduced, 4 * region)
        regions = collective_time("allgather", message, p, link, algorithm=ag)
        own, decode = kernels.sparse.unpack(count + bucket.whole), kernels.sparse.unpack(p * reduced)
        return {"control": control, "sync": kernels.sparse.compress(bucket.compressed), "after": pieces,
                "post": own, "comm": regions + decode,
                "cpu": (control_cpu + cpu("alltoall", nbytes, p) + cpu("allgather", 8, p, algorithm=ag)
                        + cpu("allgather", message, p, algorithm=ag) + decode)}
    if method.kind == "hierarchical" and "hierarchical" not in options:  # one node, or one rank per node: flat
        return bucket_cost(dataclasses.replace(method, kind="sparse"), bucket, topology, kernels, algorithms)
    if method.kind == "auto":
        options["dense"] = {"control": 0.0, "sync": 0.0,
                            "comm": collective_time("allreduce", 4 * bucket.numel, p, link, algorithm=ar),
                            "cpu": cpu("allreduce", 4 * bucket.numel, p)}
        order = ("dense", "sparse", "hierarchical")
        best = min(options, key=lambda t: (options[t]["control"] + options[t]["sync"] + options[t]["comm"],
                                           order.index(t)))
        return {**options[best], "transport": best}
    return options[method.kind]


def cpu_bound(busy_s: float, collective_cpu_s: float, cores_per_rank: float) -> float:
    """The shortest step the cores allow: ``busy_s`` on the training thread (compute and the hook's own work,
    seconds as measured with every rank running), ``collective_cpu_s`` CPU seconds of the collectives on another
    thread (gloo's), ``cores_per_rank`` cores for each rank (cores / ranks on the machine).

    Neither thread runs faster than alone, and together they use at most ``cores_per_rank`` cores: the
    training thread's CPU is ``busy_s x min(1, cores_per_rank)`` (its measured time already includes sharing
    the cores with the other ranks' training threads). With 2 threads per rank and at least 2 cores each,
    nothing is added.

    Example::

        >>> cpu_bound(0.25, 0.1, 1.0)         # 2 ranks on 2 cores: the collectives' CPU adds to the step
        0.35
        >>> round(cpu_bound(0.36, 0.1, 0.5), 3)    # 4 ranks on 2 cores: twice the collectives' CPU
        0.56
        >>> cpu_bound(0.25, 0.1, 2.0)         # a core each for both threads: no bound beyond the training thread
        0.25
    """
    c = real(cores_per_rank, "cores_per_rank", low=0, low_open=True)
    return max(busy_s, collective_cpu_s, (busy_s * min(1.0, c) + collective_cpu_s) / c)


def step_time(method: Method, buckets: Sequence[Bucket], topology: Topology, kernels: Kernels, compute_s: float,
              *, backward_share: float = 2 / 3, algorithms: Algorithms = Algorithms(),
              cores_per_rank: float | None = None) -> dict:
    """Predicted seconds of one step: ``step`` and its parts (``compute``, ``hook`` = synchronous work and
    blocking exchanges, ``comm`` = sum of collective times, ``exposed`` = what the step waits on the network,
    ``cpu`` = CPU seconds of the collectives and the work behind them, ``schedule`` = the step the links and
    the overlap allow, ``cpu_bound`` = the step the cores allow, or None).

    ``buckets`` as :func:`ddp_buckets` returns them; a method with ``one_bucket`` merges them.
    ``cores_per_rank`` (cores of the machine / ranks on it), where the ranks share too few cores: the step is
    at least :func:`cpu_bound` of the training thread's work (compute and the hook's own) and the
    collectives' CPU (``kernels.collective_cpu`` and the work after them). ``None`` (default): every rank
    has cores of its own and the collectives' work is the network's and the copy engines' (GPU nodes).
    """
    if method.kind == "compute":
        return {"step": compute_s, "compute": compute_s, "hook": 0.0, "comm": 0.0, "exposed": 0.0, "transports": {},
                "cpu": 0.0, "schedule": compute_s, "cpu_bound": None}
    if method.one_bucket:
        buckets = [Bucket(sum(b.numel for b in buckets), sum(b.compressed for b in buckets),
                          tuple(m for b in buckets for m in b.matrices))]
    total = sum(b.numel for b in buckets)
    t = compute_s * (1 - backward_share)            # forward pass
    comm_free = hook = comm = sync = cpu = 0.0
    transports: dict[str, int] = {}
    for b in buckets:
        t += compute_s * backward_share * b.numel / total
        cost = bucket_cost(method, b, topology, kernels, algorithms)
        if "transport" in cost:
            transports[cost["transport"]] = transports.get(cost["transport"], 0) + 1
        if cost["control"]:
            waited = max(t, comm_free) + cost["control"]
            hook += waited - t
            t = waited
        work = cost["sync"] + kernels.ddp_per_element_s * b.numel
        t += work
        hook += cost["sync"]
        sync += work
        if cost.get("after"):  # a blocking exchange after the hook's own work (the split's alltoall)
            waited = max(t, comm_free) + cost["after"]
            hook += waited - t
            comm_free = t = waited
        post = cost.get("post", 0.0)
        t += post
        hook += post
        sync += post
        comm_free = max(t, comm_free) + cost["comm"]
        comm += cost["comm"]
        cpu += cost["cpu"]
    schedule = step = max(t, comm_free)
    bound = None
    if cores_per_rank is not None:
        bound = cpu_bound(compute_s + sync, cpu, cores_per_rank)
        step = max(schedule, bound)
    return {"step": step, "compute": compute_s, "hook": hook, "comm": comm, "exposed": step - t,
            "transports": transports, "cpu": cpu, "schedule": schedule, "cpu_bound": bound}
