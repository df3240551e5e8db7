"""Threshold sparsification: send every coordinate with ``|v| >= threshold``.

The count varies per rank and step, so the communicator exchanges sizes first.

Example::

    >>> import torch
    >>> from gradsparse import Threshold
    >>> Threshold(1.0).select(torch.tensor([0.5, -1.0, 3.0]), step=0, epoch=0).tolist()
    [1, 2]
"""

from __future__ import annotations

from .. import ops
from .._validate import real
from .base import Compressor


class Threshold(Compressor):
    """Fixed-threshold sparsification with error feedback (on by default).

    Args:
        threshold: non-negative magnitude threshold ``tau``; 0 sends everything.
        error_feedback: keep unsent values as a residual added to the next gradient.
    """

    name = "threshold"
    fixed_count = False

    def __init__(self, threshold: float, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.threshold = real(threshold, "threshold", low=0.0)

    def select(self, v, step, epoch, loss_scale=1.0):
        return ops.threshold_indices(v, self.threshold * loss_scale)

    def config(self):
        return {**super().config(), "threshold": self.threshold}
