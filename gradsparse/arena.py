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

from collections.abc import Sequence

import torch

from . import ops
from .errors import StateMismatchError


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
        self.state = tuple(torch.zeros(self.numel, dtype=torch.float32, device=device) for _ in self.names)
        for s, a in zip(self.segments, starts):
            slot = memory.state.get(s.key, {})
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
        self._views: list[torch.Tensor] = []
        for s, a in zip(self.segments, starts):
            slot = memory.state.setdefault(s.key, {})
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
                del memory.arenas[other]
        arena = cls(memory, segments, numel, device, names, compact)
        memory.arenas[layout] = arena
        return arena

    def _valid(self) -> bool:
        state, views = self.memory.state, iter(self._views)
        return all(state.get(s.key, {}).get(name) is next(views) for s in self.segments for name in self.names)

    def compensate(self, pieces: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Compensate ``pieces`` (bucket offset, gradient; together every segment) into the state, in place.

        Returns float64 ``[max|gradient|, max|state|, ...]`` over the pieces (NaN where a NaN
        is) and keeps the state maxima as :attr:`bounds`. The compensated gradient is then
        :attr:`selectable`.
        """
        maxima = []
        for start, grad in pieces:
            views = tuple(b[start:start + grad.numel()] for b in self.state)
            maxima.append(self.memory.compensate_into(views, grad, views))
        if not maxima:
            return torch.zeros(1 + len(self.state), dtype=torch.float64)
        total = maxima[0] if len(maxima) == 1 else torch.stack(maxima).amax(0)
        self.bounds = total.tolist()[1:]  # the pieces cover every segment: exact
        return total

    @property
    def selectable(self) -> torch.Tensor:
        """The compensated gradient (the last state tensor), laid out like the bucket."""
        return self.state[-1]

    def commit(self, positions: torch.Tensor, sent: torch.Tensor, masked: torch.Tensor | None) -> None:
        """The reduction landed: remove what was sent (see ``Memory.apply_sent``). Sent coordinates keep at
        most their rounding on the wire and masking zeroes: :attr:`bounds` still hold."""
        self.memory.apply_sent(self.state, positions, sent, masked)
