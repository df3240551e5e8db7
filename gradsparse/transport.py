"""Which transport a bucket's selection takes: allgather of pairs or allreduce, weighed in time.

The selection (what is sent, what the memory keeps) is made first; only how it
travels is chosen here, per bucket, identically on every rank:

- ``allgather``: every rank's payload of (index, value) pairs and whole tensors,
  then a scatter-add of all of them;
- ``allreduce``: the same selection scattered into the bucket (zeros elsewhere)
  and summed densely.

:class:`TransportModel` predicts both from an alpha-beta model of the link
(:class:`gradsparse.cost.LinkEstimator`), fitted from the bucket collectives the
reducer already runs, and from the local work each transport costs (packing and
unpacking pairs, per payload byte; scattering and checking the dense bucket, per
element). Each rank measures its own collectives and local work; the numbers
travel as integers in the bucket descriptor the ranks gather anyway
(:meth:`TransportModel.descriptor`), and every rank feeds the same gathered numbers
into its model in rank order (:meth:`TransportModel.absorb`), so every rank predicts
the same and chooses the same. Until both local costs and a link model are known,
:meth:`TransportModel.choose` returns None and the reducer decides by bytes.

Example::

    >>> from gradsparse.transport import TransportModel
    >>> m = TransportModel()
    >>> m.choose(numel=1_000_000, element_size=4, payload_bytes=80_000, received_bytes=160_000, world=2) is None
    True
    >>> rank0 = [1, 8_000_000, 70_000, 2_000, 1_000]     # an allgather of 8 MB took 70 ms; local work in ps
    >>> rank1 = [2, 4_000_000, 66_000, 2_000, 1_000]     # an allreduce of 4 MB took 66 ms
    >>> for _ in range(2): m.absorb([rank0, rank1], world=2)
    >>> m.choose(numel=1_000_000, element_size=4, payload_bytes=80_000, received_bytes=160_000, world=2)[0]
    'allgather'
"""

from __future__ import annotations

from collections.abc import Sequence

from .cost import LinkEstimator, collective_time
from .stats import ALLGATHER, ALLREDUCE

KINDS = {ALLGATHER: 1, ALLREDUCE: 2}
_KIND_NAMES = {code: name for name, code in KINDS.items()}
FIELDS = ("observed collective (0 none, 1 allgather, 2 allreduce)", "its bytes (allgather: one rank's payload; "
          "allreduce: the bucket)", "its microseconds", "allgather local work, ps per received byte",
          "allreduce local work, ps per element")
SMOOTHING = 0.3  # weight of a new local-work measurement in its running average


class TransportModel:
    """Predicts the time of each transport for a bucket from numbers every rank shares.

    Args:
        window: collectives kept for the link fit.
    """

    def __init__(self, window: int = 64):
        self.link = LinkEstimator(window=window)
        self._observed: tuple[int, int, int] | None = None   # this rank's latest, not yet shared
        self._local: dict[str, float] = {}                    # this rank's running averages (seconds per unit)
        self._shared: dict[str, float] = {}                   # the slowest rank's, as gathered

    # ----------------------------------------------------------- this rank
    def record(self, transport: str, nbytes: int, seconds: float, local_s: float, units: int) -> None:
        """One bucket collective completed on this rank: its time and the local work around it.

        ``units``: received payload bytes (allgather) or bucket elements (allreduce).
        """
        if seconds > 0:
            self._observed = (KINDS[transport], int(nbytes), max(1, round(seconds * 1e6)))
        if units > 0:
            per_unit = local_s / units
            old = self._local.get(transport)
            self._local[transport] = per_unit if old is None else (1 - SMOOTHING) * old + SMOOTHING * per_unit

    def descriptor(self) -> list[int]:
        """This rank's numbers for the descriptor (see :data:`FIELDS`); the observation is sent once."""
        kind, nbytes, micros = self._observed or (0, 0, 0)
        self._observed = None
        return [kind, nbytes, micros, *(round(self._local.get(t, 0.0) * 1e12) for t in (ALLGATHER, ALLREDUCE))]

    # ----------------------------------------------------------- every rank alike
    def absorb(self, fields: Sequence[Sequence[int]], world: int) -> None:
        """Every rank's :meth:`descriptor`, in rank order: the same call on every rank gives the same model."""
        for kind, nbytes, micros, *_ in fields:
            if kind in _KIND_NAMES and micros > 0:
                self.link.observe(_KIND_NAMES[kind], nbytes, world, micros * 1e-6)
        for i, transport in enumerate((ALLGATHER, ALLREDUCE)):
            slowest = max(f[3 + i] for f in fields)
            if slowest > 0:
                self._shared[transport] = slowest * 1e-12

    def choose(self, *, numel: int, element_size: int, payload_bytes: int, received_bytes: int,
               world: int) -> tuple[str, dict[str, float]] | None:
        """``(transport, predicted seconds of each)``, or None while the model is incomplete.

        ``payload_bytes``: the largest rank's payload; ``received_bytes``: what the
        allgather hands this rank (every rank's payload).
        """
        link = self.link.model
        if link is None or len(self._shared) < 2:
            return None
        predicted = {
            ALLGATHER: collective_time("allgather", payload_bytes, world, link)
            + self._shared[ALLGATHER] * received_bytes,
            ALLREDUCE: collective_time("allreduce", numel * element_size, world, link)
            + self._shared[ALLREDUCE] * numel,
        }
        return min(predicted, key=lambda t: (predicted[t], t != ALLGATHER)), predicted
