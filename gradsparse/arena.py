"""One bucket's memory laid out like the bucket, so a bucket is compensated and updated in one pass each.

An :class:`Arena` holds, per state name of its :class:`~gradsparse.memory.Memory`
(``"residual"``; ``"momentum"`` and ``"velocity"``), one fp32 tensor of the bucket's
size. Element ``i`` belongs to the bucket's element ``i``, so the kernels read the
gradient, the state and the selection's positions in the same coordinates; the slots
of tensors sent whole are zero and never written. The per-parameter tensors the
memory shows (``memory.state[key][name]``: checkpoints, the hierarchical path's
moves, loss-scale rescaling) are views of these.

A step compensates every run of adjacent compressed parameters in place
(:meth:`Arena.compensate`: one kernel call per run), and the same pass returns the
largest magnitude of each state tensor: the arena keeps them as :attr:`Arena.bounds`,
which is what the next step's overflow check reads (``Memory.headroom``), before it
compensates anything. The update (:meth:`Arena.commit`) only removes what was sent
or zeroes momentum, so the bounds still hold after it.

When the update only zeroes every state tensor at the sent positions, and that pays in
the compensation pass (DGC's momentum and velocity, for a selection sent exactly, from
1/32 of the elements; ``Memory.defers_update``), the arena keeps the positions
(:attr:`Arena.pending`) and the next compensation reads the state as zero there: the state
is read and written once a step instead of twice (docs/kernels.md). It reads them from the
bitmap the selection wrote beside them where there is one (:attr:`Arena.pending_bits`,
``Memory.mask_compensate``), else from the list (``Memory.zero_compensate``). Anything
else that reads the state first applies the pending update (:meth:`Arena.settle`;
``Memory.state`` does so for every reader).

The same pass can also collect the next selection's candidates
(:meth:`Arena.compensate_collecting`): per parameter, every position whose compensated
magnitude is at least a floor a little below the k-th largest magnitude the previous
selection found (:attr:`Arena.floors`, learnt by :meth:`Arena.learn`). When a
parameter's list is complete and holds at least k positions, its exact top-k is the
top-k of the list (the k-th largest is above the floor, and so is every tie of it), and
the selection need not read the parameter again; otherwise the selection reads it as
before. The floors only decide how fast the selection is, never what it selects. The
pass keeps each candidate's value beside its position (the selection ranks those), and
where every piece is a view of the bucket it is one kernel call for the whole bucket, the
tensors sent whole between the parameters skipped (a cap of -1), not one call per piece.

The arena of a layout is rebuilt (the state copied over, the bounds measured) when the
layout is new, after DDP's bucket rebuild, or when something replaced a parameter's
state tensor (a checkpoint load, the hierarchical path moving memory between paths).

Example::

    >>> import torch
    >>> from gradsparse.arena import Arena
    >>> from gradsparse.memory import ResidualMemory
    >>> from gradsparse.reducer import Segment
    >>> m = ResidualMemory()
    >>> arena = Arena.of(m, (Segment("w", 0, 3),), 3, torch.device("cpu"))
    >>> arena.compensate([(0, torch.tensor([1.0, -5.0, 2.0]))]).tolist(), arena.bounds
    ([5.0, 5.0], [5.0])
    >>> arena.commit(torch.tensor([1]), torch.tensor([-5.0]), masked=torch.tensor([1]))
    >>> m.state["w"]["residual"].tolist()
    [1.0, 0.0, 2.0]
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from . import ops
from .errors import StateMismatchError


#: a parameter's next floor, as a fraction of the k-th largest magnitude predicted for it (this step's times its
#: growth since the last): where it starts, and the range it adapts in (up by FLOOR_UP when the list was cut at
#: its cap, down by FLOOR_DOWN when it held fewer than k)
FLOOR_START, FLOOR_LOW, FLOOR_HIGH, FLOOR_UP, FLOOR_DOWN = 0.9, 0.3, 2.0, 1.15, 0.8
#: the growth of the k-th magnitude from one step to the next is taken within these bounds
GROWTH_LOW, GROWTH_HIGH = 0.25, 4.0
#: lists shorter than LIST_LOW x k (or longer than LIST_HIGH x k) nudge the fraction down (up) by these factors
LIST_LOW, LIST_HIGH, FLOOR_NUDGE_DOWN, FLOOR_NUDGE_UP = 1.5, 6.0, 0.93, 1.03


@dataclasses.dataclass(frozen=True)
class _Cuts:
    """The pending positions of a compensation and, per piece ``i``, its slice ``[bounds[2i], bounds[2i+1])``."""

    bounds: list[int]
    pending: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Selection candidates collected by a compensation pass (:meth:`Arena.compensate_collecting`).

    Per compressed segment of the arena: ``counts[s]`` positions had a magnitude at or above the
    segment's floor; ``positions`` (int64, bucket coordinates, ascending) holds the first
    ``min(counts[s], caps[s])`` of each, segment after segment, and ``values`` (float32) the compensated
    gradient at each of them. A segment's list is complete when ``counts[s] <= caps[s]``.
    """

    positions: torch.Tensor
    counts: torch.Tensor
    caps: torch.Tensor
    values: torch.Tensor


class Arena:
    """The state of one bucket's parameters, laid out like the bucket (see the module docstring).

    Args:
        memory: the :class:`~gradsparse.memory.Memory` whose state this holds.
        segments: the parameters (``Segment``: key, offset, numel), ascending offsets.
        numel: the bucket's size.
        device: where the bucket lives.
        names: the state tensors (default: ``memory.names``, the compressed parameters' state).
        compact: lay the segments out one after the other (``numel`` is then ignored) instead of
            at their bucket offsets: the whole tensors' DGC momentum (``memory.whole_names``).
    """

    def __init__(self, memory, segments: Sequence, numel: int, device: torch.device,
                 names: tuple[str, ...] | None = None, compact: bool = False):
        self.memory = memory
        self.segments = tuple(segments)
        self.names = memory.names if names is None else names
        starts, at = [], 0
        for s in self.segments:
            starts.append(at if compact else s.offset)
            at += s.numel
        self.numel = at if compact else numel
        self.compact = compact
        self.state = tuple(torch.zeros(self.numel, dtype=torch.float32, device=device) for _ in self.names)
        for s, a in zip(self.segments, starts):
            slot = memory._state.get(s.key, {})  # the arenas holding these keys were settled (Arena.of)
            for name, buf in zip(self.names, self.state):
                old = slot.get(name)
                if old is None:
                    continue
                if old.numel() != s.numel:
                    raise StateMismatchError(f"state {s.key!r}.{name} has {old.numel()} elements, the gradient has "
                                             f"{s.numel}")
                buf[a:a + s.numel].copy_(old.reshape(-1))
        #: per state tensor, an upper bound of its largest magnitude (exact after each compensation)
        self.bounds = [ops.absmax(buf) for buf in self.state]
        #: per segment, the magnitude from which the next compensation collects selection candidates (+inf: none)
        self.floors = torch.full((len(self.segments),), math.inf, dtype=torch.float64, device=device)
        self._fraction = torch.full_like(self.floors, FLOOR_START)  # floor / the predicted k-th magnitude
        self._last_kth = self.floors.clone()  # the k-th magnitudes the last selection found (+inf: none yet)
        #: segments selected from their candidates alone, and segments that collected candidates (since built)
        self.candidate_hits = self.candidate_tries = 0
        #: positions (int64, ascending, on the CPU) where every state tensor is still to be zeroed: the last
        #: update, deferred into the next compensation pass (None: nothing pending)
        self.pending: torch.Tensor | None = None
        #: the same positions as a bitmap of the bucket (ops.segmented_topk_select_pack's bits), when the selection
        #: wrote one: the compensation then reads it (Memory.mask_compensate) instead of the list
        self.pending_bits: torch.Tensor | None = None
        self._offsets = [s.offset for s in self.segments]
        self._piece_segments: dict[tuple[int, int], tuple[int, int, torch.Tensor]] = {}
        self._table: tuple[torch.Tensor, torch.Tensor, int] | None = None  # see _bucket_table
        self._views: list[torch.Tensor] = []
        for s, a in zip(self.segments, starts):
            slot = memory._state.setdefault(s.key, {})
            for name, buf in zip(self.names, self.state):
                view = buf[a:a + s.numel]
                slot[name] = view
                self._views.append(view)

    @classmethod
    def of(cls, memory, segments: Sequence, numel: int, device: torch.device, names: tuple[str, ...] | None = None,
           compact: bool = False) -> Arena:
        """The memory's arena for this layout: the cached one if the per-key state is still its own, else a new
        one built from the per-key state (older arenas holding any of these keys are dropped)."""
        layout = (tuple(segments), numel, str(device), names, compact)
        arena = memory.arenas.get(layout)
        if arena is not None and arena._valid():
            return arena
        keys = {s.key for s in layout[0]}
        for other, old in list(memory.arenas.items()):
            if keys.intersection(s.key for s in old.segments):
                old.settle()  # its buffers are what the new arena copies
                del memory.arenas[other]
        arena = cls(memory, segments, numel, device, names, compact)
        memory.arenas[layout] = arena
        return arena

    def _valid(self) -> bool:
        state, views = self.memory._state, iter(self._views)
        return all(state.get(s.key, {}).get(name) is next(views) for s in self.segments for name in self.names)

    def compensate(self, pieces: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Compensate ``pieces`` (bucket offset, gradient; together every segment) into the state, in place.

        Returns float64 ``[max|gradient|, max|state|, ...]`` over the pieces (NaN where a NaN
        is) and keeps the state maxima as :attr:`bounds`. The compensated gradient is then
        :attr:`selectable`.
        """
        maxima = []
        bits = self.pending_bits
        cuts = self._pending_cuts(pieces)
        for i, (start, grad) in enumerate(pieces):
            views = tuple(b[start:start + grad.numel()] for b in self.state)
            if cuts is not None and cuts.bounds[2 * i] < cuts.bounds[2 * i + 1]:
                if bits is not None:
                    maxima.append(self.memory.mask_compensate(views, grad, bits, start))
                    continue
                zeroed = cuts.pending[cuts.bounds[2 * i]:cuts.bounds[2 * i + 1]]
                maxima.append(self.memory.zero_compensate(views, grad, zeroed, start))
            else:
                maxima.append(self.memory.compensate_into(views, grad, views))
        if not maxima:
            return torch.zeros(1 + len(self.state), dtype=torch.float64)
        total = maxima[0] if len(maxima) == 1 else torch.stack(maxima).amax(0)
        self.bounds = total.tolist()[1:]  # the pieces cover every segment: exact
        return total

    def _pending_cuts(self, pieces: Sequence[tuple[int, torch.Tensor]]) -> _Cuts | None:
        """Take :attr:`pending` for this compensation: where each piece's positions start and end in it (None when
        nothing is pending). Positions outside every piece (none when the pieces cover every segment, as the
        reducer's do) are zeroed here, first, with the whole list."""
        pending, self.pending, self.pending_bits = self.pending, None, None
        if pending is None:
            return None
        bounds = [b for start, grad in pieces for b in (start, start + grad.numel())]
        cuts = torch.searchsorted(pending, torch.tensor(bounds, dtype=torch.int64)).tolist()
        if sum(cuts[1::2]) - sum(cuts[0::2]) != pending.numel():
            ops.index_zero_(self.state, pending)
            return None
        return _Cuts(cuts, pending)

    def settle(self) -> None:
        """Apply the pending update now (:attr:`pending`): before anything but the compensation reads the state."""
        if self.pending is not None:
            pending, self.pending, self.pending_bits = self.pending, None, None
            ops.index_zero_(self.state, pending)

    def compensate_collecting(self, pieces: Sequence[tuple[int, torch.Tensor]], caps: torch.Tensor,
                              bucket: torch.Tensor | None = None) -> Candidates:
        """:meth:`compensate`, and in the same pass every segment's selection candidates at its :attr:`floors`,
        keeping at most ``caps[s]`` (int64, per segment) positions each. Needs ``memory.collects_candidates`` and
        pieces that each cover whole segments (runs of adjacent ones, as the reducer's are).

        ``bucket``: the gradient laid out like the arena, when every piece is a view of it (nothing replaced a
        parameter's gradient): then one kernel call covers the whole bucket, the tensors between the segments
        (sent whole) skipped, instead of one call per piece. The same values, bounds and candidates."""
        self.settle()  # the collecting kernels zero nothing: they run at small k, where the update costs little
        if bucket is not None and not self.compact and bucket.numel() == self.numel:
            return self._compensate_bucket(bucket, caps)
        maxima, positions, counts, values = [], [], [], []
        for start, grad in pieces:
            first, end, offsets = self._segments_of(start, grad.numel())
            views = tuple(b[start:start + grad.numel()] for b in self.state)
            m, p, c, x = self.memory.compensate_candidates(views, grad, views, offsets, self.floors[first:end],
                                                           caps[first:end])  # p: in the bucket's coordinates
            maxima.append(m)
            positions.append(p)
            counts.append(c)
            values.append(x)
        self.bounds = (maxima[0] if len(maxima) == 1 else torch.stack(maxima).amax(0)).tolist()[1:]
        return Candidates(torch.cat(positions), torch.cat(counts), caps, torch.cat(values))

    def _compensate_bucket(self, bucket: torch.Tensor, caps: torch.Tensor) -> Candidates:
        """:meth:`compensate_collecting` of the whole bucket in one call: every segment and every gap between
        them (a cap of -1: the kernel skips it) in one table."""
        offsets, slots, n = self._bucket_table()
        floors = torch.full((n,), math.inf, dtype=torch.float64).index_copy_(0, slots, self.floors)
        every_cap = torch.full((n,), -1, dtype=torch.int64).index_copy_(0, slots, caps)
        m, p, c, x = self.memory.compensate_candidates(self.state, bucket, self.state, offsets, floors, every_cap)
        self.bounds = m.tolist()[1:]
        return Candidates(p, c.index_select(0, slots), caps, x)

    def _bucket_table(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The offsets of every segment and of every gap between them over the whole arena, where the
        segments lie in that list (int64), and its length; built once."""
        if self._table is None:
            bounds, slots = [0], []
            for s in self.segments:
                if s.offset > bounds[-1]:
                    bounds.append(s.offset)  # a gap: tensors sent whole
                slots.append(len(bounds) - 1)
                bounds.append(s.offset + s.numel)
            if bounds[-1] < self.numel:
                bounds.append(self.numel)
            self._table = (torch.tensor(bounds, dtype=torch.int64), torch.tensor(slots, dtype=torch.int64),
                           len(bounds) - 1)
        return self._table

    def _segments_of(self, start: int, numel: int) -> tuple[int, int, torch.Tensor]:
        """The segments ``[first, end)`` a piece ``[start, start + numel)`` covers, and their offsets in the bucket
        (the compensation kernels then report the candidates' positions in the bucket)."""
        key = (start, numel)
        hit = self._piece_segments.get(key)
        if hit is None:
            first = bisect.bisect_left(self._offsets, start)
            end = bisect.bisect_left(self._offsets, start + numel)
            bounds = self._offsets[first:end] + [start + numel]
            last = self.segments[end - 1] if end > first else None
            if bounds[0] != start or last is None or last.offset + last.numel != start + numel:
                raise ValueError(f"piece [{start}, {start + numel}) does not cover whole segments of this arena")
            hit = (first, end, torch.tensor(bounds, dtype=torch.int64, device=self.floors.device))
            self._piece_segments[key] = hit
        return hit

    def learn(self, kth: torch.Tensor, candidates: Candidates | None, ks: torch.Tensor) -> None:
        """Set the next :attr:`floors` from this selection's ``kth`` (float64, the k-th largest magnitude per
        segment) and what the candidates were (None: none were collected); ``ks`` the counts selected.

        The floor predicts the next k-th magnitude from this one and its growth since the last
        selection (DGC's accumulation makes it grow step after step), times a fraction that rises
        when a list was cut at its cap, falls when a list held fewer than k, and is nudged to keep the
        lists within ``LIST_LOW``-``LIST_HIGH`` x k; segments with no cap collect nothing."""
        # numpy on the CPU tensors' memory (candidates are collected on the CPU only): a few dozen float64 values
        # per bucket, where each torch op's dispatch costs more than its arithmetic (54 parameters: 23 us a call,
        # against 68 with torch ops, timed alone)
        kth_, ks_ = kth.numpy(), ks.numpy()
        fraction = self._fraction.numpy()
        caps = None
        if candidates is not None:
            counts, caps = candidates.counts.numpy(), candidates.caps.numpy()
            finite = np.isfinite(self.floors.numpy())
            cut = counts > caps
            short = (counts < ks_) & finite
            self.candidate_hits += int(np.count_nonzero((counts >= ks_) & ~cut & (ks_ > 0)))
            self.candidate_tries += int(np.count_nonzero(caps > 0))
            # steer the count into [LIST_LOW, LIST_HIGH] x k: a miss either way costs the selection's full read
            step = np.where(cut, FLOOR_UP, np.where(short, FLOOR_DOWN, 1.0))
            step = np.where(~cut & (counts > LIST_HIGH * ks_), FLOOR_NUDGE_UP, step)
            step = np.where(~short & (counts < LIST_LOW * ks_) & finite, FLOOR_NUDGE_DOWN, step)
            fraction = np.clip(fraction * step, FLOOR_LOW, FLOOR_HIGH)
            self._fraction = torch.from_numpy(fraction)
        last = self._last_kth.numpy()
        known = np.isfinite(last) & (last > 0) & np.isfinite(kth_)
        growth = np.sqrt(np.clip(np.divide(kth_, last, out=np.ones_like(kth_), where=known), GROWTH_LOW, GROWTH_HIGH))
        self._last_kth = kth
        floors = kth_ * growth * fraction
        self.floors = torch.from_numpy(floors if caps is None else np.where(caps > 0, floors, math.inf))

    def rescale(self, factor: float) -> None:
        """The state was multiplied by ``factor``: so are the bounds and floors."""
        self.bounds = [b * abs(factor) for b in self.bounds]
        self.floors = self.floors * abs(factor)
        self._last_kth = self._last_kth * abs(factor)

    @property
    def selectable(self) -> torch.Tensor:
        """The compensated gradient (the last state tensor), laid out like the bucket."""
        return self.state[-1]

    def commit(self, positions: torch.Tensor, sent: torch.Tensor, masked: torch.Tensor | None,
               exact: bool = False, bits: torch.Tensor | None = None) -> None:
        """The reduction landed: remove what was sent (see ``Memory.apply_sent``). Sent coordinates keep at
        most their rounding on the wire and masking zeroes: :attr:`bounds` still hold.

        An update that only zeroes every state tensor at ``positions`` (``Memory.defers_update``) is kept as
        :attr:`pending` on the CPU, for the next compensation pass, with ``bits`` (the same positions as the
        selection's bitmap of the bucket, when it wrote one) as :attr:`pending_bits`."""
        self.settle()
        if positions.device.type == "cpu" and self.memory.defers_update(self.state, positions, masked, exact):
            self.pending, self.pending_bits = positions, bits
            return
        self.memory.apply_sent(self.state, positions, sent, masked, exact)
