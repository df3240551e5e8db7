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


from .base import ExactTopK, check_ratio


class TopK(ExactTopK):
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

    def ratio(self, step, epoch):
        return self.target_ratio

    def config(self):
        return {**super().config(), "ratio": self.target_ratio}
