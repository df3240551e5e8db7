"""Sparsity warm-up schedules: pure functions of the step or epoch.

Deep Gradient Compression raises sparsity exponentially over the first epochs
(75 %, 93.75 %, 98.4375 %, 99.6 %, then the target). :class:`Warmup` holds the
densities (1 - sparsity) of those stages; :meth:`Warmup.ratio` gives the density
to use at a given point of training.

The default counts optimizer steps, which every adapter counts by itself:
250 steps per stage, so the target density is reached after
:data:`DEFAULT_WARMUP_STEPS` = 1,000 steps with no other call. DGC's paper warms
up over 4 epochs; ``Warmup(unit="epoch")`` does that when the hook is told the
epoch (``state.set_epoch(epoch)`` or ``steps_per_epoch=``).

Example::

    >>> from gradsparse.schedule import Warmup
    >>> w = Warmup()                       # 250 optimizer steps per stage
    >>> [w.ratio(0.001, step=s, epoch=0) for s in (0, 250, 500, 750, 1000)]
    [0.25, 0.0625, 0.015625, 0.004, 0.001]
    >>> Warmup(unit="epoch", length=1).ratio(0.001, step=0, epoch=2)
    0.015625
"""

from __future__ import annotations

import dataclasses

from ._validate import choice, integer, real, sequence
from .errors import InvalidConfigError

DGC_WARMUP_RATIOS = (0.25, 0.0625, 0.015625, 0.004)
DEFAULT_STAGE_STEPS = 250
#: optimizer steps until the default warm-up reaches the target density
DEFAULT_WARMUP_STEPS = DEFAULT_STAGE_STEPS * len(DGC_WARMUP_RATIOS)


@dataclasses.dataclass(frozen=True)
class Warmup:
    """Densities used for ``length`` steps (or epochs) each before the target ratio.

    Args:
        ratios: densities of the warm-up stages, in order; each in (0, 1].
        length: how many units each stage lasts (>= 1); default 250.
        unit: ``"step"`` (optimizer steps as counted by the hook; the default) or
            ``"epoch"`` (the hook's ``state.set_epoch`` or ``steps_per_epoch``
            tells the epoch; without either it stays at the first stage, and the
            hook says so at WARNING level).
    """

    ratios: tuple[float, ...] = DGC_WARMUP_RATIOS
    length: int = DEFAULT_STAGE_STEPS
    unit: str = "step"

    def __post_init__(self):
        choice(self.unit, "unit", ("epoch", "step"))
        object.__setattr__(self, "length", integer(self.length, "length", minimum=1))
        ratios = sequence(self.ratios, "ratios", "(0.25, 0.0625)")
        if not ratios:
            raise InvalidConfigError("ratios must hold at least one density, e.g. (0.25, 0.0625); "
                                     "for no warm-up pass warmup=None to DGC")
        ratios = tuple(real(r, f"ratios[{i}]", low=0.0, high=1.0, low_open=True) for i, r in enumerate(ratios))
        object.__setattr__(self, "ratios", ratios)

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


def untold_epoch_message(compressor, steps_per_epoch: int | None = None, told: bool = False) -> str | None:
    """The warning an adapter logs when ``compressor`` warms up per epoch and was never told the epoch.

    None when there is nothing to say: no epoch-based warm-up, ``steps_per_epoch`` given, or ``told``.

    >>> from gradsparse import DGC, TopK
    >>> untold_epoch_message(TopK(0.01)) is None, untold_epoch_message(DGC(0.01)) is None
    (True, True)
    >>> untold_epoch_message(DGC(0.01, warmup=Warmup(unit="epoch"))).split(":")[0]
    'DGC warms up per epoch, but was never told the epoch'
    """
    warmup = getattr(compressor, "warmup", None)
    if warmup is None or warmup.unit != "epoch" or steps_per_epoch or told:
        return None
    return (f"{type(compressor).__name__} warms up per epoch, but was never told the epoch: it stays at the first "
            f"warm-up stage (density {warmup.ratios[0]:g}) until you call set_epoch(epoch) each epoch or pass "
            "steps_per_epoch=; Warmup(unit='step') (the default) needs neither")
