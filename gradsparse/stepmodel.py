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

Methods (:class:`Method`): ``compute`` (no communication), ``dense`` (fp32 ring
allreduce), ``fp16`` (PyTorch's fp16_compress_hook), ``powersgd`` (PyTorch's hook at a
rank: an allreduce of the uncompressed tensors, of P and of Q), ``sparse`` (gradsparse's
flat allgather), ``hierarchical`` (intra-node reduce-scatter, inter-node sparse
exchange of shards, intra-node allgather) and ``auto`` (per bucket the cheapest of
dense, sparse and hierarchical by :func:`gradsparse.cost.choose`'s rule).

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

from .cost import KernelCost, Topology, collective_time, payload_bytes
from .model_shapes import Shapes
from .reducer import DESCRIPTOR_BYTES  # one blocking allgather per bucket (verify_every=1)

KINDS = ("compute", "dense", "fp16", "powersgd", "sparse", "hierarchical", "auto")


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
)}


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Local work: ``sparse`` (compression per element at the method's density, unpack per pair, per-bucket
    overhead), the fp16 cast per element, PowerSGD's work per element of the matrices it compresses."""

    sparse: KernelCost = KernelCost()
    fp16_per_element_s: float = 0.0
    powersgd_per_element_s: float = 0.0

    def as_dict(self) -> dict:
        return {"sparse": self.sparse.as_dict(), "fp16_per_element_s": self.fp16_per_element_s,
                "powersgd_per_element_s": self.powersgd_per_element_s}


@dataclasses.dataclass(frozen=True)
class Algorithms:
    """Which collective algorithm sets the latency rounds (:data:`gradsparse.cost.ALGORITHMS`).

    gloo runs rings; NCCL allreduces with trees at scale but allgathers with rings.
    """

    allreduce: str = "ring"
    allgather: str = "ring"


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
    work), ``comm`` (collectives and the unpack after them); for ``auto`` also the transport chosen."""
    p, link = topology.world, topology.flat_link
    ar, ag = algorithms.allreduce, algorithms.allgather
    if method.kind == "compute" or p == 1 and method.kind in ("dense", "fp16"):
        return {"control": 0.0, "sync": 0.0, "comm": 0.0}
    if method.kind == "dense":
        return {"control": 0.0, "sync": 0.0, "comm": collective_time("allreduce", 4 * bucket.numel, p, link,
                                                                      algorithm=ar)}
    if method.kind == "fp16":
        return {"control": 0.0, "sync": kernels.fp16_per_element_s * bucket.numel,
                "comm": collective_time("allreduce", 2 * bucket.numel, p, link, algorithm=ar)}
    if method.kind == "powersgd":
        plain, pq, compressed = _powersgd_split(bucket, method.rank)
        comm = sum(collective_time("allreduce", 4 * n, p, link, algorithm=ar) for n in (plain, pq / 2, pq / 2) if n)
        return {"control": 0.0, "sync": kernels.powersgd_per_element_s * compressed, "comm": comm}
    control = collective_time("allgather", DESCRIPTOR_BYTES, p, link, algorithm=ag) if method.control else 0.0
    options = {}
    if method.kind in ("sparse", "auto"):
        count = math.ceil(method.density * bucket.compressed)
        exchange = collective_time("allgather", payload_bytes(bucket.compressed, method.density, n_dense=bucket.whole),
                                   p, link, algorithm=ag)
        options["sparse"] = {"control": control, "sync": kernels.sparse.compress(bucket.compressed),
                             "comm": exchange + kernels.sparse.unpack(p * (count + bucket.whole))}
    if method.kind in ("hierarchical", "auto") and topology.nodes > 1 and topology.local > 1:
        n, L = topology.nodes, topology.local
        shard, whole = math.ceil(bucket.compressed / L), math.ceil(bucket.whole / L)
        rs = collective_time("reduce_scatter", 4 * bucket.numel, L, topology.intra, algorithm=ar)
        exchange = collective_time("allgather", payload_bytes(shard, method.density, n_dense=whole), n,
                                   topology.inter, algorithm=ag, share=L)
        back = collective_time("allgather", 4 * math.ceil(bucket.numel / L), L, topology.intra, algorithm=ag)
        unpack = kernels.sparse.unpack(n * (math.ceil(method.density * shard) + whole))
        # the descriptors are compared among the ranks that exchange payloads: one per node
        checked = collective_time("allgather", DESCRIPTOR_BYTES, n, topology.inter, algorithm=ag) \
            if method.control else 0.0
        options["hierarchical"] = {"control": checked, "sync": rs + kernels.sparse.compress(shard),
                                   "comm": exchange + unpack + back}
    if method.kind == "hierarchical" and "hierarchical" not in options:  # one node, or one rank per node: flat
        return bucket_cost(dataclasses.replace(method, kind="sparse"), bucket, topology, kernels, algorithms)
    if method.kind == "auto":
        options["dense"] = {"control": 0.0, "sync": 0.0,
                            "comm": collective_time("allreduce", 4 * bucket.numel, p, link, algorithm=ar)}
        order = ("dense", "sparse", "hierarchical")
        best = min(options, key=lambda t: (sum(options[t].values()), order.index(t)))
        return {**options[best], "transport": best}
    return options[method.kind]


def step_time(method: Method, buckets: Sequence[Bucket], topology: Topology, kernels: Kernels, compute_s: float,
              *, backward_share: float = 2 / 3, algorithms: Algorithms = Algorithms()) -> dict:
    """Predicted seconds of one step: ``step`` and its parts (``compute``, ``hook`` = synchronous work and
    blocking exchanges, ``comm`` = sum of collective times, ``exposed`` = what the step waits on the network).

    ``buckets`` as :func:`ddp_buckets` returns them; a method with ``one_bucket`` merges them.
    """
    if method.kind == "compute":
        return {"step": compute_s, "compute": compute_s, "hook": 0.0, "comm": 0.0, "exposed": 0.0, "transports": {}}
    if method.one_bucket:
        buckets = [Bucket(sum(b.numel for b in buckets), sum(b.compressed for b in buckets),
                          tuple(m for b in buckets for m in b.matrices))]
    total = sum(b.numel for b in buckets)
    t = compute_s * (1 - backward_share)            # forward pass
    comm_free = hook = comm = 0.0
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
        t += cost["sync"]
        hook += cost["sync"]
        comm_free = max(t, comm_free) + cost["comm"]
        comm += cost["comm"]
    step = max(t, comm_free)
    return {"step": step, "compute": compute_s, "hook": hook, "comm": comm, "exposed": step - t,
            "transports": transports}
