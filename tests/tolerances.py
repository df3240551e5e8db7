"""The one tolerance rule of the suite: a few units of rounding of the dtype, at the gradient's scale.

Floating-point results that are not bit-identical are compared with::

    close(actual, expected, dtype, scale)

which asserts, element by element, ``|actual - expected| <= ulps * eps(dtype) * scale``:

- ``dtype`` is the coarsest precision the values went through (the gradient's
  dtype, or the wire's when values were rounded to fp16/bf16 on the way);
- ``scale`` is the magnitude of the compared quantity itself (default:
  ``max|expected|``), never of something larger around it: compare a gradient
  with the gradient's scale, a parameter *update* (``p - p0``) with the update's
  scale, not with the parameter's;
- ``ulps`` (default 8) is the rounding budget: a sum of a few rounded terms plus
  the final rounding. A caller that needs more says why beside the call.

So fp32 allows 8 x 1.2e-7 ~ 1e-6 of the scale, fp16 8 x 9.8e-4 ~ 0.8 %, bf16 8 x
7.8e-3 ~ 6 %. A gradient halved, or 15 % of its entries zeroed, is far outside
either (tests/unit/test_tolerances.py plants both). The rule it replaces, ``rtol=1e-2,
atol=1e-3`` on gradients of size ~1e-3, accepted both.
"""

from __future__ import annotations

import torch

ULPS = 8


def tolerance(dtype: torch.dtype, scale: float, ulps: float = ULPS) -> float:
    """The largest accepted absolute difference: ``ulps * eps(dtype) * scale``."""
    return float(ulps) * torch.finfo(dtype).eps * float(scale)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float | None = None,
          ulps: float = ULPS, what: str = "") -> None:
    """Assert ``|actual - expected| <= ulps * eps(dtype) * scale`` everywhere (see the module docstring).

    ``scale`` defaults to ``max|expected|``; an all-zero ``expected`` then demands
    exact zeros. The message names the worst element, the allowed difference and
    how many elements are outside it.
    """
    a = actual.detach().double().cpu().reshape(-1)
    e = expected.detach().double().cpu().reshape(-1)
    assert a.shape == e.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert bool(torch.isfinite(e).all()), f"{what}: the expected value is not finite"
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    allowed = tolerance(dtype, scale, ulps)
    diff = (a - e).abs()
    diff[torch.isnan(a)] = float("inf")
    bad = diff > allowed
    if bool(bad.any()):
        i = int(diff.argmax())
        raise AssertionError(
            f"{what or 'values'} differ beyond {ulps} x eps({dtype}) x scale {scale:.4g} = {allowed:.4g}: "
            f"{int(bad.sum())} of {a.numel()} elements; worst at flat index {i}: got {float(a[i])!r}, "
            f"expected {float(e[i])!r} (difference {float(diff[i]):.4g}, {float(diff[i]) / max(allowed, 1e-300):.3g}x "
            "the allowed)")


def is_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float | None = None,
             ulps: float = ULPS) -> bool:
    """:func:`close` as a boolean."""
    try:
        close(actual, expected, dtype, scale, ulps)
    except AssertionError:
        return False
    return True


def planted_errors(expected: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Wrong versions of ``expected`` a comparison must reject: halved, and 15 % of its nonzeros zeroed."""
    flat = expected.detach().reshape(-1).clone()
    nonzero = torch.nonzero(flat).squeeze(1)
    pick = nonzero[torch.randperm(nonzero.numel(), generator=torch.Generator().manual_seed(seed))]
    zeroed = flat.clone()
    zeroed[pick[: max(1, round(0.15 * nonzero.numel()))]] = 0
    return {"halved": (flat * 0.5).view_as(expected), "15% zeroed": zeroed.view_as(expected)}


def rejects_planted_errors(expected: torch.Tensor, dtype: torch.dtype, scale: float | None = None,
                           ulps: float = ULPS) -> bool:
    """True when :func:`close` with these arguments would fail for every planted error of ``expected``.

    Tests call it beside their comparisons: the tolerance they use can see a halved
    gradient or a gradient with 15 % of its entries lost. Vacuous (True) for an
    all-zero ``expected``.
    """
    if not bool(expected.detach().ne(0).any()):
        return True
    return not any(is_close(wrong, expected, dtype, scale, ulps) for wrong in planted_errors(expected).values())
