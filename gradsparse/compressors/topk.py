"""Exact top-k by magnitude: send the ``k = max(1, ceil(ratio * n))`` largest ``|v|``.

Selection goes through the sampled-threshold path (one pass over memory, then an
exact top-k of the few candidates), which returns exactly the top-k set; ties
in magnitude go to the lower index.

Example::

    >>> import torch
    >>> from gradsparse import TopK
    >>> TopK(0.01).count(25_000, step=0, epoch=0)
    250
"""

from __future__ import annotations

import torch

from .. import ops
from .base import Compressor, check_ratio, segment_table


class TopK(Compressor):
    """Top-k ratio sparsification with error feedback (on by default).

    Args:
        ratio: fraction of coordinates sent, in (0, 1].
        error_feedback: keep unsent values as a residual added to the next gradient.
    """

    name = "topk"
    fixed_count = True

    def __init__(self, ratio: float, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.target_ratio = check_ratio(ratio)
        self._generator = torch.Generator().manual_seed(0)

    def ratio(self, step, epoch):
        return self.target_ratio

    def select(self, v, step, epoch, loss_scale=1.0):
        return ops.sampled_topk_indices(v, self.count(v.numel(), step, epoch), 0.01, self._generator)

    def select_segments(self, v, ranges, step, epoch, loss_scale=1.0):
        offsets, ks = segment_table(ranges, [self.count(n, step, epoch) for _, n in ranges], v.device)
        return ops.segmented_topk_indices(v, offsets, ks, 0.01, self._generator)

    def config(self):
        return {**super().config(), "ratio": self.target_ratio}
