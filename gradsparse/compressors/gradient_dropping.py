"""Gradient dropping (Aji and Heafield, 2017): drop the ``drop_ratio`` smallest ``|v|``, keep them as residual.

"Sparse communication for distributed gradient descent" (EMNLP 2017). Per tensor
(``granularity="parameter"``: the paper's local threshold) or over each bucket's
compressed tensors together (``granularity="bucket"``: its global threshold), with
``v`` the compensated gradient (gradient + residual):

1. Sample ``s = min(sample_size, n)`` magnitudes ``|v|`` at the stride ``n // s``
   from position 0 (the authors' GPU code: 100,000 samples; ``s = n`` is exact).
2. Threshold ``t``: the ``floor(s * drop_ratio)``-th smallest sampled magnitude.
3. Send every ``|v| > t``; the rest stays in the residual. When
   ``floor(s * drop_ratio)`` is 0, nothing is dropped.

The count depends on the data (the sample only estimates the quantile, and ties
at ``t`` are all kept), so the ranks exchange payload sizes first. "Layer
normalization" in the paper is the model's (Ba et al., 2016), which made one
global threshold work for their NMT model; it is not a step of the method.
Sources and what was checked: docs/algorithms.md.

Example::

    >>> import torch
    >>> from gradsparse import GradientDropping
    >>> GradientDropping(0.5).select(torch.tensor([0.5, -2.0, 1.0, 0.1]), step=0, epoch=0).tolist()
    [1, 2]
"""

from __future__ import annotations

import math

import torch

from .. import ops
from .._validate import integer, real
from .base import Compressor

SAMPLE_SIZE = 100_000  # marian-dev's find_threshold: min(100000, size) samples


class GradientDropping(Compressor):
    """Drop the ``drop_ratio`` smallest magnitudes, by a threshold found on a strided sample.

    Args:
        drop_ratio: fraction of each tensor (or bucket) dropped, in [0, 1); the paper's R
            (0.99: 1 % sent).
        sample_size: magnitudes sampled to find the threshold (at most the tensor size).
        error_feedback: keep what was not sent as a residual added to the next gradient.
    """

    name = "gradient_dropping"
    fixed_count = False

    def __init__(self, drop_ratio: float = 0.99, sample_size: int = SAMPLE_SIZE, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.drop_ratio = real(drop_ratio, "drop_ratio", low=0.0, high=1.0, high_open=True)
        self.sample_size = integer(sample_size, "sample_size", minimum=1)

    def threshold(self, v: torch.Tensor) -> float | None:
        """The magnitude ``t`` at or below which ``v`` is dropped; None when nothing is dropped.

        Here the sample is positions 0, 2, 4, 6 (magnitudes 4, 1, 3, 2) and ``t`` its 3rd smallest:

        >>> GradientDropping(0.75, sample_size=4).threshold(torch.tensor([4.0, 9, -1, 9, 3, 9, 2, 9]))
        3.0
        """
        n = v.numel()
        s = min(self.sample_size, n)
        rank = math.floor(s * self.drop_ratio)
        if rank == 0:
            return None
        stride = n // s
        sample = v[:stride * s:stride].abs()
        return float(torch.kthvalue(sample, rank).values)

    def select(self, v, step, epoch, loss_scale=1.0):
        t = self.threshold(v)
        if t is None:
            return torch.arange(v.numel(), device=v.device)
        # |v| > t is |v| >= the next fp32 above t (the selection kernels compare fp32 magnitudes with >=)
        above = torch.nextafter(torch.tensor(t, dtype=torch.float32), torch.tensor(math.inf))
        return ops.threshold_indices(v, float(above))

    def config(self):
        return {**super().config(), "drop_ratio": self.drop_ratio, "sample_size": self.sample_size}
