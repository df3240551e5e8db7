"""The one pipeline: compensate, select, pack, allgather, unpack-add, average.

:class:`SparseReducer` reduces one flat bucket of gradients across ranks. The
DDP hook and the other adapters only supply the bucket, its segments (which
parameter lives where, keyed by a stable name) and a communicator.

Steps for one bucket on one rank:

1. Check the bucket (floating dtype, 1 <= numel <= 2**31 - 1) and its health:
   finite, and no risk that compensating it overflows (see below).
2. Verify (every ``verify_every`` calls; default every call): gather every rank's
   descriptor of the bucket (configuration, layout, step, epoch, wire dtype, fixed
   payload size, health) and compare them, so a rank that disagrees raises
   :class:`StateMismatchError` on every rank instead of sending a payload of
   another size (which aborts gloo). If any rank is unhealthy, stop here: see below.
3. Per compressed segment: ``g = compressor.preprocess(g)``, ``v = memory.compensate(key, g)``.
   Segments smaller than ``min_compress_numel`` are sent whole (no memory).
4. Select per parameter (each segment its own top-k) or per bucket (one top-k
   over all compressed segments).
5. Variable-count methods exchange payload sizes. If the sparse payload would
   cost more than a dense allreduce
   (``world_size * payload_bytes >= 2 * numel * element_size``), move the same
   selection by allreduce instead (zeros elsewhere, pre-multiplied by
   ``1 / world_size`` as DDP does): a transport choice only. For the first
   iterations (``force_dense``) every coordinate is selected.
6. Pack (indices, values, whole tensors) and allgather: one collective per bucket.
   Every collective is issued from this thread, in call order.
7. When the collective completes: validate every rank's payload, then
   scatter-add them in rank order, each scaled by ``1 / world_size``; apply the compressor's dense
   post-processing to whole tensors, remove what was sent from the memory and
   write the result into the bucket. A failed collective raises
   :class:`CommunicationError` naming the bucket, step and rank.

Loss scaling (AMP's GradScaler): pass ``loss_scale`` (the factor the gradients
carry). When it changes, the memory is rescaled by new/old before the bucket is
compensated, so residuals and momentum never mix scales (GradScaler's factors are
powers of two: the rescaling is exact). DGC's clipping norm and Threshold's tau are
compared unscaled.

Non-finite gradients and overflow: a rank is unhealthy when its bucket holds
NaN/Inf, or when compensating could overflow: the memory keeps a bound of its
largest magnitude (:meth:`~gradsparse.memory.Memory.headroom`), and if that bound
plus the gradient's largest magnitude reaches the range of the wire dtype, of the
bucket's dtype or of fp32, ``inf`` could enter the memory or the wire. When the
descriptors show an unhealthy rank, no rank compensates, selects or sends
anything: all of them raise :class:`NonFiniteGradientError`
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

from . import ops
from ._validate import choice, instance, integer
from .comm.base import Communicator, completed_future
from .compressors.base import Compressor
from .errors import (
    BucketError,
    CommunicationError,
    InvalidConfigError,
    NonFiniteGradientError,
    StateMismatchError,
    UnsupportedGradientError,
)
from .payload import DTYPE_OF_CODE, FLAG_NONFINITE, INT32_MAX, VALUE_DTYPES, PayloadLayout
from .stats import BucketStats

logger = logging.getLogger(__name__)

OPS = ("average", "sum")
GRANULARITIES = ("parameter", "bucket")
NONFINITE_POLICIES = ("raise", "skip")
PROTOCOL = 0x67730001  # descriptor format version; first field of every descriptor
DESCRIPTOR_FIELDS = ("protocol version", "configuration (compressor and reducer options)", "bucket layout",
                     "bucket size", "step", "epoch", "wire dtype", "dense warm-up phase", "payload size")
DESCRIPTOR_BYTES = 8 * (len(DESCRIPTOR_FIELDS) + 1)  # the compared fields, then the health (int64 each)
# A rank's health, the descriptor's last field: what it found before compensating.
HEALTHY, NONFINITE, OVERFLOW = 1, 0, 2


@dataclasses.dataclass(frozen=True)
class Segment:
    """One parameter's slice ``[offset, offset + numel)`` of a flat bucket."""

    key: str
    offset: int
    numel: int


@dataclasses.dataclass(frozen=True)
class _Plan:
    compressed: tuple[Segment, ...]
    whole: tuple[Segment, ...]
    groups: tuple[tuple[Segment, ...], ...]
    n_dense: int
    crc: int                     # of the layout, compared across ranks


@dataclasses.dataclass(frozen=True)
class _Selection:
    segment: Segment
    local: torch.Tensor          # int64 positions within the segment
    sent: torch.Tensor           # fp32 values as they go on the wire
    complete: bool = False       # every coordinate of its group was selected (nothing dropped)
    bound: float = math.inf      # upper bound of |v| over what its group keeps after the update


@dataclasses.dataclass(frozen=True)
class _Job:
    """One bucket's reduction between selection and the collective's completion."""

    flat: torch.Tensor
    plan: _Plan
    wire: torch.dtype
    step: int
    selections: list[_Selection]
    count: int                   # pairs this rank sends
    healthy: bool                # this rank compensated and selected (else it flags its payload)
    started: float
    control: int                 # bytes of descriptors and sizes this rank sent
    on_stats: Callable[[BucketStats], None] | None


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


def check_bucket(flat: torch.Tensor) -> None:
    """Raise a typed error unless ``flat`` is a usable gradient bucket."""
    if flat.is_complex() or not flat.is_floating_point():
        raise UnsupportedGradientError(f"gradsparse compresses real floating-point gradients, got {flat.dtype}")
    if flat.dtype not in VALUE_DTYPES:
        raise UnsupportedGradientError(f"unsupported gradient dtype {flat.dtype}; use one of {list(VALUE_DTYPES)}")
    if flat.numel() == 0:
        raise BucketError("empty bucket: nothing to reduce")
    if flat.numel() > INT32_MAX:
        raise BucketError(f"bucket of {flat.numel()} elements exceeds the int32 index limit of {INT32_MAX}; "
                          "use smaller buckets (DDP bucket_cap_mb)")


def check_options(*, granularity="parameter", min_compress_numel=4096, value_dtype=None, nonfinite="skip",
                  op="average", verify_every=1) -> dict:
    """The :class:`SparseReducer` options, checked (typed errors naming each one) and normalised.

    Example::

        >>> check_options(min_compress_numel=100.0)["min_compress_numel"]
        100
    """
    if isinstance(op, str) and op.lower() == "adasum" or getattr(op, "__name__", "") == "Adasum":
        raise InvalidConfigError("Adasum cannot be applied to sparse index/value pairs; use op='average' or 'sum'")
    instance(value_dtype, "value_dtype", torch.dtype, "torch.float16", allow_none=True)
    if value_dtype is not None and value_dtype not in VALUE_DTYPES:
        raise InvalidConfigError(f"value_dtype must be one of {list(VALUE_DTYPES)} or None, got {value_dtype}")
    return {"granularity": choice(granularity, "granularity", GRANULARITIES),
            "min_compress_numel": integer(min_compress_numel, "min_compress_numel", minimum=1),
            "value_dtype": value_dtype,
            "nonfinite": choice(nonfinite, "nonfinite", NONFINITE_POLICIES),
            "op": choice(op, "op", OPS),
            "verify_every": integer(verify_every, "verify_every", minimum=0)}


class SparseReducer:
    """Reduces flat gradient buckets sparsely across the ranks of a communicator.

    Args:
        compressor: a :class:`~gradsparse.compressors.Compressor`.
        communicator: a :class:`~gradsparse.comm.Communicator`.
        granularity: ``"parameter"`` (each tensor its own top-k, as in DGC) or
            ``"bucket"`` (one top-k over the bucket's compressed tensors).
        min_compress_numel: tensors with fewer elements are sent whole.
        value_dtype: dtype of the values on the wire (None: the gradient's dtype).
        nonfinite: ``"raise"`` or ``"skip"`` (see module docstring).
        op: ``"average"`` (divide by world size) or ``"sum"``.
        verify_every: compare the ranks' bucket descriptors on every this many
            calls (counted per reducer, so the same on every rank); 0 never does
            for fixed-count methods (one small collective per bucket saved).
    """

    def __init__(
        self,
        compressor: Compressor,
        communicator: Communicator,
        *,
        granularity: str = "parameter",
        min_compress_numel: int = 4096,
        value_dtype: torch.dtype | None = None,
        nonfinite: str = "skip",
        op: str = "average",
        verify_every: int = 1,
    ):
        self.compressor = instance(compressor, "compressor", Compressor, "TopK(0.01)")
        self.communicator = instance(communicator, "communicator", Communicator, "LocalCommunicator()")
        options = check_options(granularity=granularity, min_compress_numel=min_compress_numel,
                                value_dtype=value_dtype, nonfinite=nonfinite, op=op, verify_every=verify_every)
        self.granularity = options["granularity"]
        self.min_compress_numel = options["min_compress_numel"]
        self.value_dtype = options["value_dtype"]
        self.nonfinite = options["nonfinite"]
        self.op = options["op"]
        self.verify_every = options["verify_every"]
        self.memory = compressor.make_memory()
        #: receives NonFiniteGradientError instead of raising it (see :meth:`_on_nonfinite`)
        self.defer_error: Callable[[Exception], None] | None = None
        self._loss_scale: float | None = None
        self._config_crc = _crc((compressor.config(), granularity, self.min_compress_numel, nonfinite, op))
        self._calls = 0
        self._plans: dict[tuple, _Plan] = {}
        self._dense_index: dict[tuple, torch.Tensor] = {}

    # ----------------------------------------------------------------- planning
    def _plan(self, segments: Sequence[Segment], numel: int) -> _Plan:
        signature = tuple(segments)
        plan = self._plans.get(signature)
        if plan is None:
            end = 0
            for s in sorted(segments, key=lambda s: s.offset):
                if s.offset < end or s.numel < 1 or s.offset + s.numel > numel:
                    raise BucketError(f"segment {s} overlaps another or lies outside the bucket of {numel} elements")
                end = s.offset + s.numel
            ordered = tuple(sorted(segments, key=lambda s: s.offset))
            compressed = tuple(s for s in ordered if s.numel >= self.min_compress_numel)
            whole = tuple(s for s in ordered if s.numel < self.min_compress_numel)
            if self.granularity == "parameter":
                groups = tuple((s,) for s in compressed)
            else:
                groups = (compressed,) if compressed else ()
            plan = _Plan(compressed, whole, groups, sum(s.numel for s in whole), _crc(ordered))
            self._plans[signature] = plan
        return plan

    def _whole_index(self, plan: _Plan, device: torch.device) -> torch.Tensor | None:
        if not plan.whole:
            return None
        key = (plan.whole, str(device))
        index = self._dense_index.get(key)
        if index is None:
            index = torch.cat([torch.arange(s.offset, s.offset + s.numel, device=device) for s in plan.whole])
            self._dense_index[key] = index
        return index

    def fixed_count(self, plan: _Plan, step: int, epoch: int) -> int | None:
        """Pairs this bucket sends at this step, if the compressor fixes it."""
        if not self.compressor.fixed_count:
            return None
        return sum(self.compressor.count(sum(s.numel for s in g), step, epoch) for g in plan.groups)

    def _sparse_pays(self, payload_bytes: int, flat: torch.Tensor) -> bool:
        """An allgather moves ``world * payload`` bytes per rank, a ring allreduce about ``2 * n`` elements."""
        return self.communicator.world_size * payload_bytes < 2 * flat.numel() * flat.element_size()

    # ---------------------------------------------------------------- selection
    def _compensate(self, flat: torch.Tensor, plan: _Plan, grad_bound: float) -> dict[str, torch.Tensor]:
        world, scale, average = self.communicator.world_size, self._loss_scale or 1.0, self.op == "average"
        return {s.key: self.memory.compensate(
                    s.key, self.compressor.preprocess(flat[s.offset:s.offset + s.numel], world, scale, average),
                    grad_bound)
                for s in plan.compressed}

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
        return limit if self.op == "average" else limit / self.communicator.world_size

    def _health(self, flat: torch.Tensor, plan: _Plan, wire: torch.dtype) -> tuple[float, int]:
        """``(max|gradient|, HEALTHY | NONFINITE | OVERFLOW)`` of this rank's bucket, before anything changes.

        OVERFLOW: the memory's bound plus the gradient's could reach :meth:`_limit`, so
        compensating could put ``inf`` into the memory or on the wire.
        """
        grad_bound = ops.absmax(flat)
        if not math.isfinite(grad_bound):
            return grad_bound, NONFINITE
        limit = self._limit(flat, wire)
        if grad_bound >= limit or any(self.memory.headroom(s.key, grad_bound) >= limit for s in plan.compressed):
            return grad_bound, OVERFLOW
        return grad_bound, HEALTHY

    def _select(self, v: dict[str, torch.Tensor], plan: _Plan, step: int, epoch: int, wire: torch.dtype) -> list[_Selection]:
        selections = []
        scale = self._loss_scale or 1.0
        for group in plan.groups:
            joined = v[group[0].key] if len(group) == 1 else torch.cat([v[s.key] for s in group])
            chosen = self.compressor.select(joined, step, epoch, scale)
            complete = chosen.numel() == joined.numel()
            starts = torch.tensor([0] + [s.numel for s in group], device=chosen.device).cumsum(0)
            cuts = torch.searchsorted(chosen, starts).tolist()
            values = self.compressor.sent_values(joined, chosen).to(wire).float()
            picked = []
            for i, s in enumerate(group):
                local = chosen[cuts[i]:cuts[i + 1]] - int(starts[i])
                picked.append(_Selection(s, local, values[cuts[i]:cuts[i + 1]], complete))
            bound = self._kept_bound(picked, joined, scale, wire, complete)
            selections += [dataclasses.replace(p, bound=bound) for p in picked]
        return selections

    def _kept_bound(self, picked: list[_Selection], joined: torch.Tensor, scale: float, wire: torch.dtype,
                    complete: bool) -> float:
        """An upper bound of ``|v|`` over what a group keeps after the update: the rounding of what was sent
        on the wire, and what the compressor left (see :meth:`Compressor.unsent_bound`)."""
        sent = torch.cat([p.sent for p in picked]) if len(picked) > 1 else picked[0].sent
        rounding = torch.finfo(wire).eps * ops.absmax(sent) if wire != torch.float32 else 0.0
        if complete and not self.compressor.quantizes:
            return rounding
        unsent = self.compressor.unsent_bound(sent, scale)
        if unsent is None:  # |v - sent| <= max|v| (1 + eps) also where quantized values of v's sign were sent
            return ops.absmax(joined) * (1 + torch.finfo(wire).eps)
        return max(unsent * (1 + torch.finfo(wire).eps), rounding)

    def _select_all(self, v: dict[str, torch.Tensor], wire: torch.dtype, plan: _Plan) -> list[_Selection]:
        selections = []
        for s in plan.compressed:
            sent = v[s.key].to(wire).float()
            rounding = torch.finfo(wire).eps * ops.absmax(sent) if wire != torch.float32 else 0.0
            selections.append(_Selection(s, torch.arange(s.numel, device=sent.device), sent, True, rounding))
        return selections

    # ------------------------------------------------------------------ reduce
    def reduce(
        self,
        flat: torch.Tensor,
        segments: Sequence[Segment] | None,
        step: int,
        epoch: int = 0,
        *,
        force_dense: bool = False,
        on_stats: Callable[[BucketStats], None] | None = None,
        loss_scale: float | None = None,
    ) -> torch.futures.Future:
        """Reduce ``flat`` in place across ranks; returns a Future of ``flat``.

        ``segments`` lists the parameters in the bucket (None: one segment named
        ``"bucket"``). ``force_dense`` selects every coordinate (the hook's first
        iterations). ``loss_scale``: see :meth:`set_loss_scale`. Every rank must
        call this with the same segments, step and epoch, in the same order.
        """
        check_bucket(flat)
        if not flat.is_contiguous():
            raise BucketError("the bucket must be a contiguous tensor")
        flat = flat.view(-1)
        if segments is None:
            segments = [Segment("bucket", 0, flat.numel())]
        plan = self._plan(segments, flat.numel())
        if loss_scale is not None:
            self.set_loss_scale(loss_scale)
        started = time.perf_counter()
        wire = self.value_dtype or flat.dtype
        grad_bound, health = self._health(flat, plan, wire)
        same_size = force_dense or self.compressor.fixed_count
        fixed = sum(s.numel for s in plan.compressed) if force_dense else self.fixed_count(plan, step, epoch)
        self._calls += 1
        control = 0  # bytes of descriptors and sizes this rank sent
        if self.verify_every and (self._calls - 1) % self.verify_every == 0:
            # before compensation: an unhealthy rank anywhere leaves every rank's memory untouched
            mine = [PROTOCOL, self._config_crc, plan.crc, flat.numel(), step, epoch, VALUE_DTYPES[wire],
                    int(force_dense), PayloadLayout(fixed, plan.n_dense, wire).nbytes if same_size else -1, health]
            descriptors = self._collective(lambda: self.communicator.allgather_ints(mine, flat.device), flat, step)
            check_descriptors(descriptors, same_size)
            control += DESCRIPTOR_BYTES
            if any(d[-1] != HEALTHY for d in descriptors):
                return self._skip_unhealthy(flat, plan, started, control, on_stats, [d[-1] for d in descriptors], wire)
        selections: list[_Selection] = []
        if health == HEALTHY:
            v = self._compensate(flat, plan, grad_bound)
            selections = self._select_all(v, wire, plan) if force_dense else self._select(v, plan, step, epoch, wire)
            count = sum(s.local.numel() for s in selections)
        else:
            count = fixed or 0
        nbytes = PayloadLayout(count, plan.n_dense, wire).nbytes
        sizes = None
        if not same_size:
            sizes = self._collective(lambda: self.communicator.exchange_sizes(nbytes, flat.device), flat, step)
            control += 8
        largest = nbytes if sizes is None else max(sizes)
        job = _Job(flat, plan, wire, step, selections, count, health == HEALTHY, started, control, on_stats)
        if not self._sparse_pays(largest, flat):
            return self._allreduce(job)
        return self._allgather(job, sizes, largest)

    def _allgather(self, job: "_Job", sizes: list[int] | None, largest: int) -> torch.futures.Future:
        """Sparse transport: pack this rank's pairs and whole tensors, allgather, unpack-add every rank's."""
        flat, plan, wire = job.flat, job.plan, job.wire
        whole_index = self._whole_index(plan, flat.device)
        dense = flat[whole_index] if whole_index is not None else flat.new_empty(0)
        if job.healthy:
            selections = job.selections
            indices = torch.cat([s.local + s.segment.offset for s in selections]) if selections else \
                torch.empty(0, dtype=torch.int64, device=flat.device)
            values = torch.cat([s.sent for s in selections]) if selections else flat.new_empty(0)
            payload = ops.pack(indices, values, dense, flat.numel(), wire)
        else:
            payload = ops.pack(torch.arange(job.count, device=flat.device), flat.new_zeros(job.count),
                               flat.new_zeros(plan.n_dense), flat.numel(), wire, flags=FLAG_NONFINITE)
        prepared = time.perf_counter() - job.started
        fut = self.communicator.allgather(payload, sizes)
        world = self.communicator.world_size

        def finish(done: torch.futures.Future) -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                payloads = self._collective(done.value, flat, job.step)
                # accumulate in fp32: in the bucket itself when it is fp32, else in a temporary
                out = flat if flat.dtype == torch.float32 else flat.new_empty(flat.numel(), dtype=torch.float32)
                alpha = 1.0 / world if self.op == "average" else 1.0
                flags = ops.unpack_add(payloads, out, wire, whole_index, alpha=alpha, overwrite=True)
                if flags & FLAG_NONFINITE:
                    self._on_nonfinite(flat, "a rank flagged NaN/Inf gradients or an overflow in its payload")
                    return flat
                self._commit(job, out)
                if out is not flat:
                    flat.copy_(out)
                return flat
            finally:
                if job.on_stats is not None:
                    pads = self.communicator.pads_to_largest
                    sent = largest if pads else payload.numel()
                    received = largest * world if pads or sizes is None else sum(sizes)
                    job.on_stats(BucketStats(flat.numel(), job.count, plan.n_dense, sent + job.control,
                                             received + job.control * world, False,
                                             prepared + time.perf_counter() - t0))

        return fut.then(finish)

    def _allreduce(self, job: "_Job") -> torch.futures.Future:
        """Dense transport of the same selection: scatter it into the bucket and allreduce.

        Used when the sparse payload would cost more bytes than an allreduce; the
        algorithm (what is selected, what the memory keeps) does not change. The
        average multiplies by ``1 / world_size`` before the sum, as DDP does, so
        with nothing dropped the result is DDP's bit for bit.
        """
        flat = job.flat
        if not job.healthy:
            flat.fill_(float("nan"))  # every rank must see it: the sum carries the NaN to all of them
        else:
            sent = []
            for s in job.selections:
                view = flat[s.segment.offset:s.segment.offset + s.segment.numel]
                view.zero_()
                view[s.local] = s.sent.to(flat.dtype)
                sent.append(dataclasses.replace(s, sent=view[s.local].float()))
            job = dataclasses.replace(job, selections=sent)
        world = self.communicator.world_size
        if self.op == "average":
            flat.mul_(1.0 / world)
        prepared = time.perf_counter() - job.started
        fut = self.communicator.allreduce_sum(flat)

        def finish(done: torch.futures.Future) -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                self._collective(done.wait, flat, job.step)
                if not job.healthy or not ops.all_finite(flat):
                    self._on_nonfinite(flat, "a rank produced NaN/Inf gradients or an overflow")
                    return flat
                self._commit(job, flat)
                return flat
            finally:
                if job.on_stats is not None:
                    nbytes = flat.numel() * flat.element_size()
                    job.on_stats(BucketStats(flat.numel(), job.count, job.plan.n_dense, nbytes + job.control,
                                             nbytes + job.control * world, True, prepared + time.perf_counter() - t0))

        return fut.then(finish)

    def _commit(self, job: "_Job", out: torch.Tensor) -> None:
        """The reduction arrived: remove what was sent from the memory, post-process whole tensors."""
        for s in job.selections:
            self.memory.update(s.segment.key, s.local, s.sent, complete=s.complete, bound=s.bound)
        for s in job.plan.whole:
            self.memory.finish_whole(s.key, out[s.offset:s.offset + s.numel])

    def _collective(self, collective: Callable, flat: torch.Tensor, step: int):
        """Run or wait for a collective; a failure becomes a :class:`CommunicationError` saying where."""
        try:
            return collective()
        except Exception as err:
            cause = str(err).splitlines()[0] if str(err) else repr(err)
            raise CommunicationError(
                f"gradsparse: a collective for the {flat.numel()}-element bucket at step {step} failed on rank "
                f"{self.communicator.rank}: a peer may have exited, the network failed, or the collective timed "
                f"out (the timeout is set by init_process_group). Cause: {cause}"
            ) from err

    def _skip_unhealthy(self, flat, plan, started, control, on_stats, health: list[int], wire) -> torch.futures.Future:
        """Some rank's bucket is not finite or could overflow (known from the descriptors): nothing was compensated."""
        try:
            self._on_nonfinite(flat, _unhealthy_reason(health, wire))
        finally:
            if on_stats is not None:
                on_stats(BucketStats(flat.numel(), 0, plan.n_dense, control, control * self.communicator.world_size,
                                     False, time.perf_counter() - started))
        return completed_future(flat)

    def _on_nonfinite(self, flat: torch.Tensor, reason: str) -> None:
        """Apply the ``nonfinite`` policy: a NaN bucket (skip), or NonFiniteGradientError (raise).

        With ``defer_error`` set (the DDP hook sets it), a raised error is handed to
        it instead and the bucket is returned as NaN: DDP's reducer is not left
        half-way through a backward pass, and the hook raises the error once
        backward has finished.
        """
        if self.nonfinite == "raise":
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
        return {**self.__dict__, "defer_error": None}  # the adapter that set it sets it again

    # ------------------------------------------------------------ checkpoints
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
