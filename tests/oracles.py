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


def per_sign_oracle(x: torch.Tensor, ratio: float, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dryden et al. (2016) by definition: ``(positions, values)`` sent from ``x`` (fp32).

    The ``count_for(ratio, n+)`` largest positive values and the ``count_for(ratio, n-)`` most
    negative ones, each side by a plain Python sort of ``(value, index)`` (ties to the lower
    index; zeros belong to no side). Values: the selected values, or with ``quantize`` each
    side's mean (``math.fsum`` / count, rounded once to fp32) at each of its positions.
    """
    vals = x.detach().reshape(-1).double().tolist()
    positive = sorted((i for i, v in enumerate(vals) if v > 0), key=lambda i: (-vals[i], i))
    negative = sorted((i for i, v in enumerate(vals) if v < 0), key=lambda i: (vals[i], i))
    sent = {}
    for side in (positive, negative):
        if not side:
            continue
        chosen = side[:count_for(ratio, len(side))]
        mean = float(np.float32(math.fsum(vals[i] for i in chosen) / len(chosen)))
        for i in chosen:
            sent[i] = mean if quantize else vals[i]
    positions = sorted(sent)
    return (torch.tensor(positions, dtype=torch.int64),
            torch.tensor([sent[i] for i in positions], dtype=torch.float32))


def gradient_dropping_oracle(x: torch.Tensor, drop_ratio: float, sample_size: int) -> torch.Tensor:
    """Aji and Heafield (2017) as their code does it: positions sent from ``x`` (int64, ascending).

    ``s = min(sample_size, n)`` magnitudes at stride ``n // s`` from 0, fully sorted; the
    threshold is the ``floor(s * drop_ratio)``-th smallest (1-based); every ``|x|`` above it is
    sent (all of ``x`` when that rank is 0).
    """
    mag = magnitudes(x)
    n = mag.size
    s = min(sample_size, n)
    rank = math.floor(s * drop_ratio)
    if rank == 0:
        return torch.arange(n, dtype=torch.int64)
    sample = sorted(mag[[j * (n // s) for j in range(s)]].tolist())
    return torch.from_numpy(np.flatnonzero(mag > sample[rank - 1]).astype(np.int64))


def kept_in_pieces(memories, nodes: int, numel: int, offsets: dict[str, int]) -> torch.Tensor:
    """What the hierarchical path's per-piece memories still keep, laid out flat (float64), scaled as the
    reduction scales it (1 / nodes): every key of every memory is ``"name@start:end"``, a piece of the
    parameter placed at ``offsets[name]`` (a name not in ``offsets`` raises KeyError).

    >>> kept_in_pieces([{"w@0:2": torch.tensor([2.0, 4.0])}, {"w@2:3": torch.tensor([6.0])}], 2, 3, {"w": 0})
    tensor([1., 2., 3.], dtype=torch.float64)
    """
    kept = torch.zeros(numel, dtype=torch.float64)
    for memory in memories:
        for key, residual in memory.items():
            name, span = key.split("@")
            start, end = map(int, span.split(":"))
            kept[offsets[name] + start:offsets[name] + end] += residual.double() / nodes
    return kept
