"""Sparsity warm-up schedules: pure functions of the step or epoch.

Deep Gradient Compression raises sparsity exponentially over the first epochs
(75 %, 93.75 %, 98.4375 %, 99.6 %, then the target). :class:`Warmup` holds the
densities (1 - sparsity) of those stages; :meth:`Warmup.ratio` gives the density
to use at a given point of training.

Example::

    >>> from gradsparse.schedule import Warmup
    >>> w = Warmup()                       # one stage per epoch
    >>> [w.ratio(0.001, step=0, epoch=e) for e in range(6)]
    [0.25, 0.0625, 0.015625, 0.004, 0.001, 0.001]
    >>> Warmup(unit="step", length=100).ratio(0.001, step=150, epoch=0)
    0.0625
"""

from __future__ import annotations

import dataclasses

from .errors import InvalidConfigError

DGC_WARMUP_RATIOS = (0.25, 0.0625, 0.015625, 0.004)


@dataclasses.dataclass(frozen=True)
class Warmup:
    """Densities used for ``length`` epochs (or steps) each before the target ratio.

    Args:
        ratios: densities of the warm-up stages, in order; each in (0, 1].
        length: how many units each stage lasts (>= 1).
        unit: ``"epoch"`` (the hook's ``state.set_epoch`` or ``steps_per_epoch``
            tells the epoch) or ``"step"`` (optimizer steps as counted by the hook).
    """

    ratios: tuple[float, ...] = DGC_WARMUP_RATIOS
    length: int = 1
    unit: str = "epoch"

    def __post_init__(self):
        if self.unit not in ("epoch", "step"):
            raise InvalidConfigError(f"warm-up unit must be 'epoch' or 'step', got {self.unit!r}")
        if int(self.length) != self.length or self.length < 1:
            raise InvalidConfigError(f"warm-up stage length must be a positive integer, got {self.length!r}")
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        for r in self.ratios:
            if not 0.0 < r <= 1.0:
                raise InvalidConfigError(f"warm-up densities must be in (0, 1], got {r}")

    @property
    def total(self) -> int:
        """Units (epochs or steps) until the target ratio is reached."""
        return len(self.ratios) * self.length

    def ratio(self, final_ratio: float, step: int, epoch: int) -> float:
        """Density at this point of training; never below ``final_ratio``."""
        position = step if self.unit == "step" else epoch
        stage = position // self.length
        if stage >= len(self.ratios):
            return final_ratio
        return max(final_ratio, self.ratios[stage])
