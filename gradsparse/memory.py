"""Per-parameter compensation state: error-feedback residuals and DGC momentum.

A memory turns a fresh gradient ``g`` into the tensor a compressor selects from
(compensation) and, once the selection has been sent, removes what was sent.
State is kept in fp32 whatever the gradient dtype, one flat tensor per parameter
key and state name (:attr:`Memory.names`), so checkpoints and DDP's bucket
rebuilds cannot mix it up. The reducer works on whole buckets: an
:class:`~gradsparse.arena.Arena` lays the state of a bucket's parameters out like
the bucket and the per-key tensors are views into it.

Invariant: after the update, ``state + sent == compensated`` exactly, where
``sent`` is the value actually put on the wire (its rounding error stays in the
state).

Compensation is one pass (:meth:`Memory.compensate_into`, in place in the
pipeline) that also returns the largest magnitudes of the gradient and of the
result: the arena keeps them as bounds, so the next step can tell from the
gradient's largest magnitude alone (:meth:`Memory.headroom`) whether compensating
could overflow the wire dtype or fp32, before anything changes.

Example::

    >>> import torch
    >>> from gradsparse.memory import ResidualMemory
    >>> m = ResidualMemory()
    >>> r, g, out = torch.zeros(2), torch.tensor([1.0, -2.0]), torch.empty(2)
    >>> m.compensate_into((r,), g, (out,)).tolist(), out.tolist()
    ([2.0, 2.0], [1.0, -2.0])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops
from .errors import StateMismatchError


class Memory:
    """No compensation: select from the gradient itself (error feedback off)."""

    kind = "none"
    #: the fp32 state tensors kept per key; compensation reads and writes all of them, and the
    #: last is the one selection reads (the compensated gradient)
    names: tuple[str, ...] = ()
    #: the fp32 state tensors kept per tensor sent whole (DGC's momentum)
    whole_names: tuple[str, ...] = ()
    #: whether :meth:`compensate_candidates` can collect selection candidates in the compensation pass
    collects_candidates = False

    def __init__(self):
        self._state: dict[str, dict[str, torch.Tensor]] = {}
        self.arenas: dict[tuple, object] = {}  # gradsparse.arena.Arena per bucket layout (see Arena.of)

    @property
    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per parameter key, per state name, its fp32 tensor (views of the arenas' buffers).

        Reading it first applies every arena's deferred memory update (:meth:`Arena.settle
        <gradsparse.arena.Arena.settle>`), so what it shows is always the state after the last update.
        """
        for arena in self.arenas.values():
            arena.settle()
        return self._state

    @state.setter
    def state(self, value: dict[str, dict[str, torch.Tensor]]) -> None:
        self._state = value

    def compensate_into(self, state: Sequence[torch.Tensor], grad: torch.Tensor,
                        out: Sequence[torch.Tensor]) -> torch.Tensor:
        """Write the compensated state for ``grad`` into ``out``; one pass.

        ``state`` and ``out`` hold one fp32 tensor per :attr:`names` entry, of ``grad``'s size
        (``out`` is ``state`` itself, in place, or overlaps none of it). Returns float64 ``[max|grad|,
        max|out[0]|, ...]`` (NaN where a NaN is, inf for an inf) on ``grad``'s device.

        >>> Memory().compensate_into((), torch.tensor([3.0, -4.0]), ()).tolist()
        [4.0]
        """
        return torch.tensor([ops.absmax(grad)], dtype=torch.float64, device=grad.device)

    def compensate_candidates(self, state: Sequence[torch.Tensor], grad: torch.Tensor, out: Sequence[torch.Tensor],
                              offsets: torch.Tensor, floors: torch.Tensor,
                              caps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`compensate_into`, and in the same pass the selection candidates of the compensated gradient
        (``out[-1]``): per segment ``[offsets[s], offsets[s+1])``, every position whose magnitude is at least
        ``floors[s]``. Returns ``(maxima, positions, counts, values)``: ``counts[s]`` how many there were,
        ``positions`` (int64, ascending, in the offsets' coordinates) the first ``caps[s]`` of each, ``values``
        ``out[-1]`` there (:func:`gradsparse.ops.dgc_compensate_candidates`). Only where
        :attr:`collects_candidates`."""
        raise NotImplementedError(f"{type(self).__name__} collects no selection candidates")

    def zero_compensate(self, state: Sequence[torch.Tensor], grad: torch.Tensor, zeroed: torch.Tensor,
                        offset: int) -> torch.Tensor:
        """Zero every ``state`` tensor at ``zeroed - offset`` (int64, non-decreasing), then :meth:`compensate_into`
        in place (``out`` is ``state``): the last update deferred into this pass (see :meth:`defers_update`)."""
        ops.index_zero_(state, zeroed - offset)
        return self.compensate_into(state, grad, state)

    def defers_update(self, state: Sequence[torch.Tensor], positions: torch.Tensor, masked: torch.Tensor | None,
                      exact: bool) -> bool:
        """Whether the arena should leave :meth:`apply_sent` with these arguments to the next compensation pass
        (:meth:`zero_compensate`): it only zeroes every state tensor at ``positions``, and that pays there."""
        return False

    def mask_compensate(self, state: Sequence[torch.Tensor], grad: torch.Tensor, bits: torch.Tensor,
                        offset: int) -> torch.Tensor:
        """:meth:`zero_compensate` with the positions as the selection's bitmap (bit ``offset + i`` set: element
        ``i`` zeroed; :func:`gradsparse.ops.segmented_topk_select_pack`'s ``bits``). Only where
        :meth:`defers_at` can hold."""
        raise NotImplementedError(f"{type(self).__name__} defers no update")

    def defers_at(self, count: int, numel: int) -> bool:
        """Whether a selection of ``count`` of ``numel`` elements, sent exactly with nothing masked apart, would be
        deferred (:meth:`defers_update`): the reducer then asks the selection for its bitmap as well."""
        return False

    def headroom(self, bounds: Sequence[float], grad_bound: float) -> float:
        """Upper bound of the compensated state's largest magnitude for a gradient with ``max|g| <= grad_bound``,
        given ``bounds`` of the state tensors (:attr:`names` order).

        >>> DGCMemory(0.5).headroom([2.0, 10.0], 1.0)
        12.0
        """
        return float(grad_bound)

    def apply_sent(self, state: Sequence[torch.Tensor], positions: torch.Tensor, sent: torch.Tensor | None,
                   masked: torch.Tensor | None, exact: bool = False) -> None:
        """Remove what was sent from the (new) state: ``sent`` (fp32, as carried; may be None when ``exact``)
        at ``positions`` (int64).

        ``masked``: the positions of tensors that were not sent completely (DGC masks their
        momentum there); None when every coordinate of every tensor was sent. ``exact``: ``sent``
        is bit for bit the compensated gradient at ``positions`` (fp32 on the wire, no
        quantization), so what stays there is exactly zero: written as zeros, which torch does
        several times faster than the subtraction at some sizes (``index_add_`` of 256K positions
        into 25M elements: 7 ms against 1.2 ms for ``index_fill_``, one thread), by
        :func:`gradsparse.ops.index_zero_` (DGC's two tensors in one pass over the positions).
        """

    def finish_whole(self, state: Sequence[torch.Tensor], averaged: torch.Tensor) -> None:
        """Post-process, in place, the averaged gradients of the tensors sent whole, gathered into ``averaged``
        (``state``: their :attr:`whole_names` tensors, laid out alike)."""

    def rescale(self, factor: float) -> None:
        """Multiply every state tensor by ``factor`` (all of them are linear in the gradient).

        Used when AMP's loss scale changes, so old and new gradients add up in one scale.
        """
        for slot in self.state.values():
            for buf in slot.values():
                buf.mul_(factor)
        for arena in self.arenas.values():
            arena.rescale(factor)

    def __getstate__(self):
        # the per-key tensors are views of the arenas' buffers, and pickle does not keep shared storage: a loaded
        # arena would go on updating its own buffer while the state showed stale copies. So the pickle holds the
        # settled state as plain copies (each view alone, not its whole buffer), and the arenas are built again
        # from it at the next bucket, as after load_state_dict
        return {**self.__dict__, "_state": self.state_dict()["state"], "arenas": {}}

    def state_dict(self) -> dict:
        """The state per key, as copies (the reducer keeps working in the buffers)."""
        return {"kind": self.kind, "state": {k: {n: t.clone() for n, t in v.items()} for k, v in self.state.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("kind") != self.kind:
            raise StateMismatchError(f"checkpoint memory is {state_dict.get('kind')!r}, this compressor uses {self.kind!r}")
        self.state = {k: {n: t.clone() for n, t in v.items()} for k, v in state_dict["state"].items()}
        self.arenas.clear()


def _remove_sent(compensated: torch.Tensor, positions: torch.Tensor, sent: torch.Tensor | None, exact: bool) -> None:
    """``compensated[positions] -= sent`` (see :meth:`Memory.apply_sent`; ``exact``: the difference is zero, and
    ``sent`` may be None)."""
    if exact:  # x - x is +0.0 for every finite x: the same bits
        ops.index_zero_([compensated], positions)
    else:  # index_add_ with alpha -1 rounds exactly like the subtraction (positions are unique)
        compensated.index_add_(0, positions, sent, alpha=-1.0)


class ResidualMemory(Memory):
    """Error feedback: ``v = residual + g``; what was not sent stays for next time."""

    kind = "residual"
    names = ("residual",)
    collects_candidates = True

    def headroom(self, bounds, grad_bound):
        return bounds[0] + grad_bound

    def compensate_into(self, state, grad, out):
        return ops.residual_compensate_into(state[0], grad, out[0])

    def compensate_candidates(self, state, grad, out, offsets, floors, caps):
        return ops.residual_compensate_candidates(state[0], grad, out[0], offsets, floors, caps)

    def apply_sent(self, state, positions, sent, masked, exact=False):
        _remove_sent(state[0], positions, sent, exact)


#: DGCMemory leaves its update to the next compensation pass from 1/ZERO_IN_PASS_FROM of the state sent
ZERO_IN_PASS_FROM = 32


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
    names = ("momentum", "velocity")
    whole_names = ("momentum",)
    collects_candidates = True

    def __init__(self, momentum: float = 0.9, nesterov: bool = False):
        super().__init__()
        self.momentum = momentum
        self.nesterov = nesterov

    def headroom(self, bounds, grad_bound):
        u, v = bounds
        momentum = self.momentum * (u + grad_bound) if self.nesterov else self.momentum * u + grad_bound
        return v + momentum + (grad_bound if self.nesterov else 0.0)

    def compensate_into(self, state, grad, out):
        return ops.dgc_compensate_into(state[0], state[1], grad, self.momentum, self.nesterov, out[0], out[1])

    def compensate_candidates(self, state, grad, out, offsets, floors, caps):
        return ops.dgc_compensate_candidates(state[0], state[1], grad, self.momentum, self.nesterov, out[0], out[1],
                                             offsets, floors, caps)

    def apply_sent(self, state, positions, sent, masked, exact=False):
        if exact and masked is positions:  # nothing sent whole: both zeroed in one pass over the positions
            ops.index_zero_(state, positions)
            return
        if masked is not None:  # momentum factor masking (see the class docstring for complete tensors)
            ops.index_zero_([state[0]], masked)
        _remove_sent(state[1], positions, sent, exact)

    def defers_update(self, state, positions, masked, exact):
        # from 1/32 of the state's elements: over ResNet-50's buckets, one thread, index_zero_ then
        # dgc_compensate_into took 10.4-11.9 ms at 1 %, 13.8-14.2 at 3 %, 16.4-17.8 at 6.25 % and 19.4-20.1
        # at 25 %; dgc_zero_compensate 11.9-12.3, 12.3-12.5, 13.0-13.5, 15.4-16.3 (op_bench, docs/benchmarks.md)
        return exact and masked is positions and positions.numel() * ZERO_IN_PASS_FROM >= state[0].numel()

    def zero_compensate(self, state, grad, zeroed, offset):
        return ops.dgc_zero_compensate_(state[0], state[1], grad, self.momentum, self.nesterov, zeroed, offset)

    def mask_compensate(self, state, grad, bits, offset):
        return ops.dgc_mask_compensate_(state[0], state[1], grad, self.momentum, self.nesterov, bits, offset)

    def defers_at(self, count, numel):
        return count * ZERO_IN_PASS_FROM >= numel

    def finish_whole(self, state, averaged):
        """Plain (or Nesterov) momentum on the averaged gradients of the tensors sent whole.

        So every parameter sees the same optimizer. The momentum is kept in fp32;
        ``averaged`` (any float dtype, contiguous) is updated in place.
        """
        u = state[0]
        u.mul_(self.momentum).add_(averaged)
        if self.nesterov:
            averaged.add_(u, alpha=self.momentum)
        else:
            averaged.copy_(u)
