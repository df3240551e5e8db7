"""The one pipeline: compensate, select, pack, allgather, unpack-add, average.

:class:`SparseReducer` reduces one flat bucket of gradients across ranks. The
DDP hook and the other adapters only supply the bucket, its segments (which
parameter lives where, keyed by a stable name) and a communicator.

Steps for one bucket on one rank:

1. Check the bucket (floating dtype, 1 <= numel <= 2**31 - 1) and its *health*:
   finite, and no risk that compensating it overflows (see below).
2. Verify (every ``verify_every`` calls; default every call): gather every rank's
   descriptor of the bucket (configuration, layout, step, epoch, wire dtype, fixed
   payload size, health) and compare them, so a rank that disagrees raises
   :class:`StateMismatchError` on every rank instead of sending a payload of
   another size (which aborts gloo). If any rank is unhealthy, stop here: see below.
3. Compensate in place, one pass per run of adjacent compressed parameters: ``g =
   compressor.preprocess(g)``, then the memory's compensation in the bucket's
   :class:`~gradsparse.arena.Arena` (state laid out like the bucket); the pass also
   measures the state's largest magnitudes (the next step's overflow bounds). Segments
   smaller than ``min_compress_numel`` are *whole tensors*: sent as they are, no memory.
4. Select per parameter (each segment its own top-k, one call for the bucket:
   :meth:`Compressor.select_segments`) or per bucket (one top-k over all compressed
   segments), in the bucket's coordinates.
5. Variable-count methods exchange payload sizes. The *transport* is chosen: the
   sparse allgather, or, if the payload would cost more than a dense allreduce
   (``world_size * payload_bytes >= 2 * numel * element_size``), the allreduce of
   the same selection (zeros elsewhere, pre-multiplied by ``1 / world_size`` as
   DDP does): a transport choice only. ``transport="split"`` asks for a third one
   (:mod:`gradsparse.split`: each region's pairs summed by its owner, the regions
   allgathered; the allgather's bits). In *dense iterations* (``select_all``: the
   adapters' first iterations) every coordinate is selected.
6. Pack (indices, values, whole tensors) and allgather: one collective per bucket.
   Every collective is issued from this thread, in call order.
7. When the collective completes (one completion path for both transports): land
   the result (allgather: validate every rank's payload, then scatter-add them in
   rank order, each scaled by ``1 / world_size``), apply the compressor's dense
   post-processing to whole tensors, remove what was sent from the memory
   (:meth:`Arena.commit`: one update per bucket) and write the result into the
   bucket. A collective that fails in the transport (a ``RuntimeError`` or
   ``OSError`` from the backend) raises
   :class:`CommunicationError` naming the bucket, step and rank; gradsparse's own
   errors and programming errors pass through unchanged.

Loss scaling (AMP's GradScaler): pass ``loss_scale`` (the factor the gradients
carry). When it changes, the memory is rescaled by new/old before the bucket is
compensated, so residuals and momentum never mix scales (GradScaler's factors are
powers of two: the rescaling is exact). DGC's clipping norm and Threshold's tau are
compared unscaled.

Non-finite gradients and overflow: a rank is unhealthy when its bucket holds
NaN/Inf (one read pass over the bucket), or when compensating could overflow: the
arena keeps the state's largest magnitudes, measured by the previous compensation
pass (:attr:`~gradsparse.arena.Arena.bounds`), and if the memory's bound for this
gradient (:meth:`~gradsparse.memory.Memory.headroom`) reaches the range of the wire
dtype, of the bucket's dtype or of fp32, ``inf`` could enter the memory or the
wire. When the descriptors show an unhealthy rank, no rank compensates, selects or
sends anything: all of them raise :class:`NonFiniteGradientError`
(``nonfinite="raise"``) or return a NaN bucket (``nonfinite="skip"``: AMP's
GradScaler then skips the step and lowers its scale), and every rank's memory is
exactly as before the step. On calls that are not verified (``verify_every`` > 1
or 0) the bad rank flags its payload instead: the outcome is the same except that
healthy ranks keep that step's gradient in their memory.

Example::

    >>> import torch
    >>> from gradsparse import TopK
    >>> from gradsparse.comm import LocalCommunicator
    >>> from gradsparse.reducer import SparseReducer, Segment
    >>> r = SparseReducer(TopK(0.01), LocalCommunicator(), min_compress_numel=1)
    >>> grad = torch.zeros(1000); grad[[7, 500]] = torch.tensor([4.0, -3.0])
    >>> out = r.reduce(grad, [Segment("w", 0, 1000)], step=0).wait()
    >>> out.nonzero().flatten().tolist(), out[[7, 500]].tolist()
    ([7, 500], [4.0, -3.0])
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence

import torch

from . import ops, split
from ._validate import instance, integer
from .arena import Arena, Candidates
from .comm.base import Communicator, completed_future
from .compressors.base import Compressor
from .errors import (
    BucketError,
    CommunicationError,
    ConfigTypeError,
    GradSparseError,
    InvalidConfigError,
    NonFiniteGradientError,
    StateMismatchError,
    UnsupportedGradientError,
)
from .options import ReducerOptions
from .payload import (
    DTYPE_OF_CODE,
    FLAG_NONFINITE,
    INT32_MAX,
    VALUE_DTYPES,
    PayloadBuffers,
    PayloadLayout,
    indices_of,
)
from .stats import ALLGATHER, ALLREDUCE, SPLIT, BucketStats
from .transport import FIELDS as TRANSPORT_FIELDS
from .transport import TransportModel

logger = logging.getLogger(__name__)

PROTOCOL = 0x67730001  # descriptor format version; first field of every descriptor
DESCRIPTOR_FIELDS = ("protocol version", "configuration (compressor and reducer options)", "bucket layout",
                     "bucket size", "step", "epoch", "wire dtype", "dense iteration", "payload size")
# int64 each: the compared fields, then the health, then this rank's transport timings (gradsparse.transport)
DESCRIPTOR_BYTES = 8 * (len(DESCRIPTOR_FIELDS) + 1 + len(TRANSPORT_FIELDS))
HEALTH = len(DESCRIPTOR_FIELDS)  # the health's position in a descriptor
# A rank's health, the descriptor's last field: what it found before compensating.
HEALTHY, NONFINITE, OVERFLOW = 1, 0, 2
# Selection candidates (gradsparse.arena): a parameter keeps at most CANDIDATES_PER_K * k + CANDIDATES_SLACK of
# them, and collects them only while k <= its size / CANDIDATES_BELOW. 64 since the candidate pass prefetches
# (2026-12-02, a Xeon): over ResNet-50's buckets, with / without candidates, TopK 1 % 45.7-49.0 / 49.3-52.0 ms a
# step, DGC's 0.4 % stage 49.3-51.8 / 56.3-57.7, its 1.5625 % stage 61.4 / 63.7-64.7. At 256 before that (an AMD
# EPYC, no prefetch) TopK 1 % had lost (31.7 against 28.2 ms). docs/benchmarks.md; `bucket_bench` with the
# `-nocandidates` twins.
CANDIDATES_PER_K, CANDIDATES_SLACK, CANDIDATES_BELOW = 8, 256, 64


@dataclasses.dataclass(frozen=True)
class Segment:
    """One parameter's slice ``[offset, offset + numel)`` of a flat bucket."""

    key: str
    offset: int
    numel: int


@dataclasses.dataclass(frozen=True)
class _Plan:
    compressed: tuple[Segment, ...]  # segments selected from (each with its memory)
    whole: tuple[Segment, ...]       # whole tensors: sent as they are, no memory
    groups: tuple[tuple[Segment, ...], ...]  # what one selection sees (granularity)
    ranges: tuple[tuple[int, int], ...] | None  # each group's (start, numel); None: a group has gaps
    runs: tuple[tuple[int, int], ...]  # (start, end) of adjacent compressed segments, ascending
    n_whole: int                     # elements in whole tensors
    covered: int                     # elements in segments (the bucket's, unless its segments leave gaps)
    crc: int                         # of the layout, compared across ranks


@dataclasses.dataclass(frozen=True)
class _Selection:
    """A bucket's selection, in the bucket's coordinates."""

    positions: torch.Tensor      # int64, ascending
    sent: torch.Tensor | None    # fp32 values as they go on the wire; None: ``source[positions]``, exactly
    masked: torch.Tensor | None  # positions of groups not sent completely (DGC masks momentum); None: none
    source: torch.Tensor | None = None  # fp32, what ``sent`` is gathered from (unchanged until the commit)
    payload: torch.Tensor | None = None  # the healthy payload, when the selection wrote it (from the reducer's buffers)
    bits: torch.Tensor | None = None  # the positions as a bitmap, when the selection wrote one (for a deferred update)

    def values(self) -> torch.Tensor:
        """The fp32 values sent, gathered from ``source`` when not kept (the payload gathers them itself)."""
        return self.sent if self.sent is not None else self.source.index_select(0, self.positions)


@dataclasses.dataclass(frozen=True)
class _Job:
    """One bucket's reduction between selection and the collective's completion."""

    flat: torch.Tensor
    plan: _Plan
    wire: torch.dtype
    step: int
    selection: _Selection | None  # None until selected, and on an unhealthy rank
    count: int                   # pairs this rank sends
    healthy: bool                # this rank compensated and selected (else it flags its payload)
    started: float
    control: int                 # bytes of descriptors and sizes this rank sent
    on_stats: Callable[[BucketStats], None] | None
    whole: torch.Tensor          # the whole tensors' values (gathered from the bucket)
    arena: Arena | None          # the bucket's memory (None: the memory keeps nothing)
    sizes: list[int] | None = None  # every rank's payload bytes (variable-count methods)
    largest: int = 0             # the largest rank's payload bytes
    on_landed: Callable[[list[torch.Tensor]], None] | None = None  # see SparseReducer.reduce


@dataclasses.dataclass(frozen=True)
class _Landing:
    """What a transport made of the collective's result, for the one completion path."""

    out: torch.Tensor                    # the reduced bucket (the bucket itself, or an fp32 temporary)
    sent: torch.Tensor | None = None     # values the selection actually carried (None: ``selection.sent``)
    problem: str | None = None                   # why the result must not be used (a rank was unhealthy)


@dataclasses.dataclass(frozen=True)
class _Timing:
    """When a bucket's collective was issued and what the transport's local work and size were."""

    issued: float    # perf_counter when the collective was issued
    local_s: float   # local work before it (packing, or scattering the selection)
    nbytes: int      # the collective's size as the link model reads it (gradsparse.cost.collective_terms)
    units: int       # what local work scales with: received payload bytes, or bucket elements


@dataclasses.dataclass(frozen=True)
class _Traffic:
    """Bytes this rank handed to and got back from a bucket's collective (control exchanges excluded)."""

    sent: int
    received: int


def _unhealthy_reason(health: Sequence[int], wire: torch.dtype) -> str:
    """Why the ranks skip a bucket, from every rank's health.

    >>> _unhealthy_reason([1, 0], torch.float32)
    'rank 1 produced NaN/Inf gradients'
    """
    nonfinite = [r for r, h in enumerate(health) if h == NONFINITE]
    overflow = [r for r, h in enumerate(health) if h == OVERFLOW]
    parts = []
    if nonfinite:
        parts.append(f"rank {', '.join(map(str, nonfinite))} produced NaN/Inf gradients")
    if overflow:
        parts.append(f"on rank {', '.join(map(str, overflow))} the compensated gradient (memory + gradient) could "
                     f"overflow {wire} or fp32 (a smaller loss scale fixes it: AMP's GradScaler lowers it after a "
                     "skipped step; for large values use value_dtype=torch.bfloat16, which has fp32's range)")
    return "; ".join(parts)


def _crc(obj) -> int:
    return zlib.crc32(repr(obj).encode())


def check_descriptors(descriptors: Sequence[Sequence[int]], same_size: bool) -> None:
    """Raise :class:`StateMismatchError` naming the first field on which ranks disagree.

    ``descriptors[r]`` is rank r's list of :data:`DESCRIPTOR_FIELDS` values; payload
    sizes are compared only when the method fixes them (``same_size``).

    Example::

        >>> check_descriptors([[1, 2], [1, 3]], same_size=True)
        Traceback (most recent call last):
        ...
        gradsparse.errors.StateMismatchError: ranks disagree on the configuration (compressor and reducer options): [2, 3] (by rank); ...
    """
    fields = DESCRIPTOR_FIELDS if same_size else DESCRIPTOR_FIELDS[:-1]
    for i, name in enumerate(fields[: len(descriptors[0])]):
        column = [d[i] for d in descriptors]
        if len(set(column)) > 1:
            if name == "wire dtype":
                column = [str(DTYPE_OF_CODE.get(code, code)) for code in column]
            raise StateMismatchError(f"ranks disagree on the {name}: {column} (by rank); every rank must run the "
                                     "same compressor, options and model at the same step and epoch")


def check_gradient(flat) -> None:
    """Raise a typed error naming the fix unless ``flat`` is a dense tensor (what :meth:`SparseReducer.reduce` takes)."""
    if flat is None:
        raise ConfigTypeError("reduce() got None instead of a gradient: a parameter with no gradient (frozen, or "
                              "unused in this step). Skip a frozen parameter on every rank alike (e.g. `if "
                              "p.requires_grad`); pass torch.zeros_like(p) for one unused on some ranks only, so that "
                              "every rank joins the same collectives")
    instance(flat, "the gradient reduce() takes", torch.Tensor, "p.grad")
    if flat.layout != torch.strided:
        raise UnsupportedGradientError(f"reduce() got a {flat.layout} gradient (nn.Embedding(sparse=True)?): "
                                       "SparseReducer reduces dense tensors. Average a sparse gradient with "
                                       "torch.distributed.all_reduce as the DDP hook does, or use sparse=False")


def check_bucket(flat: torch.Tensor) -> None:
    """Raise a typed error unless ``flat`` is a usable gradient bucket (an empty one is: nothing to reduce)."""
    if flat.is_complex() or not flat.is_floating_point():
        raise UnsupportedGradientError(f"gradsparse compresses real floating-point gradients, got {flat.dtype}")
    if flat.dtype not in VALUE_DTYPES:
        raise UnsupportedGradientError(f"unsupported gradient dtype {flat.dtype}; use one of {list(VALUE_DTYPES)}")
    if flat.numel() > INT32_MAX:
        raise BucketError(f"bucket of {flat.numel()} elements exceeds the int32 index limit of {INT32_MAX}; "
                          "use smaller buckets (DDP bucket_cap_mb)")
    if not flat.is_contiguous():
        raise BucketError("the bucket must be a contiguous tensor")


def through_copy(t: torch.Tensor) -> bool:
    """Whether :meth:`SparseReducer.reduce` reduces ``t`` through a contiguous copy (a dense, strided tensor
    that is not contiguous, e.g. a ``channels_last`` gradient)."""
    return t.layout == torch.strided and not t.is_contiguous() and t.numel() > 0


def copied_back(t: torch.Tensor, fut: torch.futures.Future) -> torch.futures.Future:
    """A Future of ``t`` once ``fut``'s (contiguous) result is copied into it, in logical order."""
    return fut.then(lambda done: t.copy_(done.value().view(t.shape)))


def is_transport_failure(err: BaseException) -> bool:
    """Whether an exception from a collective is the transport's (network, peer, timeout), not a bug or a check.

    Backends raise ``RuntimeError`` subclasses (gloo/NCCL's ``DistBackendError``,
    Horovod's ``HorovodInternalError``, ``mpi4py.MPI.Exception``) or ``OSError``;
    gradsparse's own errors and other exceptions are not relabelled.

    >>> is_transport_failure(RuntimeError("Connection closed by peer")), is_transport_failure(KeyError("x"))
    (True, False)
    """
    return isinstance(err, (RuntimeError, OSError)) and not isinstance(err, GradSparseError)


class SparseReducer:
    """Reduces flat gradient buckets sparsely across the ranks of a communicator.

    Args:
        compressor: a :class:`~gradsparse.compressors.Compressor`.
        communicator: a :class:`~gradsparse.comm.Communicator`.
        options: a :class:`~gradsparse.options.ReducerOptions` (None: the defaults).
        **knobs: the fields of :class:`~gradsparse.options.ReducerOptions` as keywords
            (``granularity``, ``min_compress_numel``, ``value_dtype``, ``nonfinite``,
            ``op``, ``verify_every``), applied over ``options``.
    """

    def __init__(self, compressor: Compressor, communicator: Communicator, options: ReducerOptions | None = None,
                 **knobs):
        self.compressor = instance(compressor, "compressor", Compressor, "TopK(0.01)")
        self.communicator = instance(communicator, "communicator", Communicator, "LocalCommunicator()")
        self.options = ReducerOptions.of(options, **knobs)
        if self.options.transport == SPLIT and not self.communicator.carries_alltoall:
            raise InvalidConfigError(f"transport='split' needs a communicator with an alltoall, and "
                                     f"{type(communicator).__name__} has none (carries_alltoall is False); use "
                                     "transport='bytes' or 'allgather'")
        self.memory = compressor.make_memory()
        #: receives NonFiniteGradientError instead of raising it (see :meth:`_on_nonfinite`)
        self.defer_error: Callable[[Exception], None] | None = None
        self._loss_scale: float | None = None
        self._config_crc = _crc((compressor.config(), *self.options.signature()))
        self._calls = 0
        self._plans: dict[tuple, _Plan] = {}
        self._indices: dict[tuple, torch.Tensor] = {}
        self._caps: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._transport = TransportModel()
        self._last_done = 0.0  # when this rank's previous bucket collective completed (perf_counter)
        self._payloads = PayloadBuffers()
        self._warned_float64 = False

    # ----------------------------------------------------------------- planning
    def _plan(self, segments: Sequence[Segment], numel: int) -> _Plan:
        signature = tuple(segments)
        plan = self._plans.get(signature)
        if plan is None:
            ordered = tuple(sorted(segments, key=lambda s: s.offset))
            end = 0
            for s in ordered:
                if s.offset < end or s.numel < 1 or s.offset + s.numel > numel:
                    raise BucketError(f"segment {s} overlaps another or lies outside the bucket of {numel} elements")
                end = s.offset + s.numel
            smallest = self.options.min_compress_numel
            compressed = tuple(s for s in ordered if s.numel >= smallest)
            whole = tuple(s for s in ordered if s.numel < smallest)
            runs: list[list[int]] = []
            for s in compressed:
                if runs and runs[-1][1] == s.offset:
                    runs[-1][1] += s.numel
                else:
                    runs.append([s.offset, s.offset + s.numel])
            if self.options.granularity == "parameter":
                groups = tuple((s,) for s in compressed)
            else:
                groups = (compressed,) if compressed else ()
            ranges = None if self.options.granularity == "bucket" and len(runs) > 1 else tuple(
                (g[0].offset, sum(s.numel for s in g)) for g in groups)
            plan = _Plan(compressed, whole, groups, ranges, tuple(map(tuple, runs)), sum(s.numel for s in whole),
                         sum(s.numel for s in ordered), _crc(ordered))
            self._plans[signature] = plan
        return plan

    def _index(self, plan: _Plan, what: str, device: torch.device) -> torch.Tensor:
        """Cached int64 positions of the plan's whole tensors (``what="whole"``) or compressed ones."""
        key = (id(plan), what, str(device))  # plans are kept for the reducer's life: ids stay theirs
        index = self._indices.get(key)
        if index is None:
            spans = [(s.offset, s.offset + s.numel) for s in plan.whole] if what == "whole" else plan.runs
            index = torch.cat([torch.arange(a, b, device=device) for a, b in spans]) if spans else \
                torch.empty(0, dtype=torch.int64, device=device)
            self._indices[key] = index
        return index

    def fixed_count(self, plan: _Plan, step: int, epoch: int) -> int | None:
        """Pairs this bucket sends at this step, if the compressor fixes it."""
        if not self.compressor.fixed_count:
            return None
        return sum(self.compressor.count(sum(s.numel for s in g), step, epoch) for g in plan.groups)

    def _alpha(self) -> float:
        """The factor every rank's contribution is summed with: ``1 / world_size`` to average, 1 to sum."""
        return 1.0 / self.communicator.world_size if self.options.op == "average" else 1.0

    def _whole_index(self, plan: _Plan, device: torch.device) -> torch.Tensor | None:
        """The plan's whole-tensor positions as ``ops.unpack_add`` takes them (None: no whole tensors)."""
        return self._index(plan, "whole", device) if plan.whole else None

    def _sparse_pays(self, payload_bytes: int, flat: torch.Tensor) -> bool:
        """An allgather moves ``world * payload`` bytes per rank, a ring allreduce about ``2 * n`` elements."""
        return self.communicator.world_size * payload_bytes < 2 * flat.numel() * flat.element_size()

    # ---------------------------------------------------------------- selection
    def _pieces(self, flat: torch.Tensor, plan: _Plan) -> tuple[list[tuple[int, torch.Tensor]], bool]:
        """The compressed gradient as (bucket offset, tensor) pieces, adjacent parameters joined into one piece
        unless the compressor's preprocessing (DGC's clipping) replaced one; and whether any was replaced."""
        world, scale = self.communicator.world_size, self._loss_scale or 1.0
        average = self.options.op == "average"
        pieces, run, replaced = [], None, False
        for s in plan.compressed:
            view = flat[s.offset:s.offset + s.numel]
            g = self.compressor.preprocess(view, world, scale, average)
            if g is view and run is not None and run[1] == s.offset:
                run[1] += s.numel
                continue
            if run is not None:
                pieces.append((run[0], flat[run[0]:run[1]]))
            run = [s.offset, s.offset + s.numel] if g is view else None
            if g is not view:
                pieces.append((s.offset, g.reshape(-1)))
                replaced = True
        if run is not None:
            pieces.append((run[0], flat[run[0]:run[1]]))
        return pieces, replaced

    def _compensate(self, flat: torch.Tensor, plan: _Plan, arena: Arena | None,
                    caps: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, Candidates | None]:
        """One pass over the compressed gradient into the arena (in place): what to select from, laid out like
        the bucket, and the selection candidates the pass collected (with ``caps``: see :meth:`_candidate_caps`)."""
        pieces, replaced = self._pieces(flat, plan)
        if arena is not None:
            if caps is not None:  # every piece a view of the bucket: one call for the bucket
                return arena.selectable, arena.compensate_collecting(pieces, caps[0], None if replaced else flat)
            arena.compensate(pieces)
            return arena.selectable, None
        v = flat.float()  # the memory keeps nothing: select from the gradient itself
        if replaced:
            v = v.clone() if v is flat else v
            for start, g in pieces:
                v[start:start + g.numel()].copy_(g)
        return v, None

    def _candidate_caps(self, plan: _Plan, step: int, epoch: int,
                        arena: Arena | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per compressed parameter, how many selection candidates the compensation pass keeps and its k (int64
        each), or None to collect none: the memory or compressor cannot, one selection spans several parameters,
        the bucket is not on the CPU (the CUDA ops select the same positions without being faster), or every
        parameter's k is a large part of it (there the list costs more than the read it saves)."""
        if (arena is None or self.options.granularity != "parameter" or not self.compressor.selects_from_candidates
                or not self.memory.collects_candidates or arena.floors.device.type != "cpu"):
            return None
        key = (id(plan), self.compressor.ratio(step, epoch))
        if key not in self._caps:
            ks = [self.compressor.count(s.numel, step, epoch) for s in plan.compressed]
            caps = [CANDIDATES_PER_K * k + CANDIDATES_SLACK if 0 < k <= s.numel // CANDIDATES_BELOW else 0
                    for k, s in zip(ks, plan.compressed)]
            self._caps[key] = (torch.tensor(caps, dtype=torch.int64), torch.tensor(ks, dtype=torch.int64)) \
                if any(caps) else None
        return self._caps[key]

    def set_loss_scale(self, loss_scale: float) -> None:
        """Declare the factor the next gradients carry; rescales the memory when it changed."""
        if not (loss_scale > 0 and loss_scale != float("inf")):
            raise InvalidConfigError(f"loss_scale must be a positive finite number, got {loss_scale!r}")
        if self._loss_scale is not None and loss_scale != self._loss_scale:
            self.memory.rescale(loss_scale / self._loss_scale)
            logger.debug("gradsparse: loss scale %g -> %g, memory rescaled", self._loss_scale, loss_scale)
        self._loss_scale = float(loss_scale)

    def _limit(self, flat: torch.Tensor, wire: torch.dtype) -> float:
        """Magnitudes at or above this could overflow the wire, the bucket, fp32 memory or an fp32 sum."""
        limit = min(torch.finfo(wire).max, torch.finfo(flat.dtype).max, torch.finfo(torch.float32).max)
        return limit if self.options.op == "average" else limit / self.communicator.world_size

    def _health(self, flat: torch.Tensor, arena: Arena | None, wire: torch.dtype) -> int:
        """HEALTHY, NONFINITE (a NaN/Inf gradient) or OVERFLOW (the gradient, or the bound of what compensating
        it gives, reaches :meth:`_limit`), before anything changes: one read pass over the bucket."""
        grad_bound = ops.absmax(flat)
        if not math.isfinite(grad_bound):
            return NONFINITE
        limit = self._limit(flat, wire)
        if grad_bound >= limit or (arena is not None and self.memory.headroom(arena.bounds, grad_bound) >= limit):
            return OVERFLOW
        return HEALTHY

    def _select(self, v: torch.Tensor, plan: _Plan, step: int, epoch: int, wire: torch.dtype,
                arena: Arena | None = None, candidates: Candidates | None = None,
                ks: torch.Tensor | None = None, whole: torch.Tensor | None = None,
                count: int | None = None) -> _Selection:
        """Every group's selection from ``v`` (laid out like the bucket), the values to send and what to mask.

        With ``candidates`` (one group per parameter, ``ks`` their k), the selection reads them instead of
        ``v`` where it can, and the ``arena`` learns the next floors from it. Otherwise, when the pairs go
        as selected (fp32, not quantized), ``count`` (the pairs, fixed) is known and the compressor can
        (:attr:`~gradsparse.compressors.base.Compressor.packs_selection`), the selection also writes the
        payload, with ``whole`` as its dense section: the same bytes as packing afterwards."""
        if not plan.compressed:
            return self._select_all(v, plan, wire)
        scale = self._loss_scale or 1.0
        compressor = self.compressor
        if plan.ranges is None:  # one group (granularity "bucket") with whole tensors between its parameters
            return self._select_gathered(v, plan, step, epoch, wire)
        exact = wire == torch.float32 and v.dtype == torch.float32 and not compressor.quantizes
        payload = bits = None
        if candidates is not None:
            positions, kth = compressor.select_segments_from(v, plan.ranges, step, epoch, candidates, scale)
            arena.learn(kth, candidates, ks)
        elif exact and count is not None and whole is not None and compressor.packs_selection:
            payload = self._payloads.take(id(plan), PayloadLayout(count, plan.n_whole, wire).nbytes, v.device)
            # a bitmap of the positions for the next compensation pass, where the memory update will be deferred
            # to it (the CPU's mask pass then reads 1 bit per element instead of scattering 8-byte positions)
            if arena is not None and v.device.type == "cpu" and self.memory.defers_at(count, v.numel()):
                bits = torch.empty(ops.bitmap_words(v.numel()), dtype=torch.int64)
            positions = compressor.select_segments_packed(v, plan.ranges, step, epoch, whole, v.numel(), payload,
                                                          scale, bits=bits)
        else:
            positions = compressor.select_segments(v, plan.ranges, step, epoch, scale)
        bounds = [a for a, _ in plan.ranges] + [plan.ranges[-1][0] + plan.ranges[-1][1]]
        cuts = torch.searchsorted(positions, torch.tensor(bounds, device=positions.device)).tolist()
        complete = [cuts[i + 1] - cuts[i] == n for i, (_, n) in enumerate(plan.ranges)]
        if compressor.quantizes:
            sent = torch.cat([compressor.sent_values(v[a:a + n], positions[cuts[i]:cuts[i + 1]] - a)
                              for i, (a, n) in enumerate(plan.ranges)])
        elif exact:
            sent = None  # sent as they are: the payload gathers them (ops.pack_gathered), or holds them already
        else:
            sent = v.index_select(0, positions)
        if all(complete):
            masked = None
        elif not any(complete):
            masked = positions
        else:
            masked = torch.cat([positions[cuts[i]:cuts[i + 1]] for i, c in enumerate(complete) if not c])
        if sent is None:
            return _Selection(positions, None, masked, source=v, payload=payload, bits=bits)
        return _Selection(positions, sent.to(wire).float(), masked)

    def _select_gathered(self, v: torch.Tensor, plan: _Plan, step: int, epoch: int, wire: torch.dtype) -> _Selection:
        """One selection over the compressed parameters gathered into one tensor, mapped back to the bucket."""
        joined = torch.cat([v[a:b] for a, b in plan.runs])
        local = self.compressor.select(joined, step, epoch, self._loss_scale or 1.0)
        sent = self.compressor.sent_values(joined, local).to(wire).float()
        starts, shifts, at = [], [], 0
        for a, b in plan.runs:
            starts.append(at)
            shifts.append(a - at)
            at += b - a
        counts = torch.searchsorted(local, torch.tensor(starts[1:] + [at], device=local.device)).diff(
            prepend=local.new_zeros(1))
        positions = local + torch.tensor(shifts, device=local.device).repeat_interleave(counts)
        return _Selection(positions, sent, None if local.numel() == joined.numel() else positions)

    def _select_all(self, v: torch.Tensor, plan: _Plan, wire: torch.dtype) -> _Selection:
        """A dense iteration: every compressed coordinate, copied (the update subtracts it from the memory)."""
        positions = self._index(plan, "compressed", v.device)
        return _Selection(positions, v.index_select(0, positions).to(wire).float(), None)

    # ------------------------------------------------------------------ reduce
    def reduce(
        self,
        flat: torch.Tensor,
        segments: Sequence[Segment] | None,
        step: int,
        epoch: int = 0,
        *,
        select_all: bool = False,
        on_stats: Callable[[BucketStats], None] | None = None,
        loss_scale: float | None = None,
        on_landed: Callable[[list[torch.Tensor]], None] | None = None,
    ) -> torch.futures.Future:
        """Reduce ``flat`` in place across ranks; returns a Future of ``flat``.

        ``segments`` lists the parameters in the bucket (None: one segment named
        ``"bucket"``). ``select_all`` selects every coordinate (a dense iteration:
        the adapters' first iterations). ``loss_scale``: see :meth:`set_loss_scale`.
        Every rank must call this with the same segments, step and epoch, in the
        same order.

        ``on_landed``: called when the sparse transport landed every rank's pairs with no rank
        flagging a problem, before the future completes, with the positions the result may be
        non-zero at (int32 indices of each payload, then the int64 positions of the tensors sent
        whole; views, valid during the call only). Elsewhere ``flat`` is zero. Not called on the
        other transports, when the bucket is skipped, or for a bucket reduced through a contiguous
        copy (below; the hierarchical reducer, which passes it, then copies the whole result).

        ``flat`` may be any dense tensor, e.g. ``p.grad`` itself; one that is not contiguous (the
        gradient of a ``channels_last`` parameter, on which ``view(-1)`` fails and ``reshape(-1)``
        would hand over a copy whose result never reaches ``p.grad``) is reduced through a
        contiguous copy, so the memory is kept in logical order, and the result is copied back.

        Phases: check and plan, health, verify (descriptors), compensate and
        select, exchange sizes, transport (:meth:`_allgather` or :meth:`_allreduce`),
        then one completion path (:meth:`_complete`).
        """
        check_gradient(flat)
        if through_copy(flat):
            return copied_back(flat, self.reduce(flat.contiguous(), segments, step, epoch, select_all=select_all,
                                                 on_stats=on_stats, loss_scale=loss_scale))
        check_bucket(flat)
        step, epoch = integer(step, "step", minimum=0), integer(epoch, "epoch", minimum=0)
        if flat.numel() == 0:  # a parameter of zero elements (every rank's: DDP and Horovod check the shapes)
            return completed_future(flat)
        flat = flat.view(-1)
        plan = self._plan([Segment("bucket", 0, flat.numel())] if segments is None else segments, flat.numel())
        if flat.dtype == torch.float64 and plan.compressed and not self._warned_float64:
            self._warned_float64 = True
            logger.warning("gradsparse: a float64 bucket: the memory (residuals, DGC's momentum) and the selection "
                           "are float32, so the compressed parameters' gradients are rounded to float32 (with nothing "
                           "dropped the result equals dense DDP to float32 rounding, not bit for bit); tensors sent "
                           "whole stay float64")
        if loss_scale is not None:
            self.set_loss_scale(loss_scale)
        started = time.perf_counter()
        wire = self.options.value_dtype or flat.dtype
        whole = flat.index_select(0, self._index(plan, "whole", flat.device)) if plan.whole else flat.new_empty(0)
        arena = Arena.of(self.memory, plan.compressed, flat.numel(), flat.device) \
            if self.memory.names and plan.compressed else None
        health = self._health(flat, arena, wire)
        fixed = sum(s.numel for s in plan.compressed) if select_all else self.fixed_count(plan, step, epoch)
        same_size = select_all or self.compressor.fixed_count
        job = _Job(flat, plan, wire, step, None, fixed or 0, health == HEALTHY, started, 0, on_stats, whole, arena,
                   on_landed=on_landed)
        descriptors = self._verify(job, epoch, select_all, fixed if same_size else None, health)
        if descriptors is not None:
            job = dataclasses.replace(job, control=DESCRIPTOR_BYTES)
            if any(d[HEALTH] != HEALTHY for d in descriptors):
                return self._skip_unhealthy(job, [d[HEALTH] for d in descriptors])
        if job.healthy:
            caps = None if select_all else self._candidate_caps(plan, step, epoch, arena)
            v, candidates = self._compensate(flat, plan, arena, caps)
            chosen = self._select_all(v, plan, wire) if select_all else \
                self._select(v, plan, step, epoch, wire, arena, candidates, None if caps is None else caps[1],
                             whole, fixed)
            job = dataclasses.replace(job, selection=chosen, count=chosen.positions.numel())
        job = self._exchange_sizes(job, same_size)
        transport = self._choose_transport(job)
        if transport == ALLREDUCE:
            return self._allreduce(job)
        if transport == SPLIT:
            return self._split(job)
        return self._allgather(job)

    def _verify(self, job: _Job, epoch: int, select_all: bool, fixed: int | None, health: int) -> list | None:
        """Every rank's descriptor of this bucket, compared (on verified calls; else None).

        Runs before compensation, so an unhealthy rank anywhere leaves every rank's memory untouched.
        """
        self._calls += 1
        every = self.options.verify_every
        if not every or (self._calls - 1) % every:
            return None
        flat = job.flat
        payload = PayloadLayout(fixed, job.plan.n_whole, job.wire).nbytes if fixed is not None else -1
        mine = [PROTOCOL, self._config_crc, job.plan.crc, flat.numel(), job.step, epoch, VALUE_DTYPES[job.wire],
                int(select_all), payload, health, *self._transport.descriptor()]
        descriptors = self.collective(lambda: self.communicator.allgather_ints(mine, flat.device), flat, job.step)
        check_descriptors(descriptors, fixed is not None)
        self._transport.absorb([d[HEALTH + 1:] for d in descriptors], self.communicator.world_size)
        return descriptors

    def _exchange_sizes(self, job: _Job, same_size: bool) -> _Job:
        """Every rank's payload size (variable-count methods: one small collective) and the largest."""
        nbytes = PayloadLayout(job.count, job.plan.n_whole, job.wire).nbytes
        if same_size:
            return dataclasses.replace(job, largest=nbytes)
        flat = job.flat
        sizes = self.collective(lambda: self.communicator.exchange_sizes(nbytes, flat.device), flat, job.step)
        return dataclasses.replace(job, sizes=sizes, largest=max(sizes), control=job.control + 8)

    # --------------------------------------------------------------- transports
    def _received_bytes(self, job: _Job) -> int:
        """Bytes the allgather hands this rank: every rank's payload (padded to the largest where the
        communicator pads)."""
        world = self.communicator.world_size
        return job.largest * world if self.communicator.pads_to_largest or job.sizes is None else sum(job.sizes)

    def _choose_transport(self, job: _Job) -> str:
        """ALLGATHER, ALLREDUCE or SPLIT for this bucket, from values every rank has (the same choice everywhere).

        Pairs that would cost more bytes than the allreduce always go by allreduce; otherwise, with
        ``transport="auto"``, the link model's prediction decides once it has been measured. SPLIT only when
        asked for (``transport="split"``), and not for a bucket smaller than the world.
        """
        mode = self.options.transport
        world, n = self.communicator.world_size, job.flat.numel()
        if mode == SPLIT:
            return SPLIT if n >= world else ALLGATHER  # every region holds an element
        if mode in (ALLGATHER, ALLREDUCE):
            return mode
        by_bytes = ALLGATHER if self._sparse_pays(job.largest, job.flat) else ALLREDUCE
        if by_bytes == ALLREDUCE or mode == "bytes" or world == 1:
            return by_bytes
        choice = self._transport.choose(numel=job.flat.numel(), element_size=job.flat.element_size(),
                                        payload_bytes=job.largest, received_bytes=self._received_bytes(job),
                                        world=world)
        if choice is None:
            return ALLGATHER
        transport, predicted = choice
        if transport != ALLGATHER:
            logger.debug("gradsparse: bucket of %d elements at step %d goes by %s (predicted %s)",
                         job.flat.numel(), job.step, transport, predicted)
        return transport

    def _pack(self, job: _Job) -> torch.Tensor:
        """This rank's payload: its pairs and whole tensors, or a flagged one of the agreed size if unhealthy."""
        flat, plan, wire = job.flat, job.plan, job.wire
        if not job.healthy:
            return ops.pack(torch.arange(job.count, device=flat.device), flat.new_zeros(job.count),
                            flat.new_zeros(plan.n_whole), flat.numel(), wire, flags=FLAG_NONFINITE)
        chosen = job.selection
        if chosen.payload is not None:  # written by the selection
            return chosen.payload
        if chosen.sent is None:
            out = self._payloads.take(id(plan), PayloadLayout(chosen.positions.numel(), plan.n_whole, wire).nbytes,
                                      flat.device)
            return ops.pack_gathered(chosen.positions, chosen.source, job.whole, flat.numel(), wire, out=out)
        return ops.pack(chosen.positions, chosen.sent, job.whole, flat.numel(), wire)

    def _allgather(self, job: _Job) -> torch.futures.Future:
        """Sparse transport: pack this rank's pairs and whole tensors, allgather, unpack-add every rank's."""
        flat = job.flat
        whole_index = self._whole_index(job.plan, flat.device)
        packing = time.perf_counter()
        payload = self._pack(job)
        issued = time.perf_counter()
        traffic = _Traffic(job.largest if self.communicator.pads_to_largest else payload.numel(),
                           self._received_bytes(job))

        def land(payloads: list[torch.Tensor]) -> _Landing:
            # accumulate in fp32: in the bucket itself when it is fp32, else in a temporary
            out = flat if flat.dtype == torch.float32 else flat.new_empty(flat.numel(), dtype=torch.float32)
            flags = ops.unpack_add(payloads, out, job.wire, whole_index, alpha=self._alpha(), overwrite=True)
            problem = "a rank flagged NaN/Inf gradients or an overflow in its payload" \
                if flags & FLAG_NONFINITE else None
            if job.on_landed is not None and problem is None:  # the payloads were validated by unpack_add
                job.on_landed([indices_of(p) for p in payloads] + ([] if whole_index is None else [whole_index]))
            return _Landing(out, problem=problem)

        def landed(payloads: list[torch.Tensor]) -> _Landing:
            landing = land(payloads)
            self._payloads.give(id(job.plan), payload)  # unpacked: the next step may write it again
            return landing

        fut = self.collective(lambda: self.communicator.allgather(payload, job.sizes), flat, job.step)
        return self._complete(job, fut, lambda done: done.value(), landed, ALLGATHER, traffic,
                              _Timing(issued, issued - packing, job.largest, traffic.received))

    def _allreduce(self, job: _Job) -> torch.futures.Future:
        """Dense transport of the same selection: scatter it into the bucket and allreduce.

        Used when the sparse payload would cost more bytes than an allreduce; the
        algorithm (what is selected, what the memory keeps) does not change, except
        that the values travel in the bucket's dtype. The average multiplies by
        ``1 / world_size`` before the sum, as DDP does, so with nothing dropped the
        result is DDP's bit for bit.
        """
        flat, plan = job.flat, job.plan
        scattering = time.perf_counter()
        carried, scaled = None, False
        if not job.healthy:
            flat.fill_(float("nan"))  # every rank must see it: the sum carries the NaN to all of them
        elif flat.dtype == job.wire == torch.float32 and plan.covered == flat.numel():
            # an fp32 bucket its segments cover: its own pairs unpacked over it (the payload the selection wrote,
            # or packed now) write it whole in one pass, the average's factor included, where zeroing the runs,
            # gathering, scattering and multiplying would take four; the same values (the factor is applied in
            # fp32 either way; a selected -0.0 lands as +0.0), and the values carried are the selection's own
            payload = self._pack(job)
            ops.unpack_add([payload], flat, job.wire, self._whole_index(plan, flat.device), alpha=self._alpha(),
                           overwrite=True)
            self._payloads.give(id(plan), payload)
            scaled = True
        else:
            if job.selection.payload is not None:  # the selection wrote one; this transport does not send it
                self._payloads.give(id(plan), job.selection.payload)
            values = job.selection.values()  # before the bucket (which it may be gathered from) is zeroed
            for a, b in plan.runs:
                flat[a:b].zero_()
            positions = job.selection.positions
            flat.index_copy_(0, positions, values.to(flat.dtype))
            carried = flat.index_select(0, positions).float()
        if self.options.op == "average" and not scaled:
            flat.mul_(self._alpha())
        nbytes = flat.numel() * flat.element_size()
        issued = time.perf_counter()

        def land(_) -> _Landing:
            finite = job.healthy and ops.all_finite(flat)
            return _Landing(flat, carried, None if finite else "a rank produced NaN/Inf gradients or an overflow")

        fut = self.collective(lambda: self.communicator.allreduce_sum(flat), flat, job.step)
        return self._complete(job, fut, lambda done: done.wait(), land, ALLREDUCE, _Traffic(nbytes, nbytes),
                              _Timing(issued, issued - scattering, nbytes, flat.numel()))

    def _split_regions(self, plan: _Plan, bounds: list[int],
                       device: torch.device) -> list[tuple[int, int, torch.Tensor]]:
        """Per region of :mod:`gradsparse.split`: where its whole elements start and end in the plan's whole
        index, and their positions in the region (int64); cached per plan and world size."""
        key = (id(plan), "split", len(bounds), str(device))
        regions = self._indices.get(key)
        if regions is None:
            index = self._index(plan, "whole", device)
            cuts = torch.searchsorted(index, torch.tensor(bounds, device=device)).tolist()
            regions = [(cuts[j], cuts[j + 1], index[cuts[j]:cuts[j + 1]] - bounds[j]) for j in range(len(bounds) - 1)]
            self._indices[key] = regions
        return regions

    def _split_pieces(self, job: _Job, bounds: list[int]) -> list[torch.Tensor]:
        """This rank's payload for each region: its pairs there and its whole elements there, in the region's
        coordinates (flagged and empty if unhealthy)."""
        flat, plan, wire, chosen = job.flat, job.plan, job.wire, job.selection
        regions = self._split_regions(plan, bounds, flat.device)
        if not job.healthy:
            return [ops.pack(torch.zeros(0, dtype=torch.int64, device=flat.device), flat.new_zeros(0),
                             flat.new_zeros(b - a), hi - lo, wire, flags=FLAG_NONFINITE)
                    for (a, b, _), lo, hi in zip(regions, bounds, bounds[1:])]
        positions = chosen.positions
        cuts = torch.searchsorted(positions, torch.tensor(bounds, device=positions.device)).tolist()
        pieces = []
        for j, (a, b, _) in enumerate(regions):
            lo, hi = bounds[j], bounds[j + 1]
            local = positions[cuts[j]:cuts[j + 1]] - lo
            whole = job.whole[a:b]
            if chosen.sent is None:
                pieces.append(ops.pack_gathered(local, chosen.source[lo:hi], whole, hi - lo, wire))
            else:
                pieces.append(ops.pack(local, chosen.sent[cuts[j]:cuts[j + 1]], whole, hi - lo, wire))
        return pieces

    def _split(self, job: _Job) -> torch.futures.Future:
        """Split transport (:mod:`gradsparse.split`): each region's pairs to its owner (alltoall, in this thread),
        the owner sums them, then the reduced regions are allgathered (the bucket's asynchronous collective)."""
        flat, comm = job.flat, self.communicator
        world, me, step = comm.world_size, comm.rank, job.step
        bounds = split.region_bounds(flat.numel(), world)
        packing = time.perf_counter()
        pieces = self._split_pieces(job, bounds)
        if job.selection is not None and job.selection.payload is not None:  # written by the selection, not sent
            self._payloads.give(id(job.plan), job.selection.payload)
        sizes = self.collective(lambda: comm.allgather_ints([p.numel() for p in pieces], flat.device), flat, step)
        job = dataclasses.replace(job, control=job.control + 8 * world + 8)  # the two size exchanges
        received = self.collective(lambda: comm.alltoall(pieces, sizes), flat, step)
        # accumulate in fp32: in the bucket itself when it is fp32 (what it held was packed above), else a temporary
        out = flat if flat.dtype == torch.float32 else flat.new_empty(flat.numel(), dtype=torch.float32)
        lo, hi = bounds[me], bounds[me + 1]
        dense_index = self._split_regions(job.plan, bounds, flat.device)[me][2]
        own_flags = ops.unpack_add(received, out[lo:hi], job.wire, dense_index if dense_index.numel() else None,
                                   alpha=self._alpha(), overwrite=True)
        upper = sum(indices_of(r).numel() for r in received) + dense_index.numel()
        message = split.encode_region(out[lo:hi], own_flags, upper)
        msg_sizes = self.collective(lambda: comm.exchange_sizes(message.numel(), flat.device), flat, step)
        issued = time.perf_counter()
        phase2 = max(msg_sizes) if comm.pads_to_largest else message.numel()
        traffic = _Traffic(sum(p.numel() for p in pieces) + phase2,
                           sum(r.numel() for r in received) + (phase2 * world if comm.pads_to_largest else
                                                                sum(msg_sizes)))

        def land(messages: list[torch.Tensor]) -> _Landing:
            flags = own_flags
            for j, m in enumerate(messages):
                if j != me:
                    flags |= split.decode_region(m, out[bounds[j]:bounds[j + 1]])
            problem = "a rank flagged NaN/Inf gradients or an overflow in its payload" \
                if flags & FLAG_NONFINITE else None
            return _Landing(out, problem=problem)

        fut = self.collective(lambda: comm.allgather(message, msg_sizes), flat, step)
        return self._complete(job, fut, lambda done: done.value(), land, SPLIT, traffic,
                              _Timing(issued, issued - packing, max(msg_sizes), 0))

    def _complete(self, job: _Job, fut: torch.futures.Future, result: Callable, land: Callable[..., _Landing],
                  transport: str, traffic: _Traffic, timing: _Timing) -> torch.futures.Future:
        """The one completion path of both transports: wait, land, commit (or apply the nonfinite policy), report."""
        flat = job.flat
        blocking = timing.issued - job.started  # the hook's synchronous part: it stalls backward

        def finish(done: torch.futures.Future) -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                landing = land(self.collective(lambda: result(done), flat, job.step))
                self._record_timing(transport, timing, t0, time.perf_counter())
                if landing.problem is not None:
                    self._on_nonfinite(flat, landing.problem)
                    return flat
                self._commit(job, landing)
                if landing.out is not flat:
                    flat.copy_(landing.out)
                return flat
            finally:
                self._report(job, transport, traffic, blocking + time.perf_counter() - t0, blocking)

        return fut.then(finish)

    def _record_timing(self, transport: str, timing: _Timing, done: float, landed: float) -> None:
        """Feed this rank's transport model: the collective's time (from when it could start: issued, or when
        the previous bucket's collective completed) and the transport's local work."""
        seconds = done - max(timing.issued, self._last_done)
        self._last_done = done
        if transport == SPLIT:  # its last collective is an allgather: the link model learns from it, nothing else
            self._transport.record(ALLGATHER, timing.nbytes, seconds, 0.0, 0)
            return
        self._transport.record(transport, timing.nbytes, seconds, timing.local_s + landed - done, timing.units)

    def _commit(self, job: _Job, landing: _Landing) -> None:
        """The reduction arrived: remove what was sent from the memory, post-process whole tensors."""
        chosen = job.selection
        if job.arena is not None:
            # the values went out as they were selected: fp32, unquantized, and (dense transport) an fp32 bucket
            exact = job.wire == torch.float32 and not self.compressor.quantizes and (
                landing.sent is None or job.flat.dtype == torch.float32)
            sent = landing.sent if landing.sent is not None else None if exact else chosen.values()
            job.arena.commit(chosen.positions, sent, chosen.masked, exact, chosen.bits)
        if job.plan.whole and self.memory.whole_names:  # one gather, update and scatter for the bucket
            out = landing.out
            arena = Arena.of(self.memory, job.plan.whole, job.plan.n_whole, out.device, self.memory.whole_names,
                             compact=True)
            index = self._index(job.plan, "whole", out.device)
            averaged = out.index_select(0, index)
            self.memory.finish_whole(arena.state, averaged)
            out.index_copy_(0, index, averaged)

    def _report(self, job: _Job, transport: str, traffic: _Traffic, compress_s: float, blocking_s: float) -> None:
        if job.on_stats is not None:
            world = self.communicator.world_size
            job.on_stats(BucketStats(numel=job.flat.numel(), selected=job.count, whole=job.plan.n_whole,
                                     bytes_sent=traffic.sent + job.control,
                                     bytes_received=traffic.received + job.control * world,
                                     transport=transport, compress_s=compress_s, blocking_s=blocking_s))

    def collective(self, run: Callable, flat: torch.Tensor, step: int):
        """Run or wait for a collective; a transport failure becomes a :class:`CommunicationError` saying where.

        Only failures of the transport are relabelled (:func:`is_transport_failure`);
        anything else propagates unchanged.
        """
        try:
            return run()
        except Exception as err:
            if not is_transport_failure(err):
                raise
            cause = str(err).splitlines()[0] if str(err) else repr(err)
            raise CommunicationError(
                f"gradsparse: a collective for the {flat.numel()}-element bucket at step {step} failed on rank "
                f"{self.communicator.rank}: a peer may have exited, the network failed, or the collective timed "
                f"out ({self.communicator.timeout_hint}). Cause: {cause}"
            ) from err

    def _skip_unhealthy(self, job: _Job, health: list[int]) -> torch.futures.Future:
        """Some rank's bucket is not finite or could overflow (known from the descriptors): nothing was compensated."""
        job = dataclasses.replace(job, count=0)
        try:
            self._on_nonfinite(job.flat, _unhealthy_reason(health, job.wire))
        finally:
            elapsed = time.perf_counter() - job.started
            self._report(job, ALLGATHER, _Traffic(0, 0), elapsed, elapsed)
        return completed_future(job.flat)

    def _on_nonfinite(self, flat: torch.Tensor, reason: str) -> None:
        """Apply the ``nonfinite`` policy: a NaN bucket (skip), or NonFiniteGradientError (raise).

        With ``defer_error`` set (the DDP hook sets it), a raised error is handed to
        it instead and the bucket is returned as NaN: DDP's reducer is not left
        half-way through a backward pass, and the hook raises the error once
        backward has finished.
        """
        if self.options.nonfinite == "raise":
            error = NonFiniteGradientError(f"{reason} (nonfinite='raise'); no residual or momentum was changed "
                                           "by them")
            if self.defer_error is None:
                raise error
            flat.fill_(float("nan"))
            self.defer_error(error)
            return
        logger.warning("gradsparse: %s: returning a NaN bucket (GradScaler skips such a step), memory unchanged",
                       reason)
        flat.fill_(float("nan"))

    def __getstate__(self):
        # the adapter that set defer_error sets it again; the caches are keyed by the plans' identities (which a
        # loaded plan does not keep, and another object may reuse) and hold buffers: they are built again
        return {**self.__dict__, "defer_error": None, "_plans": {}, "_indices": {}, "_caps": {},
                "_payloads": PayloadBuffers()}

    # ------------------------------------------------------------ checkpoints
    def reset_memory(self) -> None:
        """Forget every residual and momentum (e.g. after the world size changed: they are per rank)."""
        self.memory = self.compressor.make_memory()

    def state_dict(self) -> dict:
        """Plain tensors and numbers: loads with ``torch.load(weights_only=True)``."""
        return {"compressor": self.compressor.config(), "memory": self.memory.state_dict(),
                "loss_scale": self._loss_scale}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["compressor"] != self.compressor.config():
            raise StateMismatchError(f"checkpoint was written by {state_dict['compressor']}, "
                                     f"this reducer uses {self.compressor.config()}")
        self.memory.load_state_dict(state_dict["memory"])
        self._loss_scale = state_dict.get("loss_scale")
