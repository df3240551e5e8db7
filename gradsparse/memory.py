"""Per-parameter compensation state: error-feedback residuals and DGC momentum.

A memory turns a fresh gradient ``g`` into the tensor a compressor selects from
(``compensate``) and, once the selection has been sent, removes what was sent
(``update``). State is kept in fp32 whatever the gradient dtype, one flat tensor
per parameter key, so DDP's bucket rebuilds cannot mix it up.

Invariant: after ``update``, ``state + sent == compensated`` exactly, where
``sent`` is the value actually put on the wire (its rounding error stays in the
state).

Overflow: each memory keeps, per key, an upper bound of the magnitude of its
state (``bounds``), maintained from numbers the pipeline already has (the
gradient's largest magnitude, the largest sent value), so :meth:`Memory.headroom`
tells *before* compensating whether the compensated tensor could overflow fp32 or
the wire dtype. The reducer then skips the step (or raises) on every rank instead
of letting ``inf`` into the state.

Example::

    >>> import torch
    >>> from gradsparse.memory import ResidualMemory
    >>> m = ResidualMemory()
    >>> v = m.compensate("w", torch.tensor([1.0, 2.0]))
    >>> m.update("w", torch.tensor([1]), torch.tensor([2.0]))
    >>> m.state["w"]["residual"].tolist()
    [1.0, 0.0]
"""

from __future__ import annotations

import math

import torch

from . import ops
from .errors import StateMismatchError


class Memory:
    """No compensation: select from the gradient itself (error feedback off)."""

    kind = "none"

    def __init__(self):
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        #: per key and state tensor: an upper bound of its largest magnitude
        self.bounds: dict[str, dict[str, float]] = {}

    def _buffer(self, key: str, name: str, like: torch.Tensor) -> torch.Tensor:
        slot = self.state.setdefault(key, {})
        buf = slot.get(name)
        if buf is None or buf.numel() != like.numel() or buf.device != like.device:
            if buf is not None:
                raise StateMismatchError(
                    f"state {key!r}.{name} has {buf.numel()} elements on {buf.device}, "
                    f"the gradient has {like.numel()} on {like.device}"
                )
            buf = torch.zeros(like.numel(), dtype=torch.float32, device=like.device)
            slot[name] = buf
        return buf

    def _bound(self, key: str, name: str) -> float:
        return self.bounds.get(key, {}).get(name, 0.0)

    def _set_bound(self, key: str, name: str, value: float) -> None:
        self.bounds.setdefault(key, {})[name] = float(value)

    def headroom(self, key: str, grad_bound: float) -> float:
        """Upper bound of ``max|compensate(key, g)|`` for any ``g`` with ``max|g| <= grad_bound``.

        >>> Memory().headroom("w", 3.0)
        3.0
        """
        return float(grad_bound)

    def compensate(self, key: str, grad: torch.Tensor, grad_bound: float = math.inf) -> torch.Tensor:
        """Return the fp32 tensor to select from for this parameter.

        ``grad_bound`` is an upper bound of ``max|grad|`` (kept for :meth:`headroom`).
        """
        return grad.reshape(-1).float()

    def update(self, key: str, indices: torch.Tensor, sent: torch.Tensor, *, complete: bool = False,
               bound: float = math.inf) -> None:
        """Remove the sent coordinates (``indices`` int64, ``sent`` fp32 as received).

        ``complete``: every coordinate of the tensor was sent (nothing dropped);
        ``bound``: an upper bound of what stays after the update (the largest
        unsent magnitude, or the wire's rounding of what was sent).
        """

    def finish_whole(self, key: str, averaged: torch.Tensor) -> None:
        """Post-process, in place, the averaged gradient of a tensor that was sent whole."""

    def rescale(self, factor: float) -> None:
        """Multiply every state tensor by ``factor`` (all of them are linear in the gradient).

        Used when AMP's loss scale changes, so old and new gradients add up in one scale.
        """
        for slot in self.state.values():
            for buf in slot.values():
                buf.mul_(factor)
        for bounds in self.bounds.values():
            for name in bounds:
                bounds[name] *= abs(factor)

    def state_dict(self) -> dict:
        return {"kind": self.kind, "state": {k: dict(v) for k, v in self.state.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("kind") != self.kind:
            raise StateMismatchError(f"checkpoint memory is {state_dict.get('kind')!r}, this compressor uses {self.kind!r}")
        self.state = {k: {n: t.clone() for n, t in v.items()} for k, v in state_dict["state"].items()}
        self.bounds = {k: {n: ops.absmax(t) for n, t in v.items()} for k, v in self.state.items()}


class ResidualMemory(Memory):
    """Error feedback: ``v = residual + g``; what was not sent stays for next time."""

    kind = "residual"

    def headroom(self, key, grad_bound):
        return self._bound(key, "residual") + grad_bound

    def compensate(self, key, grad, grad_bound=math.inf):
        residual = self._buffer(key, "residual", grad)
        residual.add_(grad.reshape(-1))
        return residual

    def update(self, key, indices, sent, *, complete=False, bound=math.inf):
        # index_add_ with alpha -1 rounds exactly like ``residual[indices] -= sent`` (indices are unique), 1.6x faster
        self.state[key]["residual"].index_add_(0, indices, sent, alpha=-1.0)
        self._set_bound(key, "residual", bound)


class DGCMemory(Memory):
    """DGC momentum correction: ``u = m*u + g; v = v + u``; sent coordinates masked.

    With ``nesterov``: ``u = m*(u + g); v = v + u + g``. Momentum factor masking
    zeroes ``u`` where a coordinate was sent; ``v`` keeps only the rounding error
    of the sent value.

    When every coordinate of a tensor is sent (density 1.0, the dense first
    iterations, a warm-up stage whose k reaches the tensor size) nothing is
    masked: ``u`` carries on as the momentum buffer, so the sent ``v = u`` (+ ``g``
    with Nesterov) averaged over the ranks is exactly dense momentum SGD's update
    (momentum is linear in the gradient). Masking there would reset the momentum
    every step and degrade DGC to momentum-free SGD.
    """

    kind = "dgc"

    def __init__(self, momentum: float = 0.9, nesterov: bool = False):
        super().__init__()
        self.momentum = momentum
        self.nesterov = nesterov

    def _momentum_bound(self, key: str, grad_bound: float) -> float:
        u = self._bound(key, "momentum")
        return self.momentum * (u + grad_bound) if self.nesterov else self.momentum * u + grad_bound

    def headroom(self, key, grad_bound):
        extra = grad_bound if self.nesterov else 0.0
        return self._bound(key, "velocity") + self._momentum_bound(key, grad_bound) + extra

    def compensate(self, key, grad, grad_bound=math.inf):
        g = grad.reshape(-1)
        u = self._buffer(key, "momentum", g)
        v = self._buffer(key, "velocity", g)
        ops.dgc_compensate_(u, v, g, self.momentum, self.nesterov)
        self._set_bound(key, "momentum", self._momentum_bound(key, grad_bound))
        return v

    def update(self, key, indices, sent, *, complete=False, bound=math.inf):
        slot = self.state[key]
        if not complete:  # momentum factor masking (see the class docstring for the complete case)
            slot["momentum"].index_fill_(0, indices, 0.0)
        slot["velocity"].index_add_(0, indices, sent, alpha=-1.0)
        self._set_bound(key, "velocity", bound)

    def finish_whole(self, key, averaged):
        """Plain (or Nesterov) momentum on the averaged gradient of a tensor sent whole.

        So every parameter sees the same optimizer. The momentum is kept in fp32;
        ``averaged`` (any float dtype, contiguous) is updated in place.
        """
        flat = averaged.view(-1)
        u = self._buffer(key, "momentum", flat)
        u.mul_(self.momentum).add_(flat)
        if self.nesterov:
            flat.add_(u, alpha=self.momentum)
        else:
            flat.copy_(u)
