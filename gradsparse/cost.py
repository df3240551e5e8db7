"""How long moving one bucket takes, each way: an alpha-beta link model, the cost of each transport, the choice.

A link (one level: inside a node, or between nodes) costs ``latency_s`` per message
and ``1 / bytes_per_s`` per byte through its busiest hop (:class:`LinkModel`). A
collective over ``p`` ranks is a number of latency rounds and a number of bytes on
that hop (:func:`collective_terms`; ring algorithms as gloo runs them, or
tree / halving-doubling latency as NCCL and MPI use at scale):

==================  ======================  =====================================
collective          latency rounds (ring)   bytes through the busiest hop
==================  ======================  =====================================
allreduce of B      ``2 (p - 1)``           ``2 (p - 1) / p * B``
reduce-scatter B    ``p - 1``               ``(p - 1) / p * B``
allgather of m      ``p - 1``               ``(p - 1) * m`` (every rank gets ``p - 1`` payloads)
alltoall of B       ``p - 1``               ``(p - 1) / p * B`` (B: one rank's pieces for all)
==================  ======================  =====================================

With ``algorithm="tree"`` the rounds are ``2 ceil(log2 p)`` (allreduce) and ``ceil(log2 p)``
(reduce-scatter, allgather; an alltoall stays a pairwise exchange); the bytes are the same
(recursive halving-doubling moves the same volume).
A flat collective over ranks spread over several nodes runs at the pace of the slowest
hop, the link between nodes; ``share`` flows that cross one link at the same time
(the ranks of a node in the hierarchical exchange) divide its bandwidth.

One bucket of ``n`` elements can go three ways (:func:`transport_times`):

- ``dense``: ring allreduce of ``n * element_bytes`` over all ``p`` ranks.
- ``sparse``: compress ``n`` elements, allgather one payload of ``ceil(density * n)``
  (index, value) pairs (:class:`~gradsparse.payload.PayloadLayout` bytes) from every rank,
  scatter-add the ``p`` payloads.
- ``hierarchical`` (``local`` ranks per node on a fast ``intra`` link, ``nodes`` nodes):
  reduce-scatter densely inside the node, compress the ``n / local`` shard, allgather
  the shards' payloads between the ranks of the same local index on every node (the
  ``local`` exchanges share the node's link), scatter-add ``nodes`` payloads, allgather
  the shard densely inside the node.

:func:`choose` returns the cheapest with every prediction. It is plain float
arithmetic on its arguments: the same inputs give the same choice on every rank.
:meth:`LinkModel.fit` fits latency and bandwidth to observed collectives (least
squares on relative error, after a median-of-pairwise-solutions start that discards
outliers); :class:`LinkEstimator` does it online over a window of the timings a hook
already takes. No ``torch.distributed`` here.

Example::

    >>> from gradsparse.cost import LinkModel, Topology, choose
    >>> gbit = LinkModel(latency_s=50e-6, bytes_per_s=1e9 / 8)
    >>> round(1e3 * gbit.seconds(1_000_000), 3)          # one 1 MB message
    8.05
    >>> c = choose(25_000_000, 0.001, Topology(nodes=2, inter=gbit), compress_s=0.010)
    >>> c.transport, round(c.predicted["dense"], 3), round(c.predicted["sparse"], 4)
    ('sparse', 0.8, 0.0117)
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence

import torch

from ._validate import choice, integer, real
from .errors import InvalidConfigError
from .payload import PayloadLayout

TRANSPORTS = ("dense", "sparse", "hierarchical")   # also the order that breaks ties
ALGORITHMS = ("ring", "tree")
COLLECTIVES = ("allreduce", "reduce_scatter", "allgather", "alltoall", "p2p")


# ------------------------------------------------------------------------------------------------ the link
@dataclasses.dataclass(frozen=True)
class LinkModel:
    """One link level: ``seconds = messages * latency_s + bytes / bytes_per_s``.

    Example::

        >>> LinkModel(1e-4, 1e8).seconds(2e6, messages=2)
        0.0202
        >>> round(LinkModel(1e-4, 1.25e8).gbit_per_s, 3)
        1.0
    """

    latency_s: float
    bytes_per_s: float

    def __post_init__(self):
        real(self.latency_s, "latency_s", low=0)
        real(self.bytes_per_s, "bytes_per_s", low=0, low_open=True)

    @property
    def gbit_per_s(self) -> float:
        return 8 * self.bytes_per_s / 1e9

    def seconds(self, nbytes: float, messages: float = 1.0) -> float:
        """Time for ``messages`` latency rounds and ``nbytes`` through the link."""
        return messages * self.latency_s + nbytes / self.bytes_per_s

    def as_dict(self) -> dict:
        return {"latency_s": self.latency_s, "bytes_per_s": self.bytes_per_s, "gbit_per_s": self.gbit_per_s}

    @classmethod
    def fit(cls, observations: Iterable, *, robust: bool = True) -> LinkModel:
        """Latency and bandwidth that best explain observed transfers.

        ``observations``: :class:`Observation` objects (use :meth:`Observation.collective`
        for allreduce / allgather timings) or plain ``(bytes, seconds)`` pairs of single
        messages. Minimises the squared *relative* error (small and large messages count
        alike). With ``robust`` (default) it starts from the median of the exact
        solutions of every pair of observations, drops those more than 3 robust standard
        deviations (1.4826 x the median absolute relative residual) off that line, and
        fits the rest by least squares: stragglers and hiccups do not move the result.
        The latency is clipped at 0.

        Raises :class:`~gradsparse.errors.InvalidConfigError` if latency and bandwidth
        cannot be told apart (fewer than two different sizes) or the times do not grow
        with the bytes (measure larger sizes).

        Example::

            >>> pairs = [(1e3, 0.001001), (1e6, 0.002), (1e7, 0.011), (1e7, 0.5)]   # the last one: a hiccup
            >>> m = LinkModel.fit(pairs)
            >>> round(m.latency_s * 1e3, 3), round(m.bytes_per_s / 1e9, 3)
            (1.0, 1.0)
        """
        obs = [Observation.of(o) for o in observations]
        if len(obs) < 2:
            raise InvalidConfigError(f"fitting a link needs at least 2 observations, got {len(obs)}; time a few "
                                     "collectives of different sizes")
        if robust and len(obs) >= 3:
            start = _median_of_pairs(obs)
            if start is not None:
                rel = [(o.seconds - o.messages * start[0] - o.link_bytes * start[1]) / o.seconds for o in obs]
                spread = 1.4826 * statistics.median(abs(r) for r in rel)
                limit = max(3.0 * spread, 1e-9)
                kept = [o for o, r in zip(obs, rel) if abs(r) <= limit]
                if _identifiable(kept):
                    obs = kept
        latency, per_byte = _least_squares(obs)
        return cls(latency, 1.0 / per_byte)


@dataclasses.dataclass(frozen=True)
class Observation:
    """One timed transfer as the link sees it: latency rounds, bytes on the busiest hop, seconds.

    Example::

        >>> Observation.collective("allreduce", 4e6, world=4, seconds=0.05)
        Observation(messages=6.0, link_bytes=6000000.0, seconds=0.05)
    """

    messages: float
    link_bytes: float
    seconds: float

    def __post_init__(self):
        real(self.messages, "messages", low=0)
        real(self.link_bytes, "link_bytes", low=0)
        real(self.seconds, "seconds", low=0, low_open=True)

    @classmethod
    def of(cls, value) -> Observation:
        """An :class:`Observation`, or a ``(bytes, seconds)`` pair read as one message."""
        if isinstance(value, Observation):
            return value
        try:
            nbytes, seconds = value
        except (TypeError, ValueError):
            raise InvalidConfigError(f"an observation is an Observation or a (bytes, seconds) pair, got {value!r}")
        return cls(1.0, float(nbytes), float(seconds))

    @classmethod
    def collective(cls, kind: str, nbytes: float, world: int, seconds: float, *, algorithm: str = "ring",
                   share: int = 1) -> Observation:
        """A timed collective (see :func:`collective_terms` for what ``nbytes`` means per kind)."""
        messages, link_bytes = collective_terms(kind, nbytes, world, algorithm=algorithm, share=share)
        return cls(messages, link_bytes, seconds)


def _identifiable(obs: Sequence[Observation]) -> bool:
    return any(_solve_pair(a, b) is not None for i, a in enumerate(obs) for b in obs[i + 1:])


def _solve_pair(a: Observation, b: Observation) -> tuple[float, float] | None:
    """The (latency, seconds per byte) through both points exactly, or None if they do not fix it."""
    det = a.messages * b.link_bytes - b.messages * a.link_bytes
    scale = max(abs(a.messages * b.link_bytes), abs(b.messages * a.link_bytes), 1e-300)
    if abs(det) <= 1e-9 * scale:
        return None
    latency = (a.seconds * b.link_bytes - b.seconds * a.link_bytes) / det
    per_byte = (a.messages * b.seconds - b.messages * a.seconds) / det
    return latency, per_byte


def _median_of_pairs(obs: Sequence[Observation]) -> tuple[float, float] | None:
    solutions = [s for i, a in enumerate(obs) for b in obs[i + 1:] if (s := _solve_pair(a, b)) is not None]
    if not solutions:
        return None
    return statistics.median(s[0] for s in solutions), statistics.median(s[1] for s in solutions)


def _least_squares(obs: Sequence[Observation]) -> tuple[float, float]:
    """Minimise sum(((t - a m - b x) / t)^2) over a >= 0, b > 0."""
    if not _identifiable(obs):
        raise InvalidConfigError("cannot tell latency from bandwidth: every observation has the same size; time "
                                 "collectives of at least two different sizes (e.g. 64 kB and 16 MB)")
    w = [1.0 / (o.seconds * o.seconds) for o in obs]
    smm = sum(wi * o.messages * o.messages for wi, o in zip(w, obs))
    smx = sum(wi * o.messages * o.link_bytes for wi, o in zip(w, obs))
    sxx = sum(wi * o.link_bytes * o.link_bytes for wi, o in zip(w, obs))
    smt = sum(wi * o.messages * o.seconds for wi, o in zip(w, obs))
    sxt = sum(wi * o.link_bytes * o.seconds for wi, o in zip(w, obs))
    det = smm * sxx - smx * smx
    latency, per_byte = ((smt * sxx - sxt * smx) / det, (smm * sxt - smx * smt) / det) if det > 0 else (-1.0, 0.0)
    if latency < 0:  # no measurable latency: bandwidth only
        latency, per_byte = 0.0, (sxt / sxx if sxx > 0 else 0.0)
    if not per_byte > 0 or not math.isfinite(per_byte):
        raise InvalidConfigError("the observed times do not grow with the bytes moved, so no bandwidth can be "
                                 "fitted; time larger transfers (several MB) or check that the collectives ran")
    return latency, per_byte


class LinkEstimator:
    """A :class:`LinkModel` refitted from the last ``window`` observations (online).

    Until two different sizes have been seen, :attr:`model` is ``prior`` (may be None).
    Feed every rank the same observations (e.g. the slowest rank's time of each
    collective) and every rank fits the same model.

    Example::

        >>> est = LinkEstimator(window=8)
        >>> est.model is None
        True
        >>> for nbytes in (1e4, 1e6, 1e7):
        ...     est.observe("allreduce", nbytes, world=2, seconds=2e-4 + nbytes / 1e9)
        >>> round(est.model.latency_s, 6), round(est.model.bytes_per_s / 1e9, 3)
        (0.0001, 1.0)
    """

    def __init__(self, window: int = 64, prior: LinkModel | None = None, *, algorithm: str = "ring"):
        self.window = integer(window, "window", minimum=2)
        self.algorithm = choice(algorithm, "algorithm", ALGORITHMS)
        self.prior = prior
        self._obs: deque[Observation] = deque(maxlen=self.window)
        self._model: LinkModel | None = None
        self._stale = False

    def __len__(self) -> int:
        return len(self._obs)

    def add(self, observation) -> None:
        self._obs.append(Observation.of(observation))
        self._stale = True

    def observe(self, kind: str, nbytes: float, world: int, seconds: float, *, share: int = 1) -> None:
        """Record one timed collective (skipped at world 1, where nothing moved)."""
        if world > 1:
            self.add(Observation.collective(kind, nbytes, world, seconds, algorithm=self.algorithm, share=share))

    @property
    def model(self) -> LinkModel | None:
        if self._stale:
            self._stale = False
            if _identifiable(list(self._obs)):
                try:
                    self._model = LinkModel.fit(self._obs)
                except InvalidConfigError:
                    self._model = None
        return self._model if self._model is not None else self.prior

    def state_dict(self) -> dict:
        return {"window": self.window, "observations": [dataclasses.astuple(o) for o in self._obs]}

    def load_state_dict(self, state: Mapping) -> None:
        self._obs = deque((Observation(*o) for o in state["observations"]), maxlen=self.window)
        self._model, self._stale = None, True


# ------------------------------------------------------------------------------------------ the collectives
def collective_terms(kind: str, nbytes: float, world: int, *, algorithm: str = "ring",
                     share: int = 1) -> tuple[float, float]:
    """(latency rounds, bytes through the busiest hop) of one collective over ``world`` ranks.

    ``nbytes``: the whole buffer for ``allreduce`` and ``reduce_scatter``; one rank's
    contribution for ``allgather``; one rank's pieces for every rank for ``alltoall``; the
    message for ``p2p``. ``share`` flows cross the busiest hop at once (they divide its bandwidth).

    Example::

        >>> collective_terms("allreduce", 100, 4)
        (6.0, 150.0)
        >>> collective_terms("allgather", 10, 8, algorithm="tree")
        (3.0, 70.0)
        >>> collective_terms("alltoall", 100, 4)
        (3.0, 75.0)
    """
    kind = choice(kind, "kind", COLLECTIVES)
    algorithm = choice(algorithm, "algorithm", ALGORITHMS)
    p = integer(world, "world", minimum=1)
    share = integer(share, "share", minimum=1)
    nbytes = real(nbytes, "nbytes", low=0)
    if kind == "p2p":
        return 1.0, float(nbytes * share)
    if p == 1:
        return 0.0, 0.0
    log_rounds = float(math.ceil(math.log2(p)))
    if kind == "allreduce":
        rounds, moved = (2.0 * (p - 1) if algorithm == "ring" else 2 * log_rounds), 2.0 * (p - 1) / p * nbytes
    elif kind == "reduce_scatter":
        rounds, moved = (float(p - 1) if algorithm == "ring" else log_rounds), (p - 1) / p * nbytes
    elif kind == "alltoall":  # pairwise exchange, whichever algorithm: p - 1 messages of B / p each
        rounds, moved = float(p - 1), (p - 1) / p * nbytes
    else:
        rounds, moved = (float(p - 1) if algorithm == "ring" else log_rounds), float((p - 1) * nbytes)
    return rounds, moved * share


def collective_time(kind: str, nbytes: float, world: int, link: LinkModel, *, algorithm: str = "ring",
                    share: int = 1) -> float:
    """Seconds of one collective on ``link`` (see :func:`collective_terms`).

    Example::

        >>> round(collective_time("allreduce", 1e8, 2, LinkModel(5e-5, 1.25e8)), 4)   # 100 MB, 2 ranks, 1 Gbit/s
        0.8001
    """
    rounds, moved = collective_terms(kind, nbytes, world, algorithm=algorithm, share=share)
    if rounds == 0 and moved == 0:
        return 0.0                     # world 1: nothing moves (no link needed)
    return link.seconds(moved, rounds)


def payload_bytes(numel: int, density: float, *, value_dtype: torch.dtype = torch.float32, n_dense: int = 0) -> int:
    """Bytes of one rank's payload for ``ceil(density * numel)`` pairs (plus ``n_dense`` whole values).

    Example::

        >>> payload_bytes(25_000_000, 0.001)        # 25,000 int32 indices + fp32 values + the 32-byte header
        200032
    """
    count = min(int(numel), math.ceil(real(density, "density", low=0, high=1) * integer(numel, "numel", minimum=0)))
    return PayloadLayout(count, integer(n_dense, "n_dense", minimum=0), value_dtype).nbytes


# ------------------------------------------------------------------------------------- kernels and topology
@dataclasses.dataclass(frozen=True)
class KernelCost:
    """Local work per bucket: compression per gradient element, unpack-add per received pair, a fixed part.

    Measure it (``python -m gradsparse.advise`` does) or pass the seconds to :func:`choose`.

    Example::

        >>> k = KernelCost(per_element_s=1e-9, per_pair_s=4e-9)
        >>> round(k.compress(25_000_000) * 1e3, 1), round(k.unpack(100_000) * 1e3, 1)
        (25.0, 0.4)
    """

    per_element_s: float = 0.0
    per_pair_s: float = 0.0
    fixed_s: float = 0.0

    def __post_init__(self):
        for name in ("per_element_s", "per_pair_s", "fixed_s"):
            real(getattr(self, name), name, low=0)

    @classmethod
    def fit(cls, samples: Iterable[tuple[float, float]], *, per_pair_s: float = 0.0) -> KernelCost:
        """``fixed_s`` and ``per_element_s`` from ``(numel, seconds)`` timings of the compression.

        Robust as :meth:`LinkModel.fit` (the fixed part plays the latency). With one size
        only, no fixed part: ``per_element_s`` is the median of ``seconds / numel``.

        Example::

            >>> k = KernelCost.fit([(1e6, 0.0011), (4e6, 0.0041), (2.5e7, 0.0251), (1e6, 0.02)])
            >>> round(k.fixed_s * 1e3, 3), round(k.per_element_s * 1e9, 3)
            (0.1, 1.0)
        """
        obs = [Observation(1.0, float(n), float(t)) for n, t in samples]
        if not obs:
            raise InvalidConfigError("fitting a kernel cost needs at least one (numel, seconds) timing")
        if not _identifiable(obs):
            return cls(statistics.median(o.seconds / o.link_bytes for o in obs), per_pair_s)
        link = LinkModel.fit(obs)
        return cls(1.0 / link.bytes_per_s, per_pair_s, link.latency_s)

    def compress(self, numel: float) -> float:
        return self.fixed_s + self.per_element_s * numel

    def unpack(self, pairs: float) -> float:
        return self.per_pair_s * pairs

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Topology:
    """``nodes`` nodes of ``local`` ranks; ``inter`` links the nodes (each node's link is shared by its
    ranks), ``intra`` the ranks of a node (needed when ``local > 1``).

    Example::

        >>> t = Topology(nodes=2, local=4, inter=LinkModel(5e-5, 1.25e9), intra=LinkModel(5e-6, 1.5e11))
        >>> t.world, t.flat_link is t.inter
        (8, True)
    """

    nodes: int
    inter: LinkModel | None
    local: int = 1
    intra: LinkModel | None = None

    def __post_init__(self):
        integer(self.nodes, "nodes", minimum=1)
        integer(self.local, "local", minimum=1)
        if self.nodes > 1 and self.inter is None:
            raise InvalidConfigError("a topology of several nodes needs inter= (the link between nodes)")
        if self.local > 1 and self.intra is None:
            raise InvalidConfigError("a topology with several ranks per node needs intra= (the link inside a node)")

    @property
    def world(self) -> int:
        return self.nodes * self.local

    @property
    def flat_link(self) -> LinkModel | None:
        """The link that paces a collective over every rank: between nodes if there are several."""
        return self.inter if self.nodes > 1 else self.intra


# ------------------------------------------------------------------------------------------- the transports
def dense_time(numel: int, topology: Topology, *, element_bytes: int = 4, algorithm: str = "ring") -> float:
    """A flat allreduce of the bucket over every rank.

    Example::

        >>> round(dense_time(25_000_000, Topology(2, LinkModel(5e-5, 1.25e8))), 4)
        0.8001
    """
    if topology.world == 1:
        return 0.0
    return collective_time("allreduce", numel * element_bytes, topology.world, topology.flat_link,
                           algorithm=algorithm)


def _pairs(numel: int, density: float, n_dense: int, count: int | None) -> tuple[int, int]:
    """(compressed elements, pairs per rank) of a bucket of ``numel`` with ``n_dense`` sent whole."""
    integer(n_dense, "n_dense", minimum=0, maximum=numel)
    compressed = numel - n_dense
    if count is None:
        return compressed, min(compressed, math.ceil(density * compressed))
    return compressed, integer(count, "count", minimum=0, maximum=compressed)


def sparse_time(numel: int, density: float, topology: Topology, *, kernel: KernelCost = KernelCost(),
                compress_s: float | None = None, value_dtype: torch.dtype = torch.float32, n_dense: int = 0,
                count: int | None = None, algorithm: str = "ring") -> dict:
    """Phases (seconds) of a flat sparse allgather: compress, allgather, unpack; and their ``total``.

    Of the bucket's ``numel`` elements, ``n_dense`` go whole (small tensors) and the rest
    are compressed to ``count`` pairs per rank (default ``ceil(density * (numel - n_dense))``).

    Example::

        >>> t = sparse_time(25_000_000, 0.001, Topology(4, LinkModel(5e-5, 1.25e8)), compress_s=0.01)
        >>> {k: round(v, 5) for k, v in t.items()}
        {'compress': 0.01, 'exchange': 0.00495, 'unpack': 0.0, 'total': 0.01495}
    """
    p = topology.world
    compressed, count = _pairs(numel, density, n_dense, count)
    compress = kernel.compress(compressed) if compress_s is None else float(compress_s)
    exchange = 0.0 if p == 1 else collective_time(
        "allgather", PayloadLayout(count, n_dense, value_dtype).nbytes, p, topology.flat_link, algorithm=algorithm)
    unpack = kernel.unpack(p * (count + n_dense))
    return {"compress": compress, "exchange": exchange, "unpack": unpack, "total": compress + exchange + unpack}


def hierarchical_time(numel: int, density: float, topology: Topology, *, kernel: KernelCost = KernelCost(),
                      compress_s: float | None = None, element_bytes: int = 4,
                      value_dtype: torch.dtype = torch.float32, n_dense: int = 0, count: int | None = None,
                      algorithm: str = "ring") -> dict:
    """Phases (seconds) of intra-node reduce-scatter, shard compression, inter-node sparse exchange, unpack,
    intra-node allgather; and their ``total``.

    ``compress_s``, if given, is the time to compress the whole bucket; each rank
    compresses ``1 / local`` of it (and sends ``1 / local`` of the pairs and of the
    ``n_dense`` whole elements). The ``local`` exchanges share each node's link.

    Example::

        >>> topo = Topology(nodes=2, local=2, inter=LinkModel(5e-5, 1.25e8), intra=LinkModel(1e-5, 1e10))
        >>> t = hierarchical_time(25_000_000, 0.001, topo, compress_s=0.010)
        >>> [round(t[k], 5) for k in ("reduce_scatter", "compress", "exchange", "allgather", "total")]
        [0.00501, 0.005, 0.00165, 0.00501, 0.01667]
    """
    n, L = topology.nodes, topology.local
    compressed, count = _pairs(numel, density, n_dense, count)
    shard, shard_count, shard_dense = math.ceil(numel / L), math.ceil(count / L), math.ceil(n_dense / L)
    dense_bytes = numel * element_bytes
    intra = topology.intra if L > 1 else None
    rs = collective_time("reduce_scatter", dense_bytes, L, intra, algorithm=algorithm) if intra else 0.0
    compress = kernel.compress(compressed / L) if compress_s is None else float(compress_s) / L
    exchange = 0.0 if n == 1 else collective_time(
        "allgather", PayloadLayout(shard_count, shard_dense, value_dtype).nbytes, n, topology.inter,
        algorithm=algorithm, share=L)
    unpack = kernel.unpack(n * (shard_count + shard_dense))
    ag = collective_time("allgather", shard * element_bytes, L, intra, algorithm=algorithm) if intra else 0.0
    total = rs + compress + exchange + unpack + ag
    return {"reduce_scatter": rs, "compress": compress, "exchange": exchange, "unpack": unpack, "allgather": ag,
            "total": total}


def transport_times(numel: int, density: float, topology: Topology, *, kernel: KernelCost = KernelCost(),
                    compress_s: float | None = None, dense_compress_s: float = 0.0, element_bytes: int = 4,
                    value_dtype: torch.dtype = torch.float32, n_dense: int = 0, count: int | None = None,
                    algorithm: str = "ring", candidates: Sequence[str] = TRANSPORTS) -> dict[str, float]:
    """Predicted seconds of each candidate transport for one bucket (in :data:`TRANSPORTS` order).

    ``numel``: the bucket's elements; ``n_dense`` of them go whole; ``count``: pairs per
    rank (default ``ceil(density * (numel - n_dense))``; pass the reducer's exact count).

    ``hierarchical`` is left out unless there are several nodes of several ranks.
    ``dense_compress_s``: local work the dense transport still does (0 if it skips selection).
    """
    integer(numel, "numel", minimum=1)
    real(density, "density", low=0, high=1)
    for c in candidates:
        choice(c, "candidate transport", TRANSPORTS)
    out = {}
    if "dense" in candidates:
        out["dense"] = dense_compress_s + dense_time(numel, topology, element_bytes=element_bytes,
                                                     algorithm=algorithm)
    if "sparse" in candidates:
        out["sparse"] = sparse_time(numel, density, topology, kernel=kernel, compress_s=compress_s,
                                    value_dtype=value_dtype, n_dense=n_dense, count=count,
                                    algorithm=algorithm)["total"]
    if "hierarchical" in candidates and topology.nodes > 1 and topology.local > 1:
        out["hierarchical"] = hierarchical_time(numel, density, topology, kernel=kernel, compress_s=compress_s,
                                                element_bytes=element_bytes, value_dtype=value_dtype,
                                                n_dense=n_dense, count=count, algorithm=algorithm)["total"]
    return out


@dataclasses.dataclass(frozen=True)
class Choice:
    """The cheapest transport for one bucket and every prediction (seconds)."""

    transport: str
    predicted: dict[str, float]

    @property
    def seconds(self) -> float:
        return self.predicted[self.transport]

    @property
    def speedup_vs_dense(self) -> float | None:
        dense = self.predicted.get("dense")
        return dense / self.seconds if dense is not None and self.seconds > 0 else None

    def as_dict(self) -> dict:
        return {"transport": self.transport, "predicted_s": dict(self.predicted)}


def choose(numel: int, density: float, topology: Topology, **options) -> Choice:
    """The cheapest transport for one bucket of ``numel`` elements sent at ``density``.

    Options as :func:`transport_times` (``kernel`` or ``compress_s``, ``dense_compress_s``,
    ``element_bytes``, ``value_dtype``, ``n_dense``, ``count``, ``algorithm``, ``candidates``).
    Ties go to the earlier of :data:`TRANSPORTS` (dense first). Deterministic: the same
    arguments give the same choice on every rank.

    Example::

        >>> fast = Topology(nodes=2, inter=LinkModel(5e-6, 5e10))               # 400 Gbit/s
        >>> choose(25_000_000, 0.001, fast, compress_s=0.010).transport     # compressing costs more than it saves
        'dense'
    """
    predicted = transport_times(numel, density, topology, **options)
    if not predicted:
        raise InvalidConfigError("no candidate transport applies; include 'dense' or 'sparse' in candidates")
    best = min(predicted, key=lambda t: (predicted[t], TRANSPORTS.index(t)))
    return Choice(best, predicted)
