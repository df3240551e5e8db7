"""Typed entry points for the selection, compensation and payload kernels.

Every caller in the package goes through these functions (the wire format's through
:mod:`gradsparse.payload`, which calls :func:`pack` and :func:`unpack_add` here). They
use the compiled ``torch.ops.gradsparse`` operators (csrc/) for tensors on a device
the extension has kernels for, and the pure-PyTorch reference
(:mod:`gradsparse._reference`) otherwise, with identical results. Of the one-pass
reductions the pipeline reads gradients with, :func:`absmax` (the health check) has a
compiled kernel; :func:`absmin` and :func:`all_finite` are plain PyTorch. Which path is in
use is logged once at INFO level and readable as :data:`BACKEND`. ``GRADSPARSE_BACKEND=reference`` in the
environment (read at import) forces the reference path even where the extension is
built: the test suite's mutation run (tests/mutation/run.py) uses it to test the
reference kernels through the whole library.

Example::

    >>> import torch
    >>> from gradsparse import ops
    >>> ops.threshold_indices(torch.tensor([0.5, -2.0, 1.0]), 1.0).tolist()
    [1, 2]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from . import _reference
from .errors import InvalidConfigError, PayloadError
from .payload import PayloadLayout

logger = logging.getLogger(__name__)

def _load_backend() -> tuple[str, tuple[str, ...]]:
    forced = os.environ.get("GRADSPARSE_BACKEND", "")
    if forced not in ("", "extension", "reference"):
        raise InvalidConfigError(f"GRADSPARSE_BACKEND must be 'reference' or 'extension' (or unset), got {forced!r}")
    if forced == "reference":
        logger.info("gradsparse: GRADSPARSE_BACKEND=reference: using the pure-PyTorch reference kernels")
        return "reference", ()
    try:
        from . import _C  # noqa: F401  (registers torch.ops.gradsparse)
    except ImportError as err:
        logger.info("gradsparse: C++ extension not built (%s), using the pure-PyTorch reference kernels", err)
        return "reference", ()
    # the devices the extension registered kernels for (TORCH_LIBRARY_IMPL(gradsparse, CPU / CUDA, m))
    select = torch.ops.gradsparse.threshold_select.default
    keys = {"cpu": torch.DispatchKey.CPU, "cuda": torch.DispatchKey.CUDA}
    devices = tuple(d for d, key in keys.items() if select.has_kernel_for_dispatch_key(key))
    logger.info("gradsparse: using the compiled C++ extension kernels on %s", ", ".join(devices))
    return "extension", devices


BACKEND, KERNEL_DEVICES = _load_backend()


def absmax(x: torch.Tensor) -> float:
    """Largest ``|x|`` as a Python float; NaN when ``x`` holds a NaN, inf when it holds an inf. One read pass
    (the compiled ``absmax`` op where there is one, else ``aminmax``).

    >>> absmax(torch.tensor([1.0, -3.0, 2.0]))
    3.0
    """
    if x.numel() == 0:
        return 0.0
    if _compiled(x) and x.is_floating_point():
        return float(torch.ops.gradsparse.absmax(x.detach()))
    low, high = torch.aminmax(x.detach())
    return max(-float(low), float(high))


def absmin(x: torch.Tensor) -> float:
    """Smallest ``|x|`` as a Python float (``x`` non-empty)."""
    return float(x.detach().abs().min())


def all_finite(x: torch.Tensor) -> bool:
    """True when no element is NaN or Inf. One read-only pass (a float32 sum) unless the sum overflows."""
    if bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(x).all())


def _compiled(t: torch.Tensor) -> bool:
    return BACKEND == "extension" and t.device.type in KERNEL_DEVICES


def threshold_indices(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Positions of every ``|x| >= threshold`` (int64, ascending)."""
    if _compiled(x):
        return torch.ops.gradsparse.threshold_select(x.detach(), float(threshold))
    return _reference.threshold_indices(x, threshold)


def sampled_topk_indices(x: torch.Tensor, k: int, sample_ratio: float = 0.01,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact top-k positions (int64, ascending; ties to the lower index), found by sampling.

    ``generator`` (a CPU generator, whatever ``x``'s device) only picks where the sample
    starts; the selected set does not depend on it.
    """
    if _compiled(x):
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else 0
        return torch.ops.gradsparse.topk_select(x.detach(), int(k), float(sample_ratio), seed)
    return _reference.sampled_topk_indices(x, k, sample_ratio, generator)


def segmented_topk_indices(x: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, sample_ratio: float = 0.01,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Every segment's exact top-k in one call: positions in ``x`` (int64, ascending), segment after segment.

    Segment ``i`` is ``x.reshape(-1)[offsets[i]:offsets[i+1]]`` (``offsets`` int64, non-decreasing)
    and keeps ``clamp(ks[i], 0, its length)`` positions (``ks`` int64): the same positions as
    ``sampled_topk_indices`` of each segment plus its offset, so a bucket's tensors keep their own
    top-k. A ``k`` of 0 skips a segment. ``generator`` only picks where the samples start.

    Example::

        >>> import torch
        >>> from gradsparse import ops
        >>> x = torch.tensor([0.1, -3.0, 2.0, 5.0, 0.2, -0.3])
        >>> ops.segmented_topk_indices(x, torch.tensor([0, 3, 6]), torch.tensor([1, 2])).tolist()
        [1, 3, 5]
    """
    if _compiled(x):
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else 0
        return torch.ops.gradsparse.segmented_topk_select(x.detach(), offsets, ks, float(sample_ratio), seed)
    return _reference.segmented_topk_indices(x, offsets, ks, sample_ratio, generator)


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k positions (int64, ascending; ties to the lower index)."""
    if _compiled(x):
        return torch.ops.gradsparse.topk_select(x.detach(), int(k), 0.01, 0)
    return _reference.topk_indices(x, k)


def dgc_compensate_(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool) -> None:
    """In place: ``u = m*u + g; v = v + u`` (Nesterov: ``u = m*(u + g); v = v + u + g``), one pass."""
    if _compiled(u) and g.device == u.device:
        torch.ops.gradsparse.dgc_compensate(u, v, g.reshape(-1), float(momentum), bool(nesterov))
    else:
        _reference.dgc_compensate_(u, v, g, momentum, nesterov)


def dgc_compensate_into(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool,
                        u_out: torch.Tensor, v_out: torch.Tensor) -> torch.Tensor:
    """:func:`dgc_compensate_` written into ``u_out``, ``v_out``; returns ``[max|g|, max|u_out|, max|v_out|]``.

    One pass on the CPU. The outputs (fp32, ``g``'s size) are either ``u``, ``v`` themselves or
    buffers overlapping none of them, so a caller can compensate into scratch buffers, check the
    float64 maxima (NaN when a tensor holds a NaN, inf for an inf) and then keep the scratch as
    the new state or drop it, the state untouched. The maxima stay on ``u``'s device.

    Example::

        >>> import torch
        >>> from gradsparse import ops
        >>> u, v, g = torch.zeros(3), torch.ones(3), torch.tensor([1.0, -4.0, 2.0])
        >>> u2, v2 = torch.empty(3), torch.empty(3)
        >>> ops.dgc_compensate_into(u, v, g, 0.9, False, u2, v2).tolist(), v2.tolist(), v.tolist()
        ([4.0, 4.0, 3.0], [2.0, -3.0, 3.0], [1.0, 1.0, 1.0])
    """
    if _compiled(u) and g.device == u.device:
        return torch.ops.gradsparse.dgc_compensate_into(u, v, g.reshape(-1), float(momentum), bool(nesterov),
                                                        u_out, v_out)
    return _reference.dgc_compensate_into(u, v, g, momentum, nesterov, u_out, v_out)


def residual_compensate_into(r: torch.Tensor, g: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    """Error feedback's ``r + g`` written into ``r_out``; returns ``[max|g|, max|r_out|]``.

    One pass on the CPU, rounded like ``r_out.copy_(r); r_out.add_(g)``. ``r_out`` (fp32, ``g``'s
    size) is ``r`` itself or a buffer not overlapping it, so a caller can compensate into a
    scratch buffer, check the float64 maxima (NaN when a tensor holds a NaN, inf for an inf) and
    then keep the scratch as the new residual or drop it, the residual untouched. The maxima stay
    on ``r``'s device.

    Example::

        >>> import torch
        >>> from gradsparse import ops
        >>> r, g, r2 = torch.tensor([0.5, 1.0, -1.0]), torch.tensor([1.0, -4.0, 2.0]), torch.empty(3)
        >>> ops.residual_compensate_into(r, g, r2).tolist(), r2.tolist(), r.tolist()
        ([4.0, 3.0], [1.5, -3.0, 1.0], [0.5, 1.0, -1.0])
    """
    if _compiled(r) and g.device == r.device:
        return torch.ops.gradsparse.residual_compensate_into(r, g.reshape(-1), r_out)
    return _reference.residual_compensate_into(r, g, r_out)


def dgc_zero_compensate_(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool,
                         zeroed: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Zero ``u`` and ``v`` at ``zeroed - offset``, then :func:`dgc_compensate_into` in place; the same maxima.

    DGC's memory update of the last step fused into this step's compensation: on the CPU, ``u`` and
    ``v`` read as zero at those positions as each chunk is compensated, so the state is read and
    written once instead of twice. ``zeroed`` (int64, 1-D, non-decreasing, on the
    state's device) must lie in ``[offset, offset + numel)``; a list that does not raises
    IndexError or ValueError (on the CPU after the pass: every element compensated, the state not
    zeroed in the chunks whose positions were wrong, nothing written outside it).

    Example::

        >>> import torch
        >>> from gradsparse import ops
        >>> u, v, g = torch.ones(3), torch.ones(3), torch.tensor([1.0, -4.0, 2.0])
        >>> ops.dgc_zero_compensate_(u, v, g, 0.5, False, torch.tensor([11]), offset=10).tolist(), v.tolist()
        ([4.0, 4.0, 4.0], [2.5, -4.0, 3.5])
    """
    if _compiled(u) and g.device == u.device:
        return torch.ops.gradsparse.dgc_zero_compensate(u, v, g.reshape(-1), float(momentum), bool(nesterov),
                                                        zeroed, int(offset))
    return _reference.dgc_zero_compensate_(u, v, g, momentum, nesterov, zeroed, offset)


def dgc_mask_compensate_(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool,
                         bits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """:func:`dgc_zero_compensate_` with the positions as a bitmap: ``u[i]`` and ``v[i]`` read as zero where bit
    ``offset + i`` of ``bits`` is set (bit ``p % 64`` of int64 word ``p // 64``; at least
    ``bitmap_words(offset + numel)`` words, on the state's device), as :func:`segmented_topk_select_pack` writes
    it. On the CPU each chunk's bits become the mask the pass reads: no list of positions is read or scattered.

    Example::

        >>> import torch
        >>> from gradsparse import ops
        >>> u, v, g = torch.ones(3), torch.ones(3), torch.tensor([1.0, -4.0, 2.0])
        >>> bits = torch.tensor([1 << 11])  # position 11: element 1 with offset 10
        >>> ops.dgc_mask_compensate_(u, v, g, 0.5, False, bits, offset=10).tolist(), v.tolist()
        ([4.0, 4.0, 4.0], [2.5, -4.0, 3.5])
    """
    if _compiled(u) and g.device == u.device:
        return torch.ops.gradsparse.dgc_mask_compensate(u, v, g.reshape(-1), float(momentum), bool(nesterov), bits,
                                                        int(offset))
    return _reference.dgc_mask_compensate_(u, v, g, momentum, nesterov, bits, offset)


def bitmap_words(numel: int) -> int:
    """Int64 words of a selection bitmap over ``numel`` positions (:func:`segmented_topk_select_pack`'s ``bits``).

    >>> bitmap_words(64), bitmap_words(65)
    (1, 2)
    """
    return _reference.bitmap_words(numel)


def dgc_compensate_candidates(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool,
                              u_out: torch.Tensor, v_out: torch.Tensor, offsets: torch.Tensor, floors: torch.Tensor,
                              caps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dgc_compensate_into` that also collects the selection's candidates in the same pass.

    Segment ``s`` is ``[offsets[s], offsets[s+1])`` (``offsets`` int64, non-decreasing, from ``offsets[0] >= 0`` to
    ``offsets[0]`` + ``g``'s numel: element ``i`` of the piece is at ``offsets[0] + i``, e.g. its place in the
    bucket). A cap of -1 skips a segment: it is neither read nor written and collects nothing, so one call can
    cover a whole bucket, the tensors between its parameters left alone. Returns ``(maxima, positions, counts,
    values)``: the maxima of :func:`dgc_compensate_into` (over the segments not skipped);
    ``counts[s]`` (int64) how many positions of segment ``s`` have ``|v_out| >= floors[s]`` (``floors`` float64,
    rounded up to float32 so the comparison is exact; NaN counted; a floor of +inf collects nothing);
    ``positions`` (int64, in the offsets' coordinates, ascending, segment after segment) the first
    ``min(counts[s], caps[s])`` of them; ``values`` (float32) ``v_out`` at each of those. A segment whose count is
    at most its cap is complete: :func:`segmented_topk_candidates` selects it from these alone.

    Example::

        >>> import torch
        >>> from gradsparse import ops
        >>> u, v, g = torch.zeros(4), torch.zeros(4), torch.tensor([1.0, -4.0, 2.0, 0.5])
        >>> maxima, pos, counts, values = ops.dgc_compensate_candidates(
        ...     u, v, g, 0.9, False, torch.empty(4), torch.empty(4), torch.tensor([0, 2, 4]),
        ...     torch.tensor([2.0, 0.1], dtype=torch.float64), torch.tensor([4, 1]))
        >>> pos.tolist(), counts.tolist(), values.tolist()
        ([1, 2], [1, 2], [-4.0, 2.0])
    """
    if _compiled(u) and g.device == u.device:
        return torch.ops.gradsparse.dgc_compensate_candidates(u, v, g.reshape(-1), float(momentum), bool(nesterov),
                                                              u_out, v_out, offsets, floors, caps)
    return _reference.dgc_compensate_candidates(u, v, g, momentum, nesterov, u_out, v_out, offsets, floors, caps)


def residual_compensate_candidates(r: torch.Tensor, g: torch.Tensor, r_out: torch.Tensor, offsets: torch.Tensor,
                                   floors: torch.Tensor, caps: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`residual_compensate_into` that also collects the candidates of ``r_out``, as
    :func:`dgc_compensate_candidates` does for ``v_out``; returns ``(maxima, positions, counts, values)``.

    Example::

        >>> import torch
        >>> from gradsparse import ops
        >>> r, g = torch.tensor([0.5, 1.0, -1.0]), torch.tensor([1.0, -4.0, 2.0])
        >>> maxima, pos, counts, values = ops.residual_compensate_candidates(
        ...     r, g, torch.empty(3), torch.tensor([0, 3]), torch.tensor([1.5], dtype=torch.float64),
        ...     torch.tensor([8]))
        >>> maxima.tolist(), pos.tolist(), counts.tolist(), values.tolist()
        ([4.0, 3.0], [0, 1], [2], [1.5, -3.0])
    """
    if _compiled(r) and g.device == r.device:
        return torch.ops.gradsparse.residual_compensate_candidates(r, g.reshape(-1), r_out, offsets, floors, caps)
    return _reference.residual_compensate_candidates(r, g, r_out, offsets, floors, caps)


def segmented_topk_candidates(x: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, candidates: torch.Tensor,
                              counts: torch.Tensor, caps: torch.Tensor, sample_ratio: float = 0.01,
                              generator: torch.Generator | None = None,
                              values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segmented_topk_indices`, helped by the candidates of the compensation pass.

    ``candidates`` (int64 positions in ``x``, ascending, segment after segment) holds ``min(counts[s], caps[s])``
    positions of segment ``s``: what :func:`dgc_compensate_candidates` or :func:`residual_compensate_candidates`
    returned for the same ``x`` (offsets in ``x``'s coordinates), and ``values`` (optional, ``x``'s dtype) the
    values they returned beside them, ``x`` at each candidate, which the selection from candidates then reads
    instead of ``x``. The caller guarantees they are that; the kernel checks only that each position lies inside
    its segment, ascending, and the values' size and dtype. A segment with ``counts[s] <= caps[s]`` and at
    least its ``k`` candidates is selected from them alone (its k-th largest magnitude is at or above the floor,
    so every element tied with it is a candidate); the others as :func:`segmented_topk_indices` does. Returns
    ``(positions, kth)``: the positions are exactly :func:`segmented_topk_indices`'s; ``kth`` (float64, one per
    segment) the smallest selected magnitude (+inf where a segment keeps nothing, 0 where it keeps all), from
    which the caller sets next step's floors.

    Example::

        >>> import torch
        >>> from gradsparse import ops
        >>> x = torch.tensor([0.1, -3.0, 2.0, 5.0, 0.2, -0.3])
        >>> pos, kth = ops.segmented_topk_candidates(x, torch.tensor([0, 3, 6]), torch.tensor([1, 2]),
        ...                                          torch.tensor([1, 2, 3, 5]), torch.tensor([2, 2]),
        ...                                          torch.tensor([2, 2]))
        >>> pos.tolist(), kth.tolist()
        ([1, 3, 5], [3.0, 0.30000001192092896])
    """
    if _compiled(x):
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else 0
        return torch.ops.gradsparse.segmented_topk_select_candidates(x.detach(), offsets, ks, candidates, counts,
                                                                     caps, float(sample_ratio), seed, values)
    return _reference.segmented_topk_candidates(x, offsets, ks, candidates, counts, caps, sample_ratio, generator,
                                                values)


def pack(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, numel: int,
         value_dtype: torch.dtype, flags: int = 0) -> torch.Tensor:
    """One rank's ``uint8`` payload (layout and entry point: :mod:`gradsparse.payload`)."""
    if _compiled(values):
        return torch.ops.gradsparse.pack(indices, values, dense, int(numel), value_dtype, int(flags))
    return _reference.pack(indices, values, dense, numel, value_dtype, flags)


def pack_gathered(indices: torch.Tensor, source: torch.Tensor, dense: torch.Tensor, numel: int,
                  value_dtype: torch.dtype, flags: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`pack` of ``source[indices]`` without the gathered values as a tensor between: the same bytes,
    written into ``out`` (``uint8``, exactly the payload's size: a buffer reused between steps) or a new tensor.

    >>> x = torch.tensor([0.5, -2.0, 0.0, 3.0])
    >>> torch.equal(pack_gathered(torch.tensor([1, 3]), x, x[:0], 4, torch.float32),
    ...             pack(torch.tensor([1, 3]), x[[1, 3]], x[:0], 4, torch.float32))
    True
    """
    if out is None:
        out = torch.empty(PayloadLayout(indices.numel(), dense.numel(), value_dtype).nbytes, dtype=torch.uint8,
                          device=source.device)
    if _compiled(source):
        torch.ops.gradsparse.pack_gathered(indices, source.detach(), dense, int(numel), value_dtype, int(flags), out)
    else:
        _reference.pack_gathered(indices, source, dense, numel, value_dtype, flags, out)
    return out


def segmented_topk_select_pack(x: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, dense: torch.Tensor,
                               numel: int, out: torch.Tensor, sample_ratio: float = 0.01,
                               generator: torch.Generator | None = None, flags: int = 0,
                               bits: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`segmented_topk_indices` (returned) and its payload, fp32 values, written into ``out`` (``uint8``,
    exactly the payload's size): the bytes of :func:`pack_gathered` of the positions. On the CPU the
    selection's last pass writes each pair beside its position (docs/kernels.md). With ``bits`` (int64,
    ``bitmap_words(x.numel())`` words, on ``x``'s device) the positions also as a bitmap, what
    :func:`dgc_mask_compensate_` reads: on the CPU marked by the same pass, one OR per 64-element block.

    >>> from gradsparse.payload import PayloadLayout
    >>> x = torch.tensor([0.1, -3.0, 2.0, 5.0, 0.2, -0.3])
    >>> offsets, ks, dense = torch.tensor([0, 3, 6]), torch.tensor([1, 2]), torch.tensor([7.0])
    >>> out = torch.empty(PayloadLayout(3, 1, torch.float32).nbytes, dtype=torch.uint8)
    >>> segmented_topk_select_pack(x, offsets, ks, dense, 8, out).tolist()
    [1, 3, 5]
    >>> torch.equal(out, pack_gathered(torch.tensor([1, 3, 5]), x, dense, 8, torch.float32))
    True
    """
    if _compiled(x):
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) if generator is not None else 0
        return torch.ops.gradsparse.segmented_topk_select_pack(x.detach(), offsets, ks, float(sample_ratio), seed,
                                                               dense, int(numel), int(flags), out, bits)
    return _reference.segmented_topk_select_pack(x, offsets, ks, sample_ratio, generator, dense, numel, flags, out,
                                                 bits)


def index_zero_(targets: Sequence[torch.Tensor], positions: torch.Tensor) -> None:
    """``t.view(-1).index_fill_(0, positions, 0)`` for every target, reading the int64 positions once.

    >>> u, v = torch.ones(4), torch.ones(4)
    >>> index_zero_([u, v], torch.tensor([0, 2]))
    >>> u.tolist(), v.tolist()
    ([0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0])
    """
    if targets and _compiled(positions):
        torch.ops.gradsparse.index_zero_(list(targets), positions)
        return
    _reference.index_zero_(list(targets), positions)


def unpack_add(payloads: list[torch.Tensor], out: torch.Tensor, value_dtype: torch.dtype,
               dense_index: torch.Tensor | None = None, alpha: float = 1.0, overwrite: bool = False) -> int:
    """Validate all payloads, then scatter-add ``alpha * values`` into ``out`` in rank order; OR of flags."""
    if _compiled(out) and out.dtype in (torch.float32, torch.float64):
        try:
            flags = torch.ops.gradsparse.unpack_add(payloads, out, value_dtype, dense_index, float(alpha), overwrite)
        except ValueError as err:
            raise PayloadError(str(err).split("\n")[0]) from err
        return int(flags)
    return _reference.unpack_add(payloads, out, value_dtype, dense_index, alpha, overwrite)


if BACKEND == "extension":

    @torch.library.register_fake("gradsparse::threshold_select")
    def _threshold_select_fake(x, threshold):
        return x.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)

    @torch.library.register_fake("gradsparse::topk_select")
    def _topk_select_fake(x, k, sample_ratio, seed):
        return x.new_empty(min(max(k, 0), x.numel()), dtype=torch.int64)

    @torch.library.register_fake("gradsparse::segmented_topk_select")
    def _segmented_topk_select_fake(x, offsets, ks, sample_ratio, seed):
        return x.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)

    @torch.library.register_fake("gradsparse::dgc_compensate_into")
    def _dgc_compensate_into_fake(u, v, g, momentum, nesterov, u_out, v_out):
        return u.new_empty(3, dtype=torch.float64)

    @torch.library.register_fake("gradsparse::dgc_zero_compensate")
    def _dgc_zero_compensate_fake(u, v, g, momentum, nesterov, zeroed, offset):
        return u.new_empty(3, dtype=torch.float64)

    @torch.library.register_fake("gradsparse::dgc_mask_compensate")
    def _dgc_mask_compensate_fake(u, v, g, momentum, nesterov, bits, offset):
        return u.new_empty(3, dtype=torch.float64)

    @torch.library.register_fake("gradsparse::absmax")
    def _absmax_fake(x):
        return x.new_empty((), dtype=torch.float64)

    @torch.library.register_fake("gradsparse::residual_compensate_into")
    def _residual_compensate_into_fake(r, g, r_out):
        return r.new_empty(2, dtype=torch.float64)

    @torch.library.register_fake("gradsparse::dgc_compensate_candidates")
    def _dgc_compensate_candidates_fake(u, v, g, momentum, nesterov, u_out, v_out, offsets, floors, caps):
        kept = torch.library.get_ctx().new_dynamic_size()
        return (u.new_empty(3, dtype=torch.float64), u.new_empty(kept, dtype=torch.int64),
                u.new_empty(floors.numel(), dtype=torch.int64), u.new_empty(kept, dtype=torch.float32))

    @torch.library.register_fake("gradsparse::residual_compensate_candidates")
    def _residual_compensate_candidates_fake(r, g, r_out, offsets, floors, caps):
        kept = torch.library.get_ctx().new_dynamic_size()
        return (r.new_empty(2, dtype=torch.float64), r.new_empty(kept, dtype=torch.int64),
                r.new_empty(floors.numel(), dtype=torch.int64), r.new_empty(kept, dtype=torch.float32))

    @torch.library.register_fake("gradsparse::segmented_topk_select_candidates")
    def _segmented_topk_select_candidates_fake(x, offsets, ks, candidates, counts, caps, sample_ratio, seed,
                                               values=None):
        positions = x.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)
        return positions, x.new_empty(ks.numel(), dtype=torch.float64)

    @torch.library.register_fake("gradsparse::segmented_topk_select_pack")
    def _segmented_topk_select_pack_fake(x, offsets, ks, sample_ratio, seed, dense, numel, flags, out, bits=None):
        return x.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.int64)

    @torch.library.register_fake("gradsparse::pack")
    def _pack_fake(indices, values, dense, numel, value_dtype, flags):
        return values.new_empty(PayloadLayout(indices.numel(), dense.numel(), value_dtype).nbytes, dtype=torch.uint8)

    @torch.library.register_fake("gradsparse::pack_gathered")
    def _pack_gathered_fake(indices, source, dense, numel, value_dtype, flags, out):
        return None

    @torch.library.register_fake("gradsparse::index_zero_")
    def _index_zero_fake(targets, positions):
        return None

    @torch.library.register_fake("gradsparse::dgc_compensate")
    def _dgc_compensate_fake(u, v, g, momentum, nesterov):
        return None

    @torch.library.register_fake("gradsparse::unpack_add")
    def _unpack_add_fake(payloads, out, value_dtype, dense_index, alpha, overwrite):
        return out.new_empty((), dtype=torch.int64)


__all__ = [
    "BACKEND",
    "absmax",
    "absmin",
    "all_finite",
    "dgc_compensate_",
    "dgc_compensate_candidates",
    "bitmap_words",
    "dgc_compensate_into",
    "dgc_mask_compensate_",
    "dgc_zero_compensate_",
    "index_zero_",
    "pack",
    "pack_gathered",
    "residual_compensate_candidates",
    "residual_compensate_into",
    "sampled_topk_indices",
    "segmented_topk_candidates",
    "segmented_topk_indices",
    "threshold_indices",
    "topk_indices",
    "unpack_add",
]
