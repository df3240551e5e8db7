"""A preset proportion of the positive and of the negative values (Dryden et al., 2016).

"Communication quantization for data-parallel training of deep neural networks"
(MLHPC 2016) sends, of each tensor, the largest ``ratio`` of its positive values
and, separately, the most negative ``ratio`` of its negative values, so a gradient
whose mass lies on one side still sends both sides. With ``quantize=True`` (their
"adaptive quantization") each side is sent as one reconstruction value, the mean
of the values it selected; what that leaves (``v - mean``) stays in the residual.

Per tensor (or per bucket with ``granularity="bucket"``), with ``n+`` positive and
``n-`` negative entries of the compensated gradient ``v``:

1. ``k+ = max(1, ceil(ratio * n+))`` largest positive values and
   ``k- = max(1, ceil(ratio * n-))`` most negative ones (none of a sign that does
   not occur; zeros are never sent); ties to the lower index.
2. Sent values: the values themselves, or (``quantize``) the mean of the selected
   positive values at every selected positive position, likewise for negatives.
3. Residual: ``v - sent`` (error feedback).

The count ``k+ + k-`` depends on the signs of ``v``, so the ranks exchange payload
sizes first (like :class:`~gradsparse.Threshold`). With ``quantize=True`` and
``ratio=1`` this is 1-bit SGD (Seide et al., 2014) with one mean per sign and
tensor, not dense; ``quantize=False`` with ``ratio=1`` is dense. What was checked
against the authors' code, and where this differs: docs/algorithms.md.

Example::

    >>> import torch
    >>> from gradsparse import PerSignTopK
    >>> v = torch.tensor([3.0, 1.0, 2.0, 0.5, -0.1, 0.0])
    >>> c = PerSignTopK(0.5)
    >>> chosen = c.select(v, step=0, epoch=0)
    >>> chosen.tolist(), c.sent_values(v, chosen).tolist()
    ([0, 2, 4], [2.5, 2.5, -0.10000000149011612])
"""

from __future__ import annotations

import torch

from .. import ops
from .._validate import boolean
from .base import Compressor, check_ratio, count_for


class PerSignTopK(Compressor):
    """The largest ``ratio`` of the positive values and the most negative ``ratio`` of the negative ones.

    Args:
        ratio: fraction of each sign's entries sent, in (0, 1].
        quantize: send each sign's selected values as their mean (the paper's
            adaptive quantization); False sends the values themselves.
        error_feedback: keep what was not sent (and the quantization error) as a
            residual added to the next gradient.
    """

    name = "per_sign_topk"
    fixed_count = False

    def __init__(self, ratio: float, quantize: bool = True, error_feedback: bool = True):
        super().__init__(error_feedback)
        self.target_ratio = check_ratio(ratio)
        self.quantize = boolean(quantize, "quantize")
        self._generator = torch.Generator().manual_seed(0)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_buffers": None}  # scratch only

    @property
    def quantizes(self) -> bool:  # type: ignore[override]
        return self.quantize

    def _scratch(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reused work buffers (one of ``v``'s dtype, one bool): fresh 100 MB arrays per call cost more than the
        passes over them."""
        buffers = self._buffers
        if buffers is None or buffers[0].numel() < v.numel() or buffers[0].device != v.device \
                or buffers[0].dtype != v.dtype:
            buffers = self._buffers = (torch.empty(v.numel(), dtype=v.dtype, device=v.device),
                                       torch.empty(v.numel(), dtype=torch.bool, device=v.device))
        return buffers[0][:v.numel()], buffers[1][:v.numel()]

    def select(self, v, step, epoch, loss_scale=1.0):
        side, flags = self._scratch(v)
        chosen = []
        for low, high, compare in ((0.0, None, torch.gt), (None, 0.0, torch.lt)):
            n = int(torch.count_nonzero(compare(v, 0.0, out=flags)))
            if n:  # one sign's values, zeros elsewhere; k <= n: the exact top-k of |side| never reaches a zero
                torch.clamp(v, min=low, max=high, out=side)
                chosen.append(ops.sampled_topk_indices(side, count_for(self.target_ratio, n), 0.01, self._generator))
        if not chosen:
            return torch.empty(0, dtype=torch.int64, device=v.device)
        return chosen[0] if len(chosen) == 1 else torch.cat(chosen).sort().values

    def sent_values(self, v, positions):
        values = v.index_select(0, positions)
        if not self.quantize or values.numel() == 0:
            return values
        positive = values > 0
        out = torch.empty_like(values)
        for mask in (positive, ~positive):
            side = values[mask]
            if side.numel():  # the mean, summed in fp64 and rounded once to fp32
                out[mask] = (side.sum(dtype=torch.float64) / side.numel()).float()
        return out

    def config(self):
        return {**super().config(), "ratio": self.target_ratio, "quantize": self.quantize}
