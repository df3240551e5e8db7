"""The protocol every compressor follows.

A compressor decides *which* coordinates of a compensated gradient go out; the
memory it creates decides *what* is compensated. Compressors are pure tensor
code: no torch.distributed, Horovod or MPI.

Example::

    >>> import torch
    >>> from gradsparse import TopK
    >>> c = TopK(0.5)
    >>> c.select(torch.tensor([0.1, 4.0, -3.0, 0.2]), step=10, epoch=0).tolist()
    [1, 2]
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import torch

from .. import ops
from .._validate import boolean, real
from ..errors import ConfigTypeError
from ..memory import Memory, ResidualMemory


def check_ratio(ratio: float, what: str = "ratio") -> float:
    """Return ``ratio`` as a float if it is a number in (0, 1]; else ConfigTypeError / InvalidConfigError."""
    return real(ratio, what, low=0.0, high=1.0, low_open=True)


def segment_table(ranges: Sequence[tuple[int, int]], counts: Sequence[int],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets, ks)`` for :func:`gradsparse.ops.segmented_topk_indices` from ascending ``(start, numel)``
    ranges and their counts: the gaps between ranges become segments that keep nothing.

    >>> offsets, ks = segment_table([(2, 3), (5, 2), (9, 4)], [1, 2, 3], torch.device("cpu"))
    >>> offsets.tolist(), ks.tolist()
    ([2, 5, 7, 9, 13], [1, 2, 0, 3])
    """
    bounds, ks = [ranges[0][0]] if ranges else [0], []
    for (start, numel), k in zip(ranges, counts, strict=True):
        if start != bounds[-1]:
            bounds.append(start)
            ks.append(0)
        bounds.append(start + numel)
        ks.append(k)
    return (torch.tensor(bounds, dtype=torch.int64, device=device),
            torch.tensor(ks, dtype=torch.int64, device=device))


def range_slots(ranges: Sequence[tuple[int, int]]) -> list[int]:
    """Where each range's own segment is among :func:`segment_table`'s segments (the gaps come between).

    >>> range_slots([(2, 3), (5, 2), (9, 4)])
    [0, 1, 3]
    """
    slots, at, end = [], 0, ranges[0][0] if ranges else 0
    for start, numel in ranges:
        at += start != end
        slots.append(at)
        at += 1
        end = start + numel
    return slots


def count_for(ratio: float, numel: int) -> int:
    """k = max(1, ceil(ratio * n)), never more than n."""
    return min(numel, max(1, math.ceil(ratio * numel)))


class Compressor(abc.ABC):
    """Selects coordinates to send from a compensated fp32 gradient.

    Attributes:
        fixed_count: True when every rank sends the same number of pairs for a
            given tensor size and step, so no count exchange is needed.
        quantizes: True when :meth:`sent_values` sends something other than the
            compensated values themselves (so sending every coordinate is not dense).
        error_feedback: keep what was not sent and add it to the next gradient.
    """

    name: str = "base"
    fixed_count: bool = True
    quantizes: bool = False
    #: whether :meth:`select_segments_from` uses the candidates a compensation pass collected
    selects_from_candidates: bool = False
    #: whether :meth:`select_segments_packed` writes the payload while it selects
    packs_selection: bool = False

    def __init__(self, error_feedback: bool = True):
        self.error_feedback = boolean(error_feedback, "error_feedback")

    @property
    def supports_sparse_gradients(self) -> bool:
        """Whether sparse gradients (``nn.Embedding(sparse=True)``) may bypass the memory.

        They are already index/value pairs and are averaged as they are, with no
        memory; a compressor whose memory changes the update (DGC's momentum) says False.
        """
        return True

    def make_memory(self) -> Memory:
        """The compensation state this compressor needs."""
        return ResidualMemory() if self.error_feedback else Memory()

    def preprocess(self, grad: torch.Tensor, world_size: int, loss_scale: float = 1.0,
                   average: bool = True) -> torch.Tensor:
        """Transform a fresh local gradient before compensation (DGC clips here).

        ``loss_scale`` is the factor the gradient carries (AMP's GradScaler), so
        norms can be compared unscaled; ``average`` says whether the ranks'
        gradients will be averaged (True) or summed.
        """
        return grad

    def ratio(self, step: int, epoch: int) -> float | None:
        """Target density at this point of training; None when it is not fixed."""
        return None

    def count(self, numel: int, step: int, epoch: int) -> int | None:
        """Pairs sent for a tensor of ``numel`` elements; None when data-dependent."""
        ratio = self.ratio(step, epoch)
        return None if ratio is None else count_for(ratio, numel)

    @abc.abstractmethod
    def select(self, v: torch.Tensor, step: int, epoch: int, loss_scale: float = 1.0) -> torch.Tensor:
        """Positions to send (int64, ascending) of the flat fp32 tensor ``v``.

        ``v`` carries the factor ``loss_scale`` (AMP); absolute thresholds scale with it.
        """

    def select_segments(self, v: torch.Tensor, ranges: Sequence[tuple[int, int]], step: int, epoch: int,
                        loss_scale: float = 1.0) -> torch.Tensor:
        """Each range's own :meth:`select`, in one call: positions in ``v`` (int64, ascending).

        ``ranges`` are ``(start, numel)`` slices of ``v``, ascending and not overlapping
        (a bucket's parameters). The default selects range after range; top-k methods
        override it with one kernel call for all of them (the same positions).

        >>> import torch
        >>> from gradsparse import Threshold
        >>> Threshold(1.0).select_segments(torch.tensor([2.0, 0.1, 0.0, -3.0]), [(0, 2), (3, 1)], 0, 0).tolist()
        [0, 3]
        """
        parts = [self.select(v[a:a + n], step, epoch, loss_scale) + a for a, n in ranges]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=v.device)

    def select_segments_from(self, v: torch.Tensor, ranges: Sequence[tuple[int, int]], step: int, epoch: int,
                             candidates, loss_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`select_segments` (the same positions) helped by the ``candidates``
        (:class:`gradsparse.arena.Candidates`, one entry per range) the compensation pass collected, and the
        k-th largest magnitude of each range (float64), from which the next floors are set. Only where
        :attr:`selects_from_candidates`."""
        raise NotImplementedError(f"{type(self).__name__} does not select from candidates")

    def select_segments_packed(self, v: torch.Tensor, ranges: Sequence[tuple[int, int]], step: int, epoch: int,
                               dense: torch.Tensor, numel: int, out: torch.Tensor,
                               loss_scale: float = 1.0, bits: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`select_segments` (the same positions, returned) and the payload of those positions with their
        values of ``v`` sent as they are, fp32, and the ``dense`` section, for a bucket of ``numel`` elements,
        written into ``out`` (the bytes of :func:`gradsparse.ops.pack_gathered`); with ``bits``, the positions
        also as a bitmap of ``v`` (:func:`gradsparse.ops.segmented_topk_select_pack`). Only where
        :attr:`packs_selection`."""
        raise NotImplementedError(f"{type(self).__name__} does not write the payload while it selects")

    def sent_values(self, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The fp32 values sent for ``positions`` (the output of :meth:`select`) of ``v``.

        The default sends the compensated values themselves; a quantizing method
        (:class:`~gradsparse.PerSignTopK`) sends reconstruction values instead. The
        memory keeps ``v - sent`` either way.

        >>> import torch
        >>> from gradsparse import TopK
        >>> TopK(0.5).sent_values(torch.tensor([0.1, 4.0, -3.0]), torch.tensor([1, 2])).tolist()
        [4.0, -3.0]
        """
        return v.index_select(0, positions)

    def optimizer_rule(self) -> str | None:
        """What this compressor requires of the optimizer, in words; None when it accepts any.

        Adapters log it when they cannot check the optimizer (no ``optimizer=`` given).

        >>> from gradsparse import DGC, TopK
        >>> TopK(0.01).optimizer_rule() is None, DGC(0.01).optimizer_rule()[:34]
        (True, 'DGC(momentum=0.9) applies momentum')
        """
        return None

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise :class:`~gradsparse.errors.IncompatibleOptimizerError` if ``optimizer``
        cannot apply what this compressor delivers. The base accepts any optimizer.

        >>> import torch
        >>> from gradsparse import TopK
        >>> TopK(0.01).check_optimizer(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))]))
        """

    def config(self) -> dict:
        """Plain-data description, stored in checkpoints and compared on load."""
        return {"name": self.name, "error_feedback": self.error_feedback}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def compress(self, *args, **kwargs):
        """Refuse the call Horovod makes on ``compression=``: a compressor is not a Horovod compression.

        ``hvd.DistributedOptimizer(opt, compression=DGC(0.001))`` gets here at the first backward
        (Horovod calls ``compression.compress(grad)``); the fix is a ``SparseCompression`` around it.
        """
        name = type(self).__name__
        raise ConfigTypeError(f"{name}(...) is a gradsparse compressor, not a Horovod compression: pass "
                              f"compression=gradsparse.horovod.SparseCompression({name}(...), "
                              "named_parameters=model.named_parameters()), preferably to "
                              "gradsparse.horovod.DistributedOptimizer (docs/horovod.md)")


class ExactTopK(Compressor):
    """A compressor that sends each tensor's exact top-k by magnitude (``k`` from :meth:`count`), found by
    sampling ``sample_ratio`` of it (the sample's start is drawn from ``_generator``; the selected set
    depends on neither): :class:`~gradsparse.TopK` and :class:`~gradsparse.DGC`.

    >>> from gradsparse import TopK
    >>> TopK(0.5).select_segments(torch.tensor([3.0, -1.0, 0.5, 0.0, -2.0, 1.0]), [(0, 2), (3, 3)], 0, 0).tolist()
    [0, 4, 5]
    """

    sample_ratio: float = 0.01
    selects_from_candidates = True
    packs_selection = True

    def __init__(self, error_feedback: bool = True):
        super().__init__(error_feedback)
        self._generator = torch.Generator().manual_seed(0)
        self._table_cache: dict[tuple, tuple] = {}

    def select(self, v, step, epoch, loss_scale=1.0):
        return ops.sampled_topk_indices(v, self.count(v.numel(), step, epoch), self.sample_ratio, self._generator)

    def select_segments(self, v, ranges, step, epoch, loss_scale=1.0):
        offsets, ks, _ = self._tables(ranges, step, epoch, v.device)
        return ops.segmented_topk_indices(v, offsets, ks, self.sample_ratio, self._generator)

    def select_segments_packed(self, v, ranges, step, epoch, dense, numel, out, loss_scale=1.0, bits=None):
        offsets, ks, _ = self._tables(ranges, step, epoch, v.device)
        return ops.segmented_topk_select_pack(v, offsets, ks, dense, numel, out, self.sample_ratio, self._generator,
                                              bits=bits)

    def select_segments_from(self, v, ranges, step, epoch, candidates, loss_scale=1.0):
        offsets, ks, slots = self._tables(ranges, step, epoch, v.device)
        if slots is None:  # no gaps between the ranges: the candidates' tables are the kernel's
            counts, caps = candidates.counts, candidates.caps
        else:
            counts = torch.zeros_like(ks).index_copy_(0, slots, candidates.counts)
            caps = torch.zeros_like(ks).index_copy_(0, slots, candidates.caps)
        positions, kth = ops.segmented_topk_candidates(v, offsets, ks, candidates.positions, counts, caps,
                                                       self.sample_ratio, self._generator, candidates.values)
        return positions, kth if slots is None else kth.index_select(0, slots)

    def _tables(self, ranges, step, epoch, device):
        """:func:`segment_table` of ``ranges`` at this step's k, and :func:`range_slots` (None: no gaps), cached
        per ranges and density (the reducer asks for the same few bucket layouts every step)."""
        key = (tuple(ranges), self.ratio(step, epoch), str(device))
        hit = self._table_cache.get(key)
        if hit is None:
            offsets, ks = segment_table(ranges, [self.count(n, step, epoch) for _, n in ranges], device)
            slots = range_slots(ranges)
            gaps = slots != list(range(len(slots)))
            hit = (offsets, ks, torch.tensor(slots, dtype=torch.int64, device=device) if gaps else None)
            if len(self._table_cache) > 256:  # a schedule of densities and rebuilt buckets: keep it bounded
                self._table_cache.clear()
            self._table_cache[key] = hit
        return hit
