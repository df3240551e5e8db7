"""One bucket's memory laid out like the bucket, double-buffered, so a bucket is compensated in one pass.

An :class:`Arena` holds, per state name of its :class:`~gradsparse.memory.Memory`
(``"residual"``; ``"momentum"`` and ``"velocity"``), two fp32 tensors of the
bucket's size: the *current* state and a *scratch* one. Element ``i`` belongs to
the bucket's element ``i``, so the kernels read the gradient, the state and the
selection's positions in the same coordinates; the slots of tensors sent whole are
zero and never written. The per-parameter tensors the memory shows
(``memory.state[key][name]``: checkpoints, the hierarchical path's moves, loss-scale
rescaling) are views of the current state.

A step compensates every run of adjacent compressed parameters from the current
state into the scratch (:meth:`Arena.compensate`: one kernel call per run, which
also returns the largest magnitudes for the health check), the ranks compare their
health, the selection reads the scratch, and only when the reduction lands does the
scratch become the current state (:meth:`Arena.commit`, which also removes what was
sent). A bucket that is skipped (NaN/Inf, overflow, a failed collective) leaves the
state exactly as it was, at the cost of a second copy of the state.

The arena of a layout is rebuilt (the state copied over) when the layout is new,
after DDP's bucket rebuild, or when something replaced a parameter's state tensor
(a checkpoint load, the hierarchical path moving memory between paths).

Example::

    >>> import torch
    >>> from gradsparse.arena import Arena
    >>> from gradsparse.memory import ResidualMemory
    >>> from gradsparse.reducer import Segment
    >>> m = ResidualMemory()
    >>> arena = Arena.of(m, (Segment("w", 0, 3),), 3, torch.device("cpu"))
    >>> arena.compensate([(0, torch.tensor([1.0, -5.0, 2.0]))]).tolist()
    [5.0, 5.0]
    >>> arena.commit(torch.tensor([1]), torch.tensor([-5.0]), masked=torch.tensor([1]))
    >>> m.state["w"]["residual"].tolist()
    [1.0, 0.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import StateMismatchError


class Arena:
    """The state of one bucket's compressed parameters, laid out like the bucket (see the module docstring).

    Args:
        memory: the :class:`~gradsparse.memory.Memory` whose state this holds.
        segments: the compressed parameters (``Segment``: key, offset, numel), ascending offsets.
        numel: the bucket's size.
        device: where the bucket lives.
    """

    def __init__(self, memory, segments: Sequence, numel: int, device: torch.device):
        self.memory = memory
        self.segments = tuple(segments)
        self.numel = numel
        names = memory.names
        self.current = tuple(torch.zeros(numel, dtype=torch.float32, device=device) for _ in names)
        self.scratch = tuple(torch.zeros(numel, dtype=torch.float32, device=device) for _ in names)
        for s in self.segments:
            slot = memory.state.get(s.key, {})
            for name, buf in zip(names, self.current):
                old = slot.get(name)
                if old is None:
                    continue
                if old.numel() != s.numel:
                    raise StateMismatchError(f"state {s.key!r}.{name} has {old.numel()} elements, the gradient has "
                                             f"{s.numel}")
                buf[s.offset:s.offset + s.numel].copy_(old.reshape(-1))
        self._views: list[torch.Tensor] = []
        self._bind()

    @classmethod
    def of(cls, memory, segments: Sequence, numel: int, device: torch.device) -> Arena:
        """The memory's arena for this layout: the cached one if the per-key state is still its own, else a new
        one built from the per-key state (older arenas holding any of these keys are dropped)."""
        layout = (tuple(segments), numel, str(device))
        arena = memory.arenas.get(layout)
        if arena is not None and arena._valid():
            return arena
        keys = {s.key for s in layout[0]}
        for other, old in list(memory.arenas.items()):
            if keys.intersection(s.key for s in old.segments):
                del memory.arenas[other]
        arena = cls(memory, segments, numel, device)
        memory.arenas[layout] = arena
        return arena

    def _bind(self) -> None:
        """Point the memory's per-key tensors at the current state."""
        self._views = []
        for s in self.segments:
            slot = self.memory.state.setdefault(s.key, {})
            for name, buf in zip(self.memory.names, self.current):
                view = buf[s.offset:s.offset + s.numel]
                slot[name] = view
                self._views.append(view)

    def _valid(self) -> bool:
        state, names, views = self.memory.state, self.memory.names, iter(self._views)
        return all(state.get(s.key, {}).get(name) is next(views) for s in self.segments for name in names)

    def compensate(self, pieces: Sequence[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Compensate ``pieces`` (bucket offset, gradient) from the current state into the scratch.

        Returns float64 ``[max|gradient|, max|scratch state|, ...]`` over the pieces (NaN
        where a NaN is). The compensated gradient is then :attr:`selectable`.
        """
        maxima = []
        for start, grad in pieces:
            end = start + grad.numel()
            maxima.append(self.memory.compensate_into(tuple(b[start:end] for b in self.current), grad,
                                                      tuple(b[start:end] for b in self.scratch)))
        if not maxima:
            return torch.zeros(1 + len(self.current), dtype=torch.float64)
        return maxima[0] if len(maxima) == 1 else torch.stack(maxima).amax(0)

    @property
    def selectable(self) -> torch.Tensor:
        """The compensated gradient (the scratch's last state tensor), laid out like the bucket."""
        return self.scratch[-1]

    def commit(self, positions: torch.Tensor, sent: torch.Tensor, masked: torch.Tensor | None) -> None:
        """The reduction landed: the scratch becomes the state, less what was sent (see ``Memory.apply_sent``)."""
        self.current, self.scratch = self.scratch, self.current
        self._bind()
        self.memory.apply_sent(self.current, positions, sent, masked)
