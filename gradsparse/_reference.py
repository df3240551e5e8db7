"""Slow, obviously correct pure-PyTorch versions of every kernel.

This module is the fallback used by :mod:`gradsparse.ops` when the C++/CUDA
extension is absent, and the oracle the extension's kernels are tested against.
It holds one function per compiled op (``torch.ops.gradsparse.*``) and nothing
the package calls directly: the wire format lives in :mod:`gradsparse.payload`,
the reductions the pipeline reads gradients with in :mod:`gradsparse.ops`.
Every function is deterministic: ties in magnitude are broken towards the lower
index, and results come back in ascending index order.

Example::

    >>> import torch
    >>> from gradsparse import _reference as ref
    >>> ref.topk_indices(torch.tensor([0.1, -3.0, 2.0, 3.0]), 2).tolist()
    [1, 3]
"""

from __future__ import annotations

import math

import torch

from .errors import PayloadError
from .payload import HEADER_BYTES, INT32_MAX, MAGIC, VALUE_DTYPES, PayloadLayout, parse

# Tuning of the sampled top-k: they choose the path, never the result. The kernels read the same
# values from csrc/select_params.h; tests/tools/test_constants.py fails when the two drift apart.
# Below this many elements a sampled estimate is not worth it: exact top-k is cheap.
SAMPLED_MIN_NUMEL = 16384
MIN_SAMPLE = 1024
# The threshold estimate is the sample's ceil(SAMPLE_AIM * k * s / n) + SAMPLE_AIM_EXTRA -th
# largest magnitude: a little below the k-th, so one pass usually finds enough candidates.
SAMPLE_AIM = 1.25
SAMPLE_AIM_EXTRA = 4


_WIDE = (torch.float32, torch.float64)


def _magnitude(x: torch.Tensor) -> torch.Tensor:
    return x.detach().abs() if x.dtype in _WIDE else x.detach().float().abs()


def _at_least(x: torch.Tensor, threshold) -> torch.Tensor:
    """``|x| >= threshold`` as a bool mask, without a full-size float temporary for fp32/fp64."""
    if x.dtype in _WIDE:
        return (x >= threshold) | (x <= -threshold)
    return x.float().abs() >= threshold


def _topk_of_magnitude(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k positions of a magnitude vector, ascending, ties to the lower index."""
    n = mag.numel()
    if k >= n:
        return torch.arange(n, dtype=torch.int64, device=mag.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=mag.device)
    kth = torch.topk(mag, k, sorted=False).values.min()
    above = torch.nonzero(mag > kth).squeeze(1)
    ties = torch.nonzero(mag == kth).squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def _refuse_nan(x: torch.Tensor) -> None:
    # a finite float32 sum proves there is no NaN in one read pass without a temporary; else look
    if not bool(torch.isfinite(x.sum(dtype=torch.float32))) and bool(torch.isnan(x).any()):
        raise ValueError("topk_select: input contains NaN")


def topk_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest ``|x|`` (int64, ascending; ties to the lower index). NaN is refused."""
    flat = x.reshape(-1).detach()
    n = flat.numel()
    if k <= 0 or k >= n:
        return _topk_of_magnitude(flat, k)
    _refuse_nan(flat)
    return _topk_of_magnitude(_magnitude(flat), k)


def threshold_indices(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Positions of every ``|x| >= threshold`` (int64, ascending)."""
    return torch.nonzero(_at_least(x.reshape(-1).detach(), threshold)).squeeze(1)


_U32 = 0xFFFFFFFF


def _mul_u32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``h * c`` modulo 2**32 for int64 ``h`` in ``[0, 2**32)``, without an int64 overflow."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _U32


def sample_positions(n: int, stride: int, seed: int) -> torch.Tensor:
    """The sampled top-k's sample: one position in each stratum of ``stride`` elements (the last one
    shorter), drawn from a hash of ``(seed, stratum)``; the kernels draw the same positions
    (``csrc/select_params.h``). A fixed stride from one start aliases with a gradient's periods: the
    3x3 convolution of a 1x1 input has gradient only at every 9th element, which a stride of 99 never
    samples.

    >>> sample_positions(10, 3, 7).tolist()      # one in [0, 3), [3, 6), [6, 9), [9, 10)
    [1, 5, 6, 9]
    """
    strata = torch.arange((n + stride - 1) // stride, dtype=torch.int64)
    h = (strata + ((seed * 0x9E3779B9) & _U32)) & _U32
    h = h ^ (h >> 16)
    h = _mul_u32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _mul_u32(h, 0x846CA68B)
    h = h ^ (h >> 16)
    first = strata * stride
    length = torch.clamp(n - first, max=stride)
    return first + ((h * length) >> 32)


def sampled_topk_indices(
    x: torch.Tensor, k: int, sample_ratio: float = 0.01, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Exact top-k found through a sampled threshold estimate (DGC's selection).

    1. Sample ``|x|`` at one position drawn in each stride (:func:`sample_positions`, from
       a random seed) and take the sample's top ``ceil(1.25 * k * s / n) + 4`` minimum as
       the threshold estimate (a little low on purpose, so one pass usually finds at least ``k``).
    2. Select every ``|x| >= threshold`` in one pass.
    3. If fewer than ``k`` were selected, lower the estimate (up to 10 times, then
       fall back to an exact top-k); if more, take the exact top-k of the
       candidates. Because the candidates then contain every element of the true
       top-k, the result is exactly the top-k, the same set as :func:`topk_indices`.
    """
    flat = x.reshape(-1).detach()
    n = flat.numel()
    if k <= 0 or k >= n or n < SAMPLED_MIN_NUMEL:
        return topk_indices(flat, k)
    _refuse_nan(flat)
    sample_size = min(n, max(MIN_SAMPLE, math.ceil(n * sample_ratio)))
    stride = max(1, n // sample_size)
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    sample = _magnitude(flat[sample_positions(n, stride, seed).to(flat.device)])
    # aim a little below the k-th magnitude so one pass usually yields at least k candidates
    sample_k = min(sample.numel(), math.ceil(SAMPLE_AIM * k * sample.numel() / n) + SAMPLE_AIM_EXTRA)
    for _ in range(10):
        threshold = float(torch.topk(sample, sample_k, sorted=False).values.min())
        candidates = torch.nonzero(_at_least(flat, threshold)).squeeze(1)
        if candidates.numel() >= k:
            if candidates.numel() == k:
                return candidates
            return candidates[_topk_of_magnitude(_magnitude(flat[candidates]), k)]
        if sample_k == sample.numel():
            break
        sample_k = min(sample.numel(), sample_k * 2)
    return topk_indices(flat, k)


def segmented_topk_indices(
    x: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, sample_ratio: float = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Every segment's exact top-k, as positions in ``x`` (int64, ascending), segment after segment.

    Segment ``i`` is ``x.reshape(-1)[offsets[i]:offsets[i+1]]`` and keeps ``clamp(ks[i], 0, its
    length)`` positions: :func:`sampled_topk_indices` of the segment, shifted by ``offsets[i]``.
    NaN in a segment with ``0 < k < length`` is refused, naming the segment.
    """
    flat = x.reshape(-1).detach()
    offsets, ks = offsets.tolist(), ks.tolist()
    if len(offsets) != len(ks) + 1 or offsets[0] < 0 or offsets[-1] > flat.numel() or \
            any(a > b for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"segmented_topk_select: offsets {offsets} do not describe segments of the {flat.numel()} "
                         f"elements for {len(ks)} counts")
    parts = [torch.empty(0, dtype=torch.int64, device=flat.device)]
    for i, k in enumerate(ks):
        piece = flat[offsets[i]:offsets[i + 1]]
        try:
            parts.append(sampled_topk_indices(piece, k, sample_ratio, generator) + offsets[i])
        except ValueError as err:
            raise ValueError(f"segmented_topk_select: segment {i} contains NaN") from err
    return torch.cat(parts)


def dgc_compensate_(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool) -> None:
    """DGC momentum correction and accumulation, in place on fp32 ``u`` and ``v``.

    ``u = m*u + g; v = v + u`` (Nesterov: ``u = m*(u + g); v = v + u + g``).
    """
    g = g.reshape(-1)
    if nesterov:
        u.add_(g).mul_(momentum)
        v.add_(u).add_(g)
    else:
        u.mul_(momentum).add_(g)
        v.add_(u)


def _absmax_or_nan(t: torch.Tensor) -> torch.Tensor:
    return t.abs().max().double() if t.numel() else torch.zeros((), dtype=torch.float64, device=t.device)


def absmax(x: torch.Tensor) -> torch.Tensor:
    """Reference of the ``absmax`` op: the largest ``|x|`` as a 0-dim float64 tensor (NaN if x holds one)."""
    return _absmax_or_nan(x.reshape(-1))


def dgc_compensate_into(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool,
                        u_out: torch.Tensor, v_out: torch.Tensor) -> torch.Tensor:
    """:func:`dgc_compensate_` into ``u_out``, ``v_out`` (which may be ``u``, ``v`` themselves).

    Returns float64 ``[max|g|, max|u_out|, max|v_out|]``, each NaN if its tensor holds a NaN.
    """
    u_out.copy_(u)
    v_out.copy_(v)
    dgc_compensate_(u_out, v_out, g, momentum, nesterov)
    return torch.stack([_absmax_or_nan(g.reshape(-1)), _absmax_or_nan(u_out), _absmax_or_nan(v_out)])


def residual_compensate_into(r: torch.Tensor, g: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
    """Error feedback's ``r + g`` into fp32 ``r_out`` (which may be ``r`` itself), as ``r_out.add_(g)`` rounds.

    Returns float64 ``[max|g|, max|r_out|]``, each NaN if its tensor holds a NaN.
    """
    r_out.copy_(r)
    r_out.add_(g.reshape(-1))
    return torch.stack([_absmax_or_nan(g.reshape(-1)), _absmax_or_nan(r_out)])


def _zeroed_local(zeroed: torch.Tensor, offset: int, numel: int, op: str) -> torch.Tensor:
    """``zeroed - offset``, checked as the kernels check it (int64, 1-D, non-decreasing, within ``[0, numel)``)."""
    if zeroed.dtype != torch.int64 or zeroed.dim() != 1:
        raise ValueError(f"{op}: zeroed must be a contiguous 1-D int64 tensor, got {zeroed.dtype} {zeroed.dim()}-D")
    local = zeroed - offset
    if local.numel() > 1 and bool((local.diff() < 0).any()):
        raise ValueError(f"{op}: zeroed must be non-decreasing")
    if local.numel() and (int(local.min()) < 0 or int(local.max()) >= numel):
        raise IndexError(f"{op}: zeroed has positions outside [offset, offset + numel) = [{offset}, {offset + numel})")
    return local


def dgc_zero_compensate_(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool,
                         zeroed: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Reference of :func:`gradsparse.ops.dgc_zero_compensate_`: ``index_fill_`` of both, then the compensation."""
    local = _zeroed_local(zeroed, offset, u.numel(), "dgc_zero_compensate")
    u.view(-1).index_fill_(0, local, 0)
    v.view(-1).index_fill_(0, local, 0)
    return dgc_compensate_into(u, v, g, momentum, nesterov, u, v)


def dgc_mask_compensate_(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool,
                         bits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Reference of :func:`gradsparse.ops.dgc_mask_compensate_`: the bitmap's positions, then
    :func:`dgc_zero_compensate_` of them."""
    if offset < 0:
        raise ValueError(f"dgc_mask_compensate: offset must be >= 0, got {offset}")
    _check_bits(bits, offset + u.numel(), u.device, "dgc_mask_compensate", exact=False)
    return dgc_zero_compensate_(u, v, g, momentum, nesterov, bitmap_positions(bits, offset, u.numel()), 0)


def _floor_as_float(floor: float) -> torch.Tensor:
    """The smallest float32 at or above ``floor`` (0 for ``floor <= 0``): ``|v| >= floor`` holds exactly for every
    float32 ``v`` at or above it, the kernels' rule (csrc/common.h::floor_key_of)."""
    if not floor > 0:
        return torch.tensor(0.0)
    f = torch.tensor(floor, dtype=torch.float32)  # nearest, inf past the largest float
    if float(f) < floor:
        f = torch.nextafter(f, torch.tensor(math.inf))
    return f


def _candidate_segments(numel: int, offsets: torch.Tensor, floors: torch.Tensor, caps: torch.Tensor, op: str):
    if offsets.dtype != torch.int64 or caps.dtype != torch.int64 or floors.dtype != torch.float64:
        raise ValueError(f"{op}: offsets and caps must be int64 and floors float64, got {offsets.dtype}, "
                         f"{caps.dtype} and {floors.dtype}")
    offsets, floors, caps = offsets.tolist(), floors.tolist(), caps.tolist()
    if len(offsets) != len(floors) + 1 or len(caps) != len(floors):
        raise ValueError(f"{op}: expected 1-D offsets with one more element than floors and caps (one per segment)")
    if offsets[0] < 0 or offsets[-1] - offsets[0] != numel:
        raise ValueError(f"{op}: offsets must span the gradient's {numel} elements from a first offset >= 0, got "
                         f"{offsets[0]} .. {offsets[-1]}")
    for s, (a, b) in enumerate(zip(offsets, offsets[1:])):
        if a > b:
            raise ValueError(f"{op}: offsets must not decrease, got {a} then {b} at segment {s}")
        if caps[s] < -1:
            raise ValueError(f"{op}: caps must be >= 0 (or -1: skip the segment), got {caps[s]} at segment {s}")
        if math.isnan(floors[s]):
            raise ValueError(f"{op}: floor of segment {s} is NaN (use +inf to collect nothing)")
    return offsets, floors, caps


def _skips(segs) -> list[tuple[int, int]] | None:
    """None when no segment is skipped (a cap of -1); else the runs ``[a, b)`` of the piece (its own
    coordinates) that no skipped segment interrupts: what is compensated."""
    offsets, _, caps = segs
    if -1 not in caps:
        return None
    base, runs = offsets[0], []
    for s, cap in enumerate(caps):
        a, b = offsets[s] - base, offsets[s + 1] - base
        if cap == -1 or a == b:
            continue
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return runs


def _candidates(out: torch.Tensor, offsets, floors, caps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each segment's positions with ``|out| >=`` its floor (NaN counted; a floor of +inf: none): the first
    ``caps[s]`` of them, segment after segment, in the offsets' coordinates (``out[i]`` is at ``offsets[0] + i``),
    every segment's count, and ``out`` at each position kept."""
    parts, counts, base = [torch.empty(0, dtype=torch.int64, device=out.device)], [], offsets[0]
    for s, floor in enumerate(floors):
        piece = out[offsets[s] - base:offsets[s + 1] - base]
        if floor == math.inf or caps[s] == -1:  # collects nothing, or skipped
            counts.append(0)
            continue
        hits = torch.nonzero((piece.abs() >= _floor_as_float(floor).to(out.device)) | piece.isnan()).squeeze(1)
        counts.append(hits.numel())
        parts.append(hits[: caps[s]] + offsets[s])
    positions = torch.cat(parts)
    values = out.reshape(-1).index_select(0, positions - base)
    return positions, torch.tensor(counts, dtype=torch.int64, device=out.device), values


def dgc_compensate_candidates(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float, nesterov: bool,
                              u_out: torch.Tensor, v_out: torch.Tensor, offsets: torch.Tensor, floors: torch.Tensor,
                              caps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dgc_compensate_into`, then the selection candidates of ``v_out``: returns ``(maxima, positions,
    counts, values)``. Segment ``s`` is ``[offsets[s], offsets[s+1])``; ``counts[s]`` is how many of its positions have
    ``|v_out| >= floors[s]`` (the floor rounded up to float32; NaN counted; a floor of +inf collects nothing) and
    ``positions`` (ascending, segment after segment) holds the first ``min(counts[s], caps[s])`` of them. The
    offsets may start anywhere (``offsets[0] >= 0``, element ``i`` of ``g`` at ``offsets[0] + i``): the positions
    are in their coordinates. ``values`` is ``v_out`` at each position. A cap of -1 skips its segment (not read,
    not written, nothing collected, not in the maxima)."""
    segs = _candidate_segments(g.numel(), offsets, floors, caps, "dgc_compensate_candidates")
    runs = _skips(segs)
    if runs is None:
        maxima = dgc_compensate_into(u, v, g, momentum, nesterov, u_out, v_out)
    else:
        g, flat = g.reshape(-1), [t.view(-1) for t in (u, v, u_out, v_out)]
        maxima = torch.zeros(3, dtype=torch.float64, device=u.device)
        for a, b in runs:
            maxima = torch.maximum(maxima, dgc_compensate_into(*(t[a:b] for t in flat[:2]), g[a:b], momentum,
                                                               nesterov, *(t[a:b] for t in flat[2:])))
    return (maxima, *_candidates(v_out, *segs))


def residual_compensate_candidates(r: torch.Tensor, g: torch.Tensor, r_out: torch.Tensor, offsets: torch.Tensor,
                                   floors: torch.Tensor, caps: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`residual_compensate_into`, then the candidates of ``r_out`` as in :func:`dgc_compensate_candidates`."""
    segs = _candidate_segments(g.numel(), offsets, floors, caps, "residual_compensate_candidates")
    runs = _skips(segs)
    if runs is None:
        maxima = residual_compensate_into(r, g, r_out)
    else:
        g, r, r_out_ = g.reshape(-1), r.view(-1), r_out.view(-1)
        maxima = torch.zeros(2, dtype=torch.float64, device=r.device)
        for a, b in runs:
            maxima = torch.maximum(maxima, residual_compensate_into(r[a:b], g[a:b], r_out_[a:b]))
    return (maxima, *_candidates(r_out, *segs))


def segmented_topk_candidates(
    x: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor,
    caps: torch.Tensor, sample_ratio: float = 0.01, generator: torch.Generator | None = None,
    values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``segmented_topk_select_candidates``: the candidates (and ``values``, if given) are checked
    (sizes, inside their segments, ascending; the values' size, dtype and device) and then not needed: :func:`segmented_topk_indices` gives the same positions. Returns
    ``(positions, kth)``, ``kth[s]`` the smallest selected magnitude of segment ``s`` as float64 (+inf where it
    keeps nothing, 0 where it keeps all of it)."""
    op = "segmented_topk_select_candidates"
    positions = segmented_topk_indices(x, offsets, ks, sample_ratio, generator)
    if candidates.dtype != torch.int64 or counts.dtype != torch.int64 or caps.dtype != torch.int64:
        raise ValueError(f"{op}: candidates, counts and caps must be int64")
    bounds, ks_, counts_, caps_ = offsets.tolist(), ks.tolist(), counts.tolist(), caps.tolist()
    if candidates.dim() != 1 or len(counts_) != len(ks_) or len(caps_) != len(ks_):
        raise ValueError(f"{op}: expected 1-D candidates and one count and one cap per segment ({len(ks_)})")
    if any(c < 0 for c in counts_ + caps_):
        raise ValueError(f"{op}: counts and caps must be >= 0")
    stored = [min(c, cap) for c, cap in zip(counts_, caps_)]
    if candidates.numel() != sum(stored):
        raise ValueError(f"{op}: expected min(counts[s], caps[s]) summed = {sum(stored)} candidates, got "
                         f"{candidates.numel()}")
    if values is not None and (values.dtype != x.dtype or values.device != x.device or values.dim() != 1
                               or values.numel() != candidates.numel()):
        raise ValueError(f"{op}: values must be 1-D, one per candidate ({candidates.numel()}), with x's dtype "
                         f"({x.dtype}) and device ({x.device}), got {tuple(values.shape)} {values.dtype} on "
                         f"{values.device}")
    cand = candidates.cpu()
    segment = torch.repeat_interleave(torch.arange(len(ks_)), torch.tensor(stored, dtype=torch.int64))
    lo, hi = torch.tensor(bounds[:-1])[segment], torch.tensor(bounds[1:])[segment]
    if bool(((cand < lo) | (cand >= hi)).any()) or bool((cand[1:] <= cand[:-1]).any()):
        raise ValueError(f"{op}: a candidate is outside the segment it is listed for, or not above the one before "
                         "it: candidates "
                         "must be ascending positions in x, segment after segment")
    flat = x.reshape(-1).detach()
    kth, start = [], 0
    for s, k in enumerate(ks_):
        n = bounds[s + 1] - bounds[s]
        k = min(max(k, 0), n)
        if k == 0:
            kth.append(math.inf)
        elif k == n:
            kth.append(0.0)
        else:
            kth.append(float(_magnitude(flat[positions[start:start + k]]).min()))
        start += k
    return positions, torch.tensor(kth, dtype=torch.float64, device=x.device)


def pack(indices: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, numel: int, value_dtype: torch.dtype,
         flags: int = 0) -> torch.Tensor:
    """Reference of :func:`gradsparse.payload.pack`: a zeroed buffer, each section copied into its view."""
    layout = PayloadLayout(indices.numel(), dense.numel(), value_dtype)
    out = torch.zeros(layout.nbytes, dtype=torch.uint8, device=values.device)
    header = torch.tensor(
        [MAGIC, flags, layout.count, layout.n_dense, numel, VALUE_DTYPES[value_dtype], 0, 0],
        dtype=torch.int32,
    )
    out[:HEADER_BYTES].view(torch.int32).copy_(header)
    out[HEADER_BYTES : HEADER_BYTES + 4 * layout.count].view(torch.int32).copy_(indices)
    out[layout.values_offset : layout.dense_offset].view(value_dtype).copy_(values)
    end = layout.dense_offset + layout.value_size * layout.n_dense
    out[layout.dense_offset : end].view(value_dtype).copy_(dense)
    return out


def pack_gathered(indices: torch.Tensor, source: torch.Tensor, dense: torch.Tensor, numel: int,
                  value_dtype: torch.dtype, flags: int, out: torch.Tensor) -> None:
    """Reference of :func:`gradsparse.ops.pack_gathered`: the gathered values, then :func:`pack`, copied into
    ``out`` (which must have the payload's size)."""
    payload = pack(indices, source.reshape(-1).index_select(0, indices.reshape(-1)), dense, numel, value_dtype, flags)
    if out.dtype != torch.uint8 or out.shape != payload.shape:
        raise ValueError(f"pack_gathered: out must be a uint8 tensor of the payload's {payload.numel()} bytes")
    out.copy_(payload)


def segmented_topk_select_pack(x: torch.Tensor, offsets: torch.Tensor, ks: torch.Tensor, sample_ratio: float,
                               generator: torch.Generator | None, dense: torch.Tensor, numel: int, flags: int,
                               out: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`gradsparse.ops.segmented_topk_select_pack`: :func:`segmented_topk_indices`, then
    :func:`pack_gathered` of its positions with fp32 values into ``out`` (and with ``bits``,
    :func:`mark_bitmap` of them); returns the positions."""
    if not x.numel() <= numel <= INT32_MAX:
        raise ValueError(f"segmented_topk_select_pack: numel {numel} must hold x's {x.numel()} elements and fit "
                         "int32 indices")
    if bits is not None:
        _check_bits(bits, x.numel(), x.device, "segmented_topk_select_pack", exact=True)
    positions = segmented_topk_indices(x, offsets, ks, sample_ratio, generator)
    pack_gathered(positions, x, dense, numel, torch.float32, flags, out)
    if bits is not None:
        mark_bitmap(bits, positions)
    return positions


def bitmap_words(numel: int) -> int:
    """Int64 words of a selection bitmap over ``numel`` positions (one bit each)."""
    return (numel + 63) // 64


def _check_bits(bits: torch.Tensor, numel: int, device: torch.device, op: str, exact: bool) -> None:
    words = bitmap_words(numel)
    if bits.dtype != torch.int64 or bits.dim() != 1 or not bits.is_contiguous():
        raise ValueError(f"{op}: bits must be a contiguous 1-D int64 tensor, got {bits.dtype} {bits.dim()}-D")
    if (bits.numel() != words) if exact else (bits.numel() < words):
        raise ValueError(f"{op}: bits has {bits.numel()} words, {'' if exact else 'at least '}{words} are needed "
                         f"for {numel} positions (one bit each)")
    if bits.device != device:
        raise ValueError(f"{op}: bits is on {bits.device}, the data on {device}")


def mark_bitmap(bits: torch.Tensor, positions: torch.Tensor) -> None:
    """The selection bitmap of ``positions`` (int64, distinct): ``bits`` zeroed, then bit ``p % 64`` of word
    ``p // 64`` (the int64's two's-complement bits) set for every position ``p``."""
    bits.zero_()
    p = positions.to(bits.device, torch.int64)
    bit = p & 63
    value = torch.where(bit == 63, torch.iinfo(torch.int64).min, torch.ones_like(p) << bit)
    bits.index_add_(0, p >> 6, value)  # distinct bits of a word add without a carry or an overflow


def bitmap_positions(bits: torch.Tensor, offset: int, numel: int) -> torch.Tensor:
    """The positions ``i`` in ``[0, numel)`` whose bit ``offset + i`` is set (int64, ascending)."""
    if numel == 0:
        return torch.zeros(0, dtype=torch.int64, device=bits.device)
    every = ((bits.unsqueeze(1) >> torch.arange(64, device=bits.device)) & 1).reshape(-1)
    return torch.nonzero(every[offset:offset + numel]).reshape(-1)


def index_zero_(targets: list[torch.Tensor], positions: torch.Tensor) -> None:
    """Reference of :func:`gradsparse.ops.index_zero_`: ``index_fill_`` of each target."""
    for t in targets:
        t.view(-1).index_fill_(0, positions, 0.0)


def unpack_add(payloads: list[torch.Tensor], out: torch.Tensor, value_dtype: torch.dtype,
               dense_index: torch.Tensor | None = None, alpha: float = 1.0, overwrite: bool = False) -> int:
    """Reference of :func:`gradsparse.payload.unpack_add`: :func:`~gradsparse.payload.parse` every payload
    (raising :class:`PayloadError` before any write), then ``index_add_`` each one's pairs in rank order."""
    n_dense = 0 if dense_index is None else dense_index.numel()
    parsed = []
    for rank, p in enumerate(payloads):
        try:
            parsed.append(parse(p, out.numel(), value_dtype, n_dense))
        except PayloadError as err:
            raise PayloadError(f"unpack_add: payload {rank}: {err}") from None
    if overwrite:
        out.zero_()
    flags = 0
    for rank_flags, indices, values, dense in parsed:
        flags |= rank_flags
        out.index_add_(0, indices.long(), values.to(out.dtype), alpha=alpha)
        if n_dense:
            out.index_add_(0, dense_index, dense.to(out.dtype), alpha=alpha)
    return flags

