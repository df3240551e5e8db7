"""Brute-force selection oracles, independent of gradsparse and of torch's selection ops.

Every selection path of the library (``_reference`` and compiled threshold, exact
top-k, sampled top-k, ``DGC.select``, per-bucket selection) is compared with these.
They read the input once into float64 numpy (fp16, bf16 and fp32 convert exactly)
and decide by definition:

- :func:`topk_oracle`: a full sort of ``(-|x|, index)`` (numpy ``lexsort``), the
  first ``k`` positions, returned ascending: larger magnitude first, ties to the
  lower index. NaN is refused, as the library refuses it.
- :func:`threshold_oracle`: a full scan for ``|x| >= tau``, with ``tau`` rounded to
  the precision the magnitudes are compared in (fp64 for fp64 input, fp32 else:
  the library's documented comparison; every fp16/bf16/fp32 magnitude is exact in
  fp32, so comparing in float64 against the fp32-rounded ``tau`` is the fp32 test).

:func:`slow_topk` is the plainest definition (a Python ``sorted``) used to check
:func:`topk_oracle` itself on small inputs.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def magnitudes(x: torch.Tensor) -> np.ndarray:
    """``|x|`` as float64 numpy (exact for every float dtype torch has)."""
    return np.abs(x.detach().reshape(-1).cpu().to(torch.float64).numpy())


def topk_oracle(x: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest ``|x|`` by a full sort; int64, ascending, ties to the lower index."""
    mag = magnitudes(x)
    n = mag.size
    if np.isnan(mag).any() and 0 < k < n:
        raise ValueError("topk_oracle: NaN has no place in a magnitude order")
    k = max(0, min(int(k), n))
    order = np.lexsort((np.arange(n), -mag))  # last key is the primary one: -|x|, then index
    return torch.from_numpy(np.sort(order[:k]).astype(np.int64))


def threshold_oracle(x: torch.Tensor, tau: float) -> torch.Tensor:
    """Positions with ``|x| >= tau`` by a full scan; int64, ascending (NaN never selected)."""
    mag = magnitudes(x)
    tau = float(tau) if x.dtype == torch.float64 else float(np.float32(tau))
    return torch.from_numpy(np.flatnonzero(mag >= tau).astype(np.int64))


def slow_topk(x: torch.Tensor, k: int) -> list[int]:
    """The definition in plain Python: sort by ``(-|x|, index)``, keep ``k``, ascending."""
    mags = [abs(v) for v in x.detach().reshape(-1).double().tolist()]
    order = sorted(range(len(mags)), key=lambda i: (-mags[i], i))
    return sorted(order[:k])


def count_for(ratio: float, n: int) -> int:
    """The documented count: ``k = max(1, ceil(ratio * n))``, at most ``n``."""
    return min(n, max(1, math.ceil(ratio * n)))


def with_ties(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded heavy-tailed values with many exact ties in magnitude (of both signs).

    Values are quantised to a coarse grid (few distinct magnitudes) so the k-th
    magnitude is usually shared by many positions; none is zero, and all are exactly
    representable in every float dtype (multiples of 1/8 from 1/8 to 64).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64) ** 2
    x = (torch.floor(x.abs() * 8) + 1) / 8 * torch.where(x < 0, -1.0, 1.0)
    return x.clamp_(-64, 64).to(dtype)


def heavy_tailed(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded heavy-tailed values (few ties), in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3).to(dtype)
