"""Hierarchical reduction: dense inside a node, sparse between nodes, chosen per bucket by cost.

A node holds ``L`` ranks on a fast link; ``N`` nodes are joined by a slow one. Per
bucket, :class:`HierarchicalReducer`:

1. averages (or sums) the bucket densely inside the node, and local rank ``l`` takes its
   *shard* (see below);
2. compresses its shard and exchanges it with the ranks of local index ``l`` on the
   other nodes through an inner :class:`~gradsparse.reducer.SparseReducer` (error
   feedback, DGC momentum, descriptors, health checks, the transport choice and
   stats apply per shard, unchanged);
3. gathers the shards densely inside the node: every rank gets the whole bucket.

Inside the node, CPU buckets move through shared memory where the node's ranks share
``/dev/shm`` (:class:`~gradsparse.comm.shared_memory.NodeMemory`; docs/design.md, decision 30):
each rank writes the pieces the others own, each owner sums its pieces into its shared region,
which is the shard the inner reducer reduces in place, and each rank then takes every rank's
pieces from their regions: where the column's exchange went as pairs, only the positions its
payloads name (published beside the region; the rest is zero), else the whole pieces. Otherwise
(CUDA, Horovod, no shared ``/dev/shm``, ``shared_memory=False``) both steps are the node's
allreduces (the second of the zero-padded shards, an exact sum): gloo's reduce-scatter and
allgather were about 10x slower than its allreduce here (decision 27), at twice the ideal bytes.

Shards are cut per *parameter*, not per bucket: a parameter of ``m`` elements is
split into ``L`` contiguous pieces of ``ceil(m / L)`` (piece ``l`` to local rank
``l``), keyed ``"name@start:end"`` in the parameter's own coordinates; a parameter
whose last piece would be smaller than ``min_compress_numel`` is not split and goes
whole to local rank ``crc32(name) % L``. So which rank keeps which residual depends
only on the parameter (DDP's bucket rebuilds and checkpoints keep working), and a
piece is compressed exactly when its parameter would be on the flat path.

Scaling: the bucket is multiplied by ``1 / L`` before the node's allreduce and
the inner reducer averages over the ``N`` nodes: the global average, as the flat
path defines it (``op="sum"``: no factor, sums). With nothing dropped the result is
dense DDP's up to the order of the float additions.

Per bucket the transport (``"flat"``: the :class:`SparseReducer` over every rank;
``"hierarchical"``) is chosen by :func:`gradsparse.cost.transport_times` (plus the second node
allreduce) from the link model
(measured once at construction, the slowest rank's timings, so every rank has the
same numbers), the bucket's size and the compressor's density at that step; or
forced with ``transport=``. A parameter's memory lives on one path at a time: when a
bucket changes path, its parameters' residuals and momentum are moved over (one
node-local allreduce per state tensor; see :meth:`HierarchicalReducer._move`), so
nothing sent or kept is lost.

Order of collectives: the first node allreduce, the inner reducer's collectives and
the flat reducer's are issued from the calling thread in bucket order; the second
node allreduce runs on its own process group and is issued from future callbacks
chained in bucket order. Every group therefore sees the same sequence on every rank.

The groups are :class:`~gradsparse.comm.Communicator` s (:class:`Groups`): torch.distributed
subgroups (:meth:`Groups.create`, the DDP hook), MPI sub-communicators (:meth:`Groups.from_mpi`)
or Horovod process sets (:func:`gradsparse.horovod.hierarchy_groups`, the ``compression=`` adapter). Where collectives
are matched by name (Horovod: ``Groups.ordered`` is False) nothing is chained; each is
named after the tag the caller set with :meth:`HierarchicalReducer.tagged`, and
:meth:`HierarchicalReducer.complete` drives the bucket to its end.

Example::

    state = gradsparse.ddp.register(ddp_model, DGC(0.001), optimizer=opt,
                                    hierarchy=Hierarchy(local_size="auto", transport="auto"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import numbers
import os
import statistics
import struct
import time
import zlib
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from . import cost
from ._validate import _got, boolean, choice, instance, integer
from .comm.base import Communicator, completed_future
from .comm.shared_memory import NodeMemory
from .comm.torch_dist import TorchDistCommunicator
from .compressors.base import Compressor
from .errors import CommunicationError, ConfigTypeError, InvalidConfigError, StateMismatchError
from .options import ReducerOptions
from .reducer import Segment, SparseReducer, check_bucket, check_gradient, copied_back, through_copy
from .stats import ALLREDUCE, HIERARCHICAL, HIERARCHICAL_ALLREDUCE, BucketStats

logger = logging.getLogger(__name__)

TRANSPORTS = ("auto", "flat", "hierarchical")
ASSUMED_DENSITY = 0.01  # density the cost choice assumes for data-dependent methods (Threshold)


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """How to build a :class:`HierarchicalReducer`.

    Args:
        local_size: ranks per node: ``"auto"`` (torchrun's ``LOCAL_WORLD_SIZE``) or a number;
            ranks ``r`` with the same ``r // local_size`` share a node.
        transport: ``"hierarchical"`` (always; the default), ``"flat"``, or ``"auto"``: per bucket, by
            cost from links measured at registration (timings differ between runs, so choices may too;
            give ``topology`` and ``kernel`` for reproducible runs).
        topology: the :class:`~gradsparse.cost.Topology` the choice uses (None: measured once).
        kernel: the compression cost (:class:`~gradsparse.cost.KernelCost`; None: measured once).
        shared_memory: inside a node, move CPU buckets through shared memory (``/dev/shm``,
            :class:`~gradsparse.comm.shared_memory.NodeMemory`) rather than the node's collectives, where
            its ranks share it (checked at registration; otherwise the collectives, logged). False: always
            the collectives.

    >>> Hierarchy(local_size=2, transport="hierarchical").transport
    'hierarchical'
    """

    local_size: int | str = "auto"
    transport: str = "hierarchical"
    topology: cost.Topology | None = None
    kernel: cost.KernelCost | None = None
    shared_memory: bool = True

    def __post_init__(self):
        boolean(self.shared_memory, "shared_memory")
        if self.local_size != "auto":
            integer(self.local_size, "local_size", minimum=1)
        choice(self.transport, "transport", TRANSPORTS)
        instance(self.topology, "topology", cost.Topology, "cost.Topology(nodes=2, local=2, inter=..., intra=...)",
                 allow_none=True)
        instance(self.kernel, "kernel", cost.KernelCost, "cost.KernelCost(per_element_s=2e-9)", allow_none=True)

    @classmethod
    def of(cls, value) -> Hierarchy:
        """A :class:`Hierarchy` from ``"auto"``, a number of ranks per node, or one.

        >>> Hierarchy.of("yes")
        Traceback (most recent call last):
        ...
        gradsparse.errors.ConfigTypeError: hierarchy must be Hierarchy(local_size=..., transport=...), 'auto' or a number of ranks per node, got str 'yes'
        """
        if isinstance(value, Hierarchy):
            return value
        if value != "auto" and (isinstance(value, (str, bool)) or not isinstance(value, numbers.Real)):
            raise ConfigTypeError("hierarchy must be Hierarchy(local_size=..., transport=...), 'auto' or a number of "
                                  f"ranks per node, got {_got(value)}")
        return cls(local_size=value)


def local_size_of(value: int | str, world: int, auto: int | None = None) -> int:
    """Ranks per node: ``value``, or for ``"auto"`` the launcher's count (``auto``: Horovod's
    ``local_size()``; None: torchrun's ``LOCAL_WORLD_SIZE``); must divide ``world``."""
    if value == "auto" and auto is not None:
        value = auto
    elif value == "auto":
        env = os.environ.get("LOCAL_WORLD_SIZE")
        if env is None:
            raise InvalidConfigError("hierarchy local_size='auto' needs torchrun's LOCAL_WORLD_SIZE; pass "
                                     "Hierarchy(local_size=ranks_per_node) when not launched by torchrun")
        value = int(env)
    local = integer(value, "local_size", minimum=1)
    if world % local:
        raise InvalidConfigError(f"local_size {local} does not divide the world size {world}: every node must hold "
                                 "the same number of ranks")
    return local


def agree_local_size(local: int, world: Communicator) -> None:
    """Raise :class:`StateMismatchError` on every rank unless every rank of ``world`` has this ``local``."""
    seen = [v[0] for v in world.allgather_ints([local], torch.device("cpu"))]
    if len(set(seen)) > 1:
        raise StateMismatchError(f"ranks disagree on the ranks per node: {seen} (by rank); set the same "
                                 "LOCAL_WORLD_SIZE / local_size on every rank")


@dataclasses.dataclass(frozen=True)
class _Piece:
    key: str          # "name@start:end"
    param: str
    start: int        # in the parameter's own coordinates
    numel: int
    src: int          # offset of the piece in the bucket
    owner: int        # local rank that compresses it


@dataclasses.dataclass(frozen=True)
class _Layout:
    """One bucket's shards: which coordinates each local rank compresses, and where they sit."""

    pieces: tuple[_Piece, ...]
    segments: tuple[Segment, ...]           # this rank's pieces as segments of its shard
    runs: tuple[tuple[int, int, int], ...]  # (bucket offset, shard offset, length): its contiguous runs
    mine: int                               # real elements in this rank's shard
    owners: tuple[tuple[int, int, int, int], ...] = ()  # every rank's runs: (local rank, bucket offset, shard offset,
    #                                                      length)
    shards: tuple[int, ...] = ()            # real elements in each local rank's shard
    ident: int = 0                          # which of the reducer's layouts (names its shared memory)


def split_parameter(key: str, numel: int, local: int, min_compress_numel: int) -> list[tuple[int, int, int]]:
    """``(local rank, start, numel)`` of each piece of one parameter (see the module docstring).

    >>> split_parameter("w", 10_000, 2, 4096)
    [(0, 0, 5000), (1, 5000, 5000)]
    >>> split_parameter("b", 100, 2, 4096) == [(zlib.crc32(b"b") % 2, 0, 100)]
    True
    """
    size = math.ceil(numel / local)
    last = numel - (local - 1) * size
    if local > 1 and numel >= min_compress_numel and last >= min_compress_numel:
        return [(l, l * size, min(size, numel - l * size)) for l in range(local)]
    return [(zlib.crc32(key.encode()) % local, 0, numel)]


def plan_layout(segments: Sequence[Segment], local: int, local_rank: int, min_compress_numel: int) -> _Layout:
    """The shards of a bucket with these ``segments`` (the same on every rank of one local index).

    >>> layout = plan_layout([Segment("w", 0, 10_000), Segment("v", 10_000, 10_000)], 2, 1, 4096)
    >>> [s.key for s in layout.segments], layout.runs
    (['w@5000:10000', 'v@5000:10000'], ((5000, 0, 5000), (15000, 5000, 5000)))
    """
    pieces, segs, runs, owners, fills = [], [], [], [], [0] * local
    for s in sorted(segments, key=lambda s: s.offset):
        for owner, start, numel in split_parameter(s.key, s.numel, local, min_compress_numel):
            piece = _Piece(f"{s.key}@{start}:{start + numel}", s.key, start, numel, s.offset + start, owner)
            pieces.append(piece)
            last = owners[-1] if owners else None
            if last and last[0] == owner and last[1] + last[3] == piece.src and last[2] + last[3] == fills[owner]:
                owners[-1] = (owner, last[1], last[2], last[3] + numel)
            else:
                owners.append((owner, piece.src, fills[owner], numel))
            fills[owner] += numel
            if owner != local_rank:
                continue
            fill = fills[owner] - numel
            segs.append(Segment(piece.key, fill, numel))
            if runs and runs[-1][0] + runs[-1][2] == piece.src:  # contiguous with the last run: extend it
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + numel)
            else:
                runs.append((piece.src, fill, numel))
    return _Layout(tuple(pieces), tuple(segs), tuple(runs), fills[local_rank], tuple(owners), tuple(fills))


@dataclasses.dataclass(frozen=True)
class Groups:
    """The communicators of a hierarchy: the world, this node (two: one used from the calling thread, one
    from future callbacks), this column (the same local index on every node); and its shape.

    ``ordered``: whether collectives must be issued in one order on every rank (torch.distributed);
    False where they are matched by name (Horovod). Build with :meth:`create` (torch.distributed),
    :meth:`from_mpi` (mpi4py) or :func:`gradsparse.horovod.hierarchy_groups` (Horovod process sets).

    Example (under ``mpirun -np 4``: 2 nodes x 2 ranks)::

        reducer = HierarchicalReducer(TopK(0.01), Groups.from_mpi(2))
    """

    world: Communicator
    node: Communicator
    node_gather: Communicator
    cross: Communicator
    nodes: int
    local: int
    node_index: int
    local_rank: int
    ordered: bool = True

    @classmethod
    def create(cls, local: int | str) -> Groups:
        """torch.distributed subgroups of the default group; every rank creates every subgroup, in one order
        (``dist.new_group`` must be called by all ranks)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        local = local_size_of(local, world)
        agree_local_size(local, TorchDistCommunicator())
        nodes = world // local
        mine = {}
        for kind in ("node", "node_gather"):
            for n in range(nodes):
                group = dist.new_group(list(range(n * local, (n + 1) * local)))
                if rank // local == n:
                    mine[kind] = group
        for l in range(local):
            group = dist.new_group(list(range(l, world, local)))
            if rank % local == l:
                mine["cross"] = group
        return cls(TorchDistCommunicator(None), TorchDistCommunicator(mine["node"]),
                   TorchDistCommunicator(mine["node_gather"]), TorchDistCommunicator(mine["cross"]),
                   nodes, local, rank // local, rank % local)


    @classmethod
    def from_mpi(cls, local: int | str, comm=None) -> Groups:
        """Sub-communicators of the mpi4py communicator ``comm`` (None: ``MPI.COMM_WORLD``), by ``Split``;
        ``"auto"``: the ranks sharing this rank's memory (``Split_type(COMM_TYPE_SHARED)``), which must be
        numbered node by node (``mpirun``'s default mapping). Collective: every rank of ``comm`` calls it."""
        from .comm.mpi import MPICommunicator  # the one module that imports mpi4py

        world = MPICommunicator(comm)
        rank = world.rank
        shared = world.split_shared() if local == "auto" else None
        size = local_size_of(local, world.world_size, auto=None if shared is None else shared.world_size)
        agree_local_size(size, world)
        if shared is not None:
            placed = world.allgather_ints([shared.rank], torch.device("cpu"))
            if any(row[0] != r % size for r, row in enumerate(placed)):
                raise InvalidConfigError(f"MPI placed ranks on nodes other than node by node (local ranks by rank: "
                                         f"{[row[0] for row in placed]}): launch with mpirun's default --map-by "
                                         "slot/core, or pass Hierarchy(local_size=...) for ranks r sharing a node "
                                         "when r // local_size is equal")
            shared.free()
        node, node_gather, cross = world.split(rank // size), world.split(rank // size), world.split(rank % size)
        return cls(world, node, node_gather, cross, world.world_size // size, size, rank // size, rank % size)


def _sum_now(comm: Communicator, tensor: torch.Tensor, tag: str) -> torch.Tensor:
    """Blocking in-place sum of ``tensor`` over ``comm``'s ranks, named ``tag`` where names matter."""
    with comm.tagged(tag):
        fut = comm.allreduce_sum(tensor)
    comm.complete(tag)
    return fut.wait()


def _slowest(seconds: list[float], world: Communicator) -> list[float]:
    """Every rank's timings replaced by the slowest rank's (so every rank fits the same model); the float64
    bits travel as int64, exactly."""
    bits = [struct.unpack("<q", struct.pack("<d", t))[0] for t in seconds]
    with world.tagged("gradsparse.measure.slowest"):
        every = world.allgather_ints(bits, torch.device("cpu"))
    return [max(struct.unpack("<d", struct.pack("<q", row[i]))[0] for row in every) for i in range(len(seconds))]


def _fit(observations: list[cost.Observation]) -> cost.LinkModel:
    """The fitted link; when noise hides the latency (a small transfer took as long as a large one), the
    bandwidth of the largest transfer alone."""
    try:
        return cost.LinkModel.fit(observations, robust=False)
    except InvalidConfigError:
        largest = max(observations, key=lambda o: o.link_bytes)
        return cost.LinkModel(0.0, largest.link_bytes / largest.seconds)


def measure(groups: Groups, compressor: Compressor, *, sizes=(1 << 14, 1 << 20), repeats: int = 3,
            node_round: Callable[[int], None] | None = None) -> tuple[cost.Topology, cost.KernelCost]:
    """Fit the links (allreduces inside the node, and between nodes with every column at once) and the
    compression cost per element; the slowest rank's times, so the result is the same on every rank.
    ``node_round(n)``: what the node does with ``n`` elements instead of its allreduce (shared memory)."""
    def timed(comm, n):
        buf = torch.ones(n)
        tag = f"gradsparse.measure.{n}"
        run = (lambda: node_round(n)) if comm is groups.node and node_round is not None else \
            (lambda: _sum_now(comm, buf, tag))
        run()  # warm the connection
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    seconds = [timed(groups.node, n) for n in sizes] + [timed(groups.cross, n) for n in sizes]
    v = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    compressor.select(v, 1 << 30, 1 << 30)
    seconds.append(time.perf_counter() - t0)
    seconds = _slowest(seconds, groups.world)
    k = len(sizes)
    intra = inter = None
    if groups.local > 1:
        intra = _fit([cost.Observation.collective("allreduce", 4 * n, groups.local, t)
                      for n, t in zip(sizes, seconds[:k])])
    if groups.nodes > 1:
        inter = _fit([cost.Observation.collective("allreduce", 4 * n, groups.nodes, t, share=groups.local)
                      for n, t in zip(sizes, seconds[k:2 * k])])
    topology = cost.Topology(nodes=groups.nodes, local=groups.local, inter=inter, intra=intra)
    return topology, cost.KernelCost(per_element_s=seconds[-1] / (1 << 20))


class HierarchicalReducer:
    """The reducer surface (:meth:`reduce`, checkpoints) over a node / cross-node hierarchy.

    Args:
        compressor: a :class:`~gradsparse.compressors.Compressor`.
        groups: the :class:`Groups` (``Groups.create(local_size)``).
        options, **knobs: :class:`~gradsparse.options.ReducerOptions` (both paths use them).
        transport: ``"auto"``, ``"flat"`` or ``"hierarchical"``.
        topology, kernel: the cost inputs of ``"auto"`` (None: :func:`measure` them).
        shared_memory: CPU buckets move inside the node through shared memory where its ranks share
            ``/dev/shm`` (see :class:`Hierarchy`).

    ``flat`` is the :class:`SparseReducer` over every rank, ``inner`` the one over this
    rank's column (same local index on every node); ``memory`` is ``inner``'s (per piece).
    ``shared``: the node's shared memory (None: its collectives carry CPU buckets too).
    ``choices`` holds the last :class:`~gradsparse.cost.Choice` per bucket size.
    """

    def __init__(self, compressor: Compressor, groups: Groups, options: ReducerOptions | None = None, *,
                 transport: str = "hierarchical", topology: cost.Topology | None = None,
                 kernel: cost.KernelCost | None = None, shared_memory: bool = True, **knobs):
        self.compressor = instance(compressor, "compressor", Compressor, "TopK(0.01)")
        self.groups = groups
        self.options = ReducerOptions.of(options, **knobs)
        self.transport = choice(transport, "transport", TRANSPORTS)
        self.flat = SparseReducer(compressor, groups.world, self.options)
        self.inner = SparseReducer(compressor, groups.cross, self.options)
        self.paths: dict[str, str] = {}      # parameter -> "flat" | "hierarchical": where its memory lives
        self.choices: dict[int, cost.Choice] = {}
        self._layouts: dict[tuple, _Layout] = {}
        self._chain: torch.futures.Future = completed_future(None)
        self._tag = "gradsparse"
        self._gathers: dict[str, Callable[[], None]] = {}  # unordered groups: the node gathers complete() runs
        self._landed: dict[int, torch.futures.Future] = {}  # layout -> its last gather through shared memory
        self._used: dict[int, int] = {}  # layout -> the last step it was reduced through shared memory
        self._round_bucket = torch.empty(0)  # node_round's bucket
        #: through shared memory, take the column's result back only where its payloads landed (False: every
        #: element of every piece, as when the exchange was dense)
        self.sparse_gather = True
        self._places: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (layout, owner): shard -> bucket
        self.shared: tuple[NodeMemory, NodeMemory] | None = None  # (reduce, gather) segments of the node
        if (boolean(shared_memory, "shared_memory") and groups.local > 1 and groups.ordered
                and groups.node.carries_cpu_tensors and groups.node_gather.carries_cpu_tensors):
            reduce_memory = NodeMemory.attach(groups.node, "reduce")
            gather_memory = NodeMemory.attach(groups.node_gather, "gather")
            if reduce_memory is not None and gather_memory is not None:
                self.shared = (reduce_memory, gather_memory)
        if self.transport == "auto" and (topology is None or kernel is None):
            measured = measure(groups, compressor, node_round=self.node_round if self.shared else None)
            topology, kernel = topology or measured[0], kernel or measured[1]
            logger.info("gradsparse: hierarchy %d nodes x %d ranks; links %s; compression %.3g ns/element",
                        groups.nodes, groups.local, topology, 1e9 * kernel.per_element_s)
        self.topology, self.kernel = topology, kernel

    # ------------------------------------------------------------------ surface of SparseReducer
    @property
    def communicator(self):
        return self.flat.communicator

    @property
    def memory(self):
        return self.inner.memory

    @property
    def defer_error(self):
        return self.flat.defer_error

    @defer_error.setter
    def defer_error(self, value):
        self.flat.defer_error = self.inner.defer_error = value

    def collective(self, run: Callable, flat: torch.Tensor, step: int):
        return self.flat.collective(run, flat, step)

    @contextlib.contextmanager
    def tagged(self, tag: str):
        """Start the collectives of the reductions issued inside the block under ``tag`` (on the world and
        column communicators; the node's are named ``tag.node`` / ``tag.node_gather`` / ``tag.move...``): what
        :meth:`complete` takes, and the names by which Horovod pairs them across ranks."""
        previous, self._tag = self._tag, tag
        try:
            with self.groups.world.tagged(tag), self.groups.cross.tagged(tag):
                yield
        finally:
            self._tag = previous

    def complete(self, tag: str) -> None:
        """Drive the reduction started under ``tag`` to its end (in this thread), where the groups need it
        (Horovod: ``Groups.ordered`` False; a no-op for torch.distributed and MPI): the flat exchange, or the
        column exchange and then the node's gather. Waiting on the reduction's future afterwards returns at
        once; without this call it never resolves there."""
        for comm in (self.groups.world, self.groups.cross):
            if tag in comm.in_flight():
                comm.complete(tag)
        gather = self._gathers.pop(tag, None)
        if gather is not None:
            gather()

    def _node_sum(self, tensor: torch.Tensor, what: str, flat: torch.Tensor, step: int) -> None:
        """Blocking in-place sum of ``tensor`` over this node, issued from the calling thread."""
        try:
            self.collective(lambda: _sum_now(self.groups.node, tensor, f"{self._tag}.{what}"), flat, step)
        except CommunicationError as err:
            raise self.failed_at("inside", err, flat, step) from err

    def failed_at(self, level: str, err: CommunicationError, flat: torch.Tensor, step: int) -> CommunicationError:
        """A transport failure ``"inside"`` this node or ``"between"`` nodes, as a :class:`CommunicationError`
        naming the bucket, the step, this rank's world rank and place, and the ranks it was exchanging with
        (the dead or unreachable one is among them, unless one of them failed first and left; the column
        reducer's own message numbers ranks within the column). ``err`` becomes its ``__cause__``; its message ends with the backend's.

        Example: ``... failed between nodes on rank 1 (node 0, local rank 1) ... with ranks [1, 3] ...``
        """
        g = self.groups
        if level == "inside":
            peers, where = [g.node_index * g.local + i for i in range(g.local)], f"inside node {g.node_index}"
        else:
            peers, where = [n * g.local + g.local_rank for n in range(g.nodes)], "between nodes"
        root = err.__cause__ if err.__cause__ is not None else err
        cause = str(root).splitlines()[0] if str(root) else repr(root)
        error = CommunicationError(
            f"gradsparse: the hierarchical reduction of the {flat.numel()}-element bucket at step {step} failed "
            f"{where} on rank {g.world.rank} (node {g.node_index}, local rank {g.local_rank}) while exchanging "
            f"with ranks {peers} (by world rank): one of them may have exited, or the link failed or timed out. "
            f"Cause: {cause}")
        error.__cause__ = err
        return error

    def set_loss_scale(self, loss_scale: float) -> None:
        self.flat.set_loss_scale(loss_scale)
        self.inner.set_loss_scale(loss_scale)

    def reset_memory(self) -> None:
        self.flat.reset_memory()
        self.inner.reset_memory()
        self.paths = {}

    # ------------------------------------------------------------------ choice
    def choose(self, flat: torch.Tensor, segments: Sequence[Segment], step: int, epoch: int, select_all: bool) -> str:
        """``"flat"`` or ``"hierarchical"`` for this bucket: forced, or by cost (same inputs on every rank)."""
        if self.transport != "auto":
            return self.transport
        small = self.options.min_compress_numel
        numel = sum(s.numel for s in segments)
        n_dense = sum(s.numel for s in segments if s.numel < small)
        if numel == 0:
            return "flat"
        ratio = 1.0 if select_all else self.compressor.ratio(step, epoch)
        density = ASSUMED_DENSITY if ratio is None else ratio
        predicted = cost.transport_times(numel, density, self.topology, kernel=self.kernel, n_dense=n_dense,
                                         element_bytes=flat.element_size(),
                                         value_dtype=self.options.value_dtype or flat.dtype,
                                         candidates=("sparse", "hierarchical"))
        if "hierarchical" in predicted and not self._on_shared(flat):  # node allreduces: once more each
            nbytes, t = numel * flat.element_size(), self.topology
            predicted["hierarchical"] += (cost.collective_time("reduce_scatter", nbytes, t.local, t.intra)
                                          + cost.collective_time("allgather", nbytes / t.local, t.local, t.intra))
        best = min(predicted, key=lambda k: (predicted[k], cost.TRANSPORTS.index(k)))
        picked = cost.Choice(best, predicted)
        self.choices[flat.numel()] = picked
        return "hierarchical" if picked.transport == "hierarchical" else "flat"

    # ------------------------------------------------------------------ reduce
    def reduce(self, flat: torch.Tensor, segments: Sequence[Segment] | None, step: int, epoch: int = 0, *,
               select_all: bool = False, on_stats: Callable[[BucketStats], None] | None = None,
               loss_scale: float | None = None) -> torch.futures.Future:
        """Reduce ``flat`` in place across every rank (see the module docstring); a Future of ``flat``.

        A dense tensor that is not contiguous (a ``channels_last`` gradient) goes through a contiguous copy,
        as in :meth:`SparseReducer.reduce <gradsparse.reducer.SparseReducer.reduce>`."""
        check_gradient(flat)
        if through_copy(flat):
            return copied_back(flat, self.reduce(flat.contiguous(), segments, step, epoch, select_all=select_all,
                                                 on_stats=on_stats, loss_scale=loss_scale))
        check_bucket(flat)
        step, epoch = integer(step, "step", minimum=0), integer(epoch, "epoch", minimum=0)
        if flat.numel() == 0:  # nothing to reduce, as in SparseReducer.reduce
            return completed_future(flat)
        flat = flat.view(-1)
        segments = [Segment("bucket", 0, flat.numel())] if segments is None else list(segments)
        if loss_scale is not None:
            self.set_loss_scale(loss_scale)
        path = self.choose(flat, segments, step, epoch, select_all)
        layout = self._layout(segments, flat.device) if path == "hierarchical" or any(
            self.paths.get(s.key, path) != path for s in segments) else None
        self._move(segments, layout, path, flat, step)
        if path == "flat":
            return self.flat.reduce(flat, segments, step, epoch, select_all=select_all, on_stats=on_stats)
        return self._hierarchical(flat, layout, step, epoch, select_all, on_stats)

    def _layout(self, segments: Sequence[Segment], device: torch.device) -> _Layout:
        key = (tuple(segments), str(device))
        layout = self._layouts.get(key)
        if layout is None:
            layout = dataclasses.replace(plan_layout(segments, self.groups.local, self.groups.local_rank,
                                                     self.options.min_compress_numel), ident=len(self._layouts))
            self._layouts[key] = layout
        return layout

    def _on_shared(self, flat: torch.Tensor) -> bool:
        """Whether this bucket moves inside the node through shared memory (CPU buckets, where attached)."""
        return self.shared is not None and flat.device.type == "cpu"

    def _hierarchical(self, flat: torch.Tensor, layout: _Layout, step: int, epoch: int, select_all: bool,
                      on_stats) -> torch.futures.Future:
        """Node reduction, this rank's pieces through the inner reducer, node gather of the pieces.

        Through shared memory (CPU buckets, :attr:`shared`): every rank writes the pieces the others
        own, then sums its own pieces into its region of this layout (the shard, reduced there in
        place); after the exchange it copies every other rank's pieces from their regions
        (:meth:`_shared_reduce`, :meth:`_shared_land`). Otherwise both steps are the node's allreduces (every
        rank gets the node's average; then the zero-padded pieces are summed, exactly): gloo's
        reduce-scatter and allgather took about 10x its allreduce of the same 100 MB here
        (docs/design.md, 27).
        """
        g, L = self.groups, self.groups.local
        shared = self._on_shared(flat)
        if shared:
            shard = self._shared_reduce(flat, layout, step)
            intra = (flat.numel() - layout.mine) * flat.element_size()  # written for the others to read
        else:
            if self.options.op == "average" and L > 1:
                flat.mul_(1.0 / L)
            if L > 1:
                self._node_sum(flat, "node", flat, step)
            shard = flat.new_zeros(max(1, layout.mine))
            for src, dst, n in layout.runs:
                shard[dst:dst + n].copy_(flat[src:src + n])
            intra = 2 * (2 * (L - 1) * flat.numel() * flat.element_size() // L)

        def report(s: BucketStats) -> None:
            if on_stats is not None:
                on_stats(dataclasses.replace(s, numel=layout.mine, intra_bytes=intra,
                                             transport=HIERARCHICAL_ALLREDUCE if s.transport == ALLREDUCE
                                             else HIERARCHICAL))

        landed = functools.partial(self._publish, layout) if shared and self.sparse_gather else None
        if shared:
            self._publish(layout, None)  # until the exchange lands as pairs: take the whole pieces
        try:  # blocking communicators (MPI) raise here, the others through the future
            inner = self.inner.reduce(shard, layout.segments, step, epoch, select_all=select_all, on_stats=report,
                                      on_landed=landed)
        except CommunicationError as err:
            raise self.failed_at("between", err, flat, step) from err
        issued: torch.futures.Future = torch.futures.Future()
        out: torch.futures.Future = torch.futures.Future()
        gather_tag = f"{self._tag}.node_gather"
        if shared:
            self._landed[layout.ident] = out

        def gather(done: torch.futures.Future) -> None:
            try:
                try:
                    inner.wait()  # raises what the inner reduction raised
                except CommunicationError as err:
                    raise self.failed_at("between", err, flat, step) from err
                if shared:
                    try:
                        barrier = self.collective(self.shared[1].barrier, flat, step)
                    except CommunicationError as err:
                        raise self.failed_at("inside", err, flat, step) from err
                    barrier.add_done_callback(lambda b: self._shared_land(b, flat, shard, layout, step, out, issued))
                    return  # the next bucket's gather waits for this one's to have read its peers' pieces
                flat.zero_()
                for src, dst, n in layout.runs:
                    flat[src:src + n].copy_(shard[dst:dst + n])
                work = None
                if L > 1:
                    try:
                        with g.node_gather.tagged(gather_tag):
                            work = self.collective(lambda: g.node_gather.allreduce_sum(flat), flat, step)
                        self.collective(lambda: g.node_gather.complete(gather_tag), flat, step)
                    except CommunicationError as err:
                        raise self.failed_at("inside", err, flat, step) from err
            except BaseException as err:  # noqa: BLE001 - handed to the caller's future
                if not issued.done():
                    issued.set_result(None)
                out.set_exception(err)
                return
            issued.set_result(None)  # the next bucket may now issue its node allreduce

            def land(done_work: torch.futures.Future | None) -> None:
                try:
                    if done_work is not None:
                        self.collective(done_work.wait, flat, step)
                    out.set_result(flat)
                except CommunicationError as err:
                    out.set_exception(self.failed_at("inside", err, flat, step))
                except BaseException as err:  # noqa: BLE001
                    out.set_exception(err)

            if work is None:
                land(None)
            else:
                work.add_done_callback(land)

        if g.ordered:  # the node_gather group sees the buckets in the order they were reduced
            torch.futures.collect_all([inner, self._chain]).add_done_callback(gather)
            self._chain = issued
        else:  # matched by name (Horovod): the gather runs in complete(tag), on every rank of the node alike (a
            # column that skipped a non-finite step is done at once, another only once complete() drives it)
            self._gathers[self._tag] = lambda: gather(inner)
        return out

    # ------------------------------------------------------------------ inside the node, shared memory
    def _shared_reduce(self, flat: torch.Tensor, layout: _Layout, step: int) -> torch.Tensor:
        """This rank's pieces of the node's sum of the terms times ``1 / L`` (``op="average"``; as the
        collectives' path scales before its allreduce), in its shared region of this layout; blocks
        until every rank of the node has written the pieces the others own.

        Every piece is summed by its owner alone, so the node's ranks get the same bits after the
        gather. The region is rewritten only once the last gather of this layout has landed here
        and (the barrier) on every rank of the node.
        """
        memory, regions = self.shared
        me, L, dtype, size = self.groups.local_rank, self.groups.local, flat.dtype, flat.element_size()
        scale = 1.0 / L if self.options.op == "average" else 1.0
        landed = self._landed.pop(layout.ident, None)
        if landed is not None:  # its failure, if any, was its own future's
            with contextlib.suppress(Exception):
                landed.wait()
        for ident, last in list(self._used.items()):  # layouts no bucket used last step (DDP's first iteration)
            if ident != layout.ident and step >= last + 2:
                regions.drop(ident)
                regions.drop(_list_ident(ident))
                del self._used[ident]
        self._used[layout.ident] = step
        copy = memory.start(flat.numel() * size).view(dtype)
        for owner, src, _, n in layout.owners:  # what the others sum: their pieces of this rank's bucket, scaled
            if owner != me:
                torch.mul(flat[src:src + n], scale, out=copy[src:src + n])
        shard = regions.region(layout.ident, max(1, layout.mine) * size).view(dtype)
        try:
            self.collective(lambda: memory.barrier().wait(), flat, step)
            others = [c.view(dtype) for r, c in enumerate(memory.peers()) if r != me]
        except CommunicationError as err:
            raise self.failed_at("inside", err, flat, step) from err
        if layout.mine == 0:
            shard.zero_()
        for src, dst, n in layout.runs:  # the others' terms (in rank order), then this rank's, scaled on the way
            piece = shard[dst:dst + n]
            if len(others) == 1:
                torch.add(others[0][src:src + n], flat[src:src + n], alpha=scale, out=piece)
                continue
            torch.add(others[0][src:src + n], others[1][src:src + n], out=piece)
            for term in others[2:]:
                piece.add_(term[src:src + n])
            piece.add_(flat[src:src + n], alpha=scale)
        return shard

    def _list_region(self, layout: _Layout, rank: int | None = None) -> torch.Tensor:
        """The int32 list a rank publishes beside its shard: ``[count low, count high, position...]``; count -1:
        take the whole pieces. Room for a sixteenth of the shard's elements (denser results are copied whole)."""
        shard = layout.shards[self.groups.local_rank if rank is None else rank]
        return self.shared[1].region(_list_ident(layout.ident), 4 * (2 + max(1, shard) // 16), rank=rank) \
            .view(torch.int32)

    def _publish(self, layout: _Layout, positions: Sequence[torch.Tensor] | None) -> None:
        """Say which positions of this rank's shard the others take after the exchange: ``positions`` (shard
        coordinates; the shard is zero elsewhere), or None: all of them. Written before the gather's barrier,
        after the reduction's (by then every rank has read the last list of this layout)."""
        listed = self._list_region(layout)
        count = sum(p.numel() for p in positions) if positions is not None else -1
        if count > listed.numel() - 2:
            count = -1
        if count >= 0:
            at = 2
            for p in positions:
                listed[at:at + p.numel()].copy_(p)
                at += p.numel()
        listed[:2].view(torch.int64).fill_(count)

    def _place(self, layout: _Layout, owner: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where ``owner``'s shard runs start in its shard, and what moves each to the bucket (int64 each)."""
        key = (layout.ident, owner)
        place = self._places.get(key)
        if place is None:
            runs = [(at, src - at) for o, src, at, _ in layout.owners if o == owner]
            place = (torch.tensor([a for a, _ in runs], dtype=torch.int64),
                     torch.tensor([d for _, d in runs], dtype=torch.int64))
            self._places[key] = place
        return place

    def _shared_land(self, barrier: torch.futures.Future, flat: torch.Tensor, shard: torch.Tensor, layout: _Layout,
                     step: int, out: torch.futures.Future, issued: torch.futures.Future | None) -> None:
        """After the gather's barrier: every rank's reduced pieces from its region into ``flat`` (the rest of
        ``flat`` zero), then ``out``. A rank that published positions (:meth:`_publish`) gives only those."""
        try:
            try:
                self.collective(barrier.wait, flat, step)
                size, regions = flat.element_size(), self.shared[1]
                sources = [shard if r == self.groups.local_rank else
                           regions.region(layout.ident, max(1, n) * size, rank=r).view(flat.dtype)
                           for r, n in enumerate(layout.shards)]
                lists = [self._list_region(layout, rank=r) for r in range(self.groups.local)]
            except CommunicationError as err:
                raise self.failed_at("inside", err, flat, step) from err
            counts = [int(listed[:2].view(torch.int64)) for listed in lists]
            end = 0
            for owner, src, at, n in layout.owners:
                if src > end:
                    flat[end:src].zero_()
                if counts[owner] < 0:
                    flat[src:src + n].copy_(sources[owner][at:at + n])
                else:
                    flat[src:src + n].zero_()
                end = src + n
            flat[end:].zero_()
            for owner, count in enumerate(counts):
                if count > 0:
                    positions = lists[owner][2:2 + count].long()
                    starts, shifts = self._place(layout, owner)
                    moved = positions + shifts[torch.searchsorted(starts, positions, right=True) - 1]
                    flat[moved] = sources[owner].index_select(0, positions)  # a position twice: the same value
            out.set_result(flat)
        except BaseException as err:  # noqa: BLE001 - handed to the caller's future
            out.set_exception(err)
        finally:
            if issued is not None:
                issued.set_result(None)

    def node_round(self, n: int) -> None:
        """One bucket of ``n`` elements through the node's shared memory, both ways (what :func:`measure` and
        ``gradsparse.advise`` time); collective over the node, needs :attr:`shared`. The bucket is kept
        between calls of one size, as DDP keeps its buckets: allocating it is not part of the round."""
        if self._round_bucket.numel() != n:
            self._round_bucket = torch.ones(n)
        flat = self._round_bucket
        layout = self._layout([Segment("gradsparse.measure", 0, n)], flat.device)
        shard = self._shared_reduce(flat, layout, 0)
        self._publish(layout, None)
        out: torch.futures.Future = torch.futures.Future()
        self._shared_land(self.shared[1].barrier(), flat, shard, layout, 0, out, None)
        out.wait()

    # ------------------------------------------------------------------ memory between paths
    def _names(self, whole: bool) -> tuple[str, ...]:
        kind = self.flat.memory.kind
        if kind == "residual":
            return () if whole else ("residual",)
        if kind == "dgc":
            return ("momentum",) if whole else ("momentum", "velocity")
        return ()

    def _move(self, segments: Sequence[Segment], layout: _Layout | None, path: str, flat: torch.Tensor,
              step: int) -> None:
        """Move the memory of this bucket's parameters that live on the other path (see the module docstring).

        A compressed parameter's state is each rank's share of what is pending: flat ->
        hierarchical the node's ranks' states are averaged (summed for ``op="sum"``) and
        split into pieces; hierarchical -> flat the pieces are assembled and every rank of
        the node gets the node's state (divided by ``L`` for ``op="sum"``). The total still
        to be sent, over all ranks and scaled as the reduction scales it, is unchanged. A
        parameter sent whole keeps a momentum that is the same on every rank: copied.
        """
        L, average = self.groups.local, self.options.op == "average"
        small = self.options.min_compress_numel
        for s in segments:
            was = self.paths.get(s.key)
            self.paths[s.key] = path
            if was is None or was == path:
                continue
            whole = s.numel < small
            pieces = [p for p in layout.pieces if p.param == s.key]
            for name in self._names(whole):
                full = torch.zeros(s.numel, dtype=torch.float32, device=flat.device)
                if was == "flat":
                    buf = self.flat.memory.state.get(s.key, {}).get(name)
                    if buf is not None:
                        full.copy_(buf)
                    if not whole and L > 1:
                        self._node_sum(full, f"move.{s.key}.{name}", flat, step)
                        if average:
                            full.mul_(1.0 / L)
                    for p in pieces:
                        if p.owner == self.groups.local_rank:
                            _put(self.inner.memory, p.key, name, full[p.start:p.start + p.numel].clone())
                else:
                    for p in pieces:
                        buf = self.inner.memory.state.get(p.key, {}).get(name)
                        if buf is not None and p.owner == self.groups.local_rank:
                            full[p.start:p.start + p.numel] = buf
                    if L > 1:
                        self._node_sum(full, f"move.{s.key}.{name}", flat, step)
                    if not whole and not average:
                        full.mul_(1.0 / L)
                    _put(self.flat.memory, s.key, name, full)
            source = self.flat.memory if was == "flat" else self.inner.memory
            for key in [s.key] if was == "flat" else [p.key for p in pieces]:
                source.state.pop(key, None)
            logger.debug("gradsparse: memory of %s moved from the %s path to the %s path", s.key, was, path)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The flat path's state under the usual keys; the per-piece state under ``"hierarchical"``."""
        return {**self.flat.state_dict(),
                "hierarchical": {"nodes": self.groups.nodes, "local_size": self.groups.local,
                                 "memory": self.inner.memory.state_dict(), "paths": dict(self.paths)}}

    def load_state_dict(self, state_dict: dict) -> None:
        hier = state_dict.get("hierarchical")
        if hier is None:  # a flat checkpoint: its parameters' memory lives on the flat path
            hier = {"nodes": self.groups.nodes, "local_size": self.groups.local, "paths":
                    {k: "flat" for k in state_dict["memory"]["state"]}, "memory": None}
        if (hier["nodes"], hier["local_size"]) != (self.groups.nodes, self.groups.local):
            raise StateMismatchError(f"checkpoint was written by {hier['nodes']} nodes x {hier['local_size']} ranks, "
                                     f"this job has {self.groups.nodes} x {self.groups.local}: per-piece residuals "
                                     "cannot be redistributed")
        self.flat.load_state_dict(state_dict)
        self.inner.load_state_dict({**state_dict, "memory": hier["memory"] or self.inner.memory.state_dict()})
        self.paths = dict(hier["paths"])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["groups"] = None  # process groups belong to this process
        state["_chain"] = None
        state["_gathers"] = {}
        state["shared"] = None  # mappings belong to this process
        state["_landed"] = {}
        state["_used"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._chain = completed_future(None)


def _list_ident(ident: int) -> int:
    """The shared-memory region of a layout's published positions (beside region ``ident``, its shard)."""
    return -1 - ident


def _put(memory, key: str, name: str, tensor: torch.Tensor) -> None:
    memory.state.setdefault(key, {})[name] = tensor  # the bucket's arena sees a new tensor and takes it in


def create(compressor: Compressor, hierarchy, options: ReducerOptions | None = None, *,
           groups: Callable[[int | str], Groups] | None = None, **knobs) -> HierarchicalReducer:
    """A :class:`HierarchicalReducer` for ``hierarchy`` (see :class:`Hierarchy`) over the groups
    ``groups(local_size)`` builds (default :meth:`Groups.create`: torch.distributed's default group)."""
    h = Hierarchy.of(hierarchy)
    groups = (groups or Groups.create)(h.local_size)
    return HierarchicalReducer(compressor, groups, options, transport=h.transport, topology=h.topology,
                               kernel=h.kernel, shared_memory=h.shared_memory, **knobs)


__all__ = ["Groups", "HierarchicalReducer", "Hierarchy", "agree_local_size", "create", "local_size_of", "measure",
           "plan_layout", "split_parameter"]
