"""The candidate ops: selection candidates collected inside the compensation pass
(``dgc_compensate_candidates``, ``residual_compensate_candidates``) and the segmented top-k that
uses them (``segmented_topk_select_candidates``).

The compiled kernels equal the pure-PyTorch reference bit for bit (compensated values, maxima,
candidate positions and counts) and a numpy oracle that compares magnitudes with the floors
exactly (float64); the selection's positions equal ``segmented_topk_select``'s whatever the
floors and caps. Parametrized by device like tests/unit/test_kernels.py (``cuda`` runs where
there is a GPU).
"""

import math
import os

import numpy as np
import pytest
import torch

from gradsparse import _reference as ref
from gradsparse import ops

from ..oracles import magnitudes, topk_oracle

if os.environ.get("GRADSPARSE_NO_EXTENSION") == "1":
    pytest.skip("extension disabled by GRADSPARSE_NO_EXTENSION=1", allow_module_level=True)
if os.environ.get("GRADSPARSE_BACKEND") == "reference":
    pytest.skip("GRADSPARSE_BACKEND=reference: the extension is not loaded", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here (torch.cuda.is_available() is False): "
    "the cuda cases run on a GPU machine"))]
INF = math.inf


def _cuts(n, g, edges=(63, 64, 65, 128, 129)):
    """Offsets of 1-7 segments covering [0, n): random cuts (empty segments included) plus block edges."""
    cuts = torch.randint(0, n + 1, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g).tolist()
    cuts += [e for e in edges if e < n and bool(torch.rand(1, generator=g) < 0.5)]
    return torch.tensor(sorted([0, *cuts, n]), dtype=torch.int64)


def _floors(out, offsets, g):
    """A floor per segment of ``out``: +inf, 0, -1, the exact |value| of one of its elements (ties at the
    floor), a double just above such a float (below the next float: the rounding rule), a quantile."""
    floors = []
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        choice = int(torch.randint(7, (1,), generator=g))
        mags = out[a:b].abs().double()
        if b == a or choice == 0:
            floors.append(INF)
        elif choice == 1:
            floors.append(0.0)
        elif choice == 2:
            floors.append(-1.0)
        elif choice in (3, 4):
            m = float(mags[int(torch.randint(b - a, (1,), generator=g))])
            floors.append(m if choice == 3 else m * (1 + 2.0 ** -40) + 1e-300)
        else:
            floors.append(float(mags.quantile(float(torch.rand(1, generator=g)) ** 0.2)))
    return torch.tensor(floors, dtype=torch.float64)


def _caps(counts, g):
    """A cap per segment: 0, 1, just below its count (truncation), its count, or far above it."""
    choices = [lambda c: 0, lambda c: 1, lambda c: max(0, c - 1), lambda c: c, lambda c: c + 1000]
    return torch.tensor([choices[int(torch.randint(5, (1,), generator=g))](c) for c in counts.tolist()],
                        dtype=torch.int64)


def _oracle(out, offsets, floors, caps):
    """By definition, in float64 (exact for float32 magnitudes): positions with |out| >= floor or NaN
    (none where the floor is +inf), the first caps[s] of each segment, and the counts."""
    mags, nan = magnitudes(out), np.isnan(out.cpu().numpy())
    positions, counts = [], []
    for s, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        floor = float(floors[s])
        hits = [] if floor == INF else [a + i for i in np.nonzero((mags[a:b] >= floor) | nan[a:b])[0].tolist()]
        counts.append(len(hits))
        positions += hits[: int(caps[s])]
    return torch.tensor(positions, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64)


def _dgc_case(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(n, generator=g), torch.randn(n, generator=g)
    grad = (torch.randn(n, generator=g, dtype=torch.float64) * 3).to(dtype)
    return u, v, grad


def _run_dgc(u, v, grad, nesterov, offsets, floors, caps, device, in_place):
    """The compiled op on ``device``; returns (u_out, v_out, maxima, positions, counts, values) on the CPU."""
    du, dv = u.clone().to(device), v.clone().to(device)
    u_out, v_out = (du, dv) if in_place else (torch.full_like(du, 7.0), torch.full_like(dv, 7.0))
    maxima, pos, counts, values = torch.ops.gradsparse.dgc_compensate_candidates(
        du, dv, grad.to(device), 0.9, nesterov, u_out, v_out, offsets.to(device), floors.to(device), caps.to(device))
    if not in_place:
        assert torch.equal(du.cpu(), u) and torch.equal(dv.cpu(), v), "inputs changed"
    return u_out.cpu(), v_out.cpu(), maxima.cpu(), pos.cpu(), counts.cpu(), values.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1001, 100_003])
def test_dgc_compensate_candidates_equals_reference_and_oracle(n, dtype, nesterov, in_place, device):
    u, v, grad = _dgc_case(n, dtype, n + 11)
    g = torch.Generator().manual_seed(n)
    for trial in range(4):
        offsets = _cuts(n, g)
        want_u, want_v = torch.empty(n), torch.empty(n)
        ref.dgc_compensate_into(u, v, grad, 0.9, nesterov, want_u, want_v)
        floors = _floors(want_v, offsets, g)
        _, counts = _oracle(want_v, offsets, floors, torch.zeros(floors.numel(), dtype=torch.int64))
        caps = _caps(counts, g)
        got = _run_dgc(u, v, grad, nesterov, offsets, floors, caps, device, in_place)
        want = ref.dgc_compensate_candidates(u, v, grad, 0.9, nesterov, torch.empty(n), torch.empty(n), offsets,
                                             floors, caps)
        assert torch.equal(got[0], want_u) and torch.equal(got[1], want_v), trial
        assert got[2].dtype == torch.float64 and torch.equal(got[2], want[0]), trial
        assert torch.equal(got[2], torch.ops.gradsparse.dgc_compensate_into(u, v, grad, 0.9, nesterov,
                                                                            torch.empty(n), torch.empty(n)))
        assert got[3].dtype == torch.int64 and torch.equal(got[3], want[1]), (trial, offsets, floors, caps)
        assert torch.equal(got[4], want[2]) and torch.equal(got[4], counts), (trial, offsets, floors)
        assert torch.equal(got[3], _oracle(want_v, offsets, floors, caps)[0]), trial
        assert got[5].dtype == torch.float32 and torch.equal(got[5], want[3]), trial
        assert torch.equal(got[5], want_v[got[3]]), trial  # the values at the positions, bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 1001, 100_003])
def test_residual_compensate_candidates_equals_reference_and_oracle(n, dtype, device):
    g = torch.Generator().manual_seed(n + 5)
    r = torch.randn(n, generator=g)
    grad = torch.randn(n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64)
    grad = grad.to(dtype)
    for trial in range(4):
        offsets = _cuts(n, g)
        want_r = torch.empty(n)
        want_maxima = ref.residual_compensate_into(r, grad, want_r)
        floors = _floors(want_r, offsets, g)
        caps = _caps(_oracle(want_r, offsets, floors, torch.zeros(floors.numel(), dtype=torch.int64))[1], g)
        want = ref.residual_compensate_candidates(r, grad, torch.empty(n), offsets, floors, caps)
        for in_place in (False, True):
            dr = r.clone().to(device)
            r_out = dr if in_place else torch.full_like(dr, 7.0)
            maxima, pos, counts, values = torch.ops.gradsparse.residual_compensate_candidates(
                dr, grad.to(device), r_out, offsets.to(device), floors.to(device), caps.to(device))
            assert torch.equal(r_out.cpu(), want_r) and torch.equal(maxima.cpu(), want_maxima), (trial, in_place)
            assert torch.equal(want[0], want_maxima)
            assert torch.equal(pos.cpu(), want[1]) and torch.equal(counts.cpu(), want[2]), (trial, in_place)
            assert torch.equal(values.cpu(), want[3]) and torch.equal(values.cpu(), want_r[pos.cpu()]), trial
            oracle_pos, oracle_counts = _oracle(want_r, offsets, floors, caps)
            assert torch.equal(pos.cpu(), oracle_pos) and torch.equal(counts.cpu(), oracle_counts), (trial, in_place)


def test_compensate_candidates_large_does_not_depend_on_threads():
    """CPU, ~3M elements (many chunks, segments across chunk edges): 1 and 2 threads, equal to the reference."""
    n = 3_000_017
    u, v, grad = _dgc_case(n, torch.float32, 3)
    offsets = torch.tensor([0, 5, 16_384, 16_385, 1_000_000, 1_000_000, 2_999_999, n])
    want_u, want_v = torch.empty(n), torch.empty(n)
    ref.dgc_compensate_into(u, v, grad, 0.9, True, want_u, want_v)
    floors = torch.tensor([0.0, 1.0, INF, 4.0, 3.0, 5.5, 0.5], dtype=torch.float64)
    caps = torch.tensor([10, 100, 5, 1_000_000, 0, 300, 1])
    want = ref.dgc_compensate_candidates(u, v, grad, 0.9, True, torch.empty(n), torch.empty(n), offsets, floors, caps)
    r_want = ref.residual_compensate_candidates(u, grad, torch.empty(n), offsets, floors, caps)
    assert int(want[2][3]) > 1000 and int(want[2][5]) > caps[5], "the case must collect a lot and truncate"
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            got = _run_dgc(u, v, grad, True, offsets, floors, caps, "cpu", False)
            assert torch.equal(got[1], want_v) and all(torch.equal(a, b) for a, b in zip(got[2:], want)), t
            r_out = torch.empty(n)
            r_got = torch.ops.gradsparse.residual_compensate_candidates(u, grad, r_out, offsets, floors, caps)
            assert all(torch.equal(a, b) for a, b in zip(r_got, r_want)), t
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 65, 100_003])
def test_compensate_candidates_report_positions_from_the_first_offset(n, device):
    """Offsets that start at ``base`` (a piece at ``base`` in its bucket): the same pass, counts and maxima as
    with offsets from 0, every position ``base`` higher; the reference agrees."""
    g = torch.Generator().manual_seed(n + 2)
    u, v, grad = _dgc_case(n, torch.float32, n + 3)
    want_u, want_v = torch.empty(n), torch.empty(n)
    ref.dgc_compensate_into(u, v, grad, 0.9, False, want_u, want_v)
    for base in (1, 4_000_000_000):
        offsets = _cuts(n, g)
        floors = _floors(want_v, offsets, g)
        caps = _caps(_oracle(want_v, offsets, floors, torch.zeros(floors.numel(), dtype=torch.int64))[1], g)
        at_zero = _run_dgc(u, v, grad, False, offsets, floors, caps, device, False)
        shifted = _run_dgc(u, v, grad, False, offsets + base, floors, caps, device, False)
        assert torch.equal(shifted[3], at_zero[3] + base), base
        for a, b in zip(shifted[:3] + shifted[4:], at_zero[:3] + at_zero[4:]):
            assert torch.equal(a, b), base
        want = ref.dgc_compensate_candidates(u, v, grad, 0.9, False, torch.empty(n), torch.empty(n), offsets + base,
                                             floors, caps)
        assert torch.equal(want[1], shifted[3]) and torch.equal(want[2], shifted[4]), base
        r_want = ref.residual_compensate_candidates(u, grad, torch.empty(n), offsets + base, floors, caps)
        r_got = torch.ops.gradsparse.residual_compensate_candidates(
            u.to(device), grad.to(device), torch.empty(n, device=device), (offsets + base).to(device),
            floors.to(device), caps.to(device))
        assert all(torch.equal(a.cpu(), b) for a, b in zip(r_got, r_want)), base
        assert torch.equal(r_want[1] - base, ref.residual_compensate_candidates(
            u, grad, torch.empty(n), offsets, floors, caps)[1]), base


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("n", [1, 65, 100_003])
def test_compensate_candidates_skip_segments_with_a_cap_of_minus_one(n, in_place, device):
    """A segment given a cap of -1 is neither read nor written and collects nothing: the result equals
    compensating the other segments' runs alone (their maxima, positions, counts and values), the skipped
    elements of the outputs keep what they held, and a NaN in a skipped gradient is not seen."""
    g = torch.Generator().manual_seed(n + 7)
    u, v, grad = _dgc_case(n, torch.float32, n + 5)
    grad[n // 2] = float("nan")
    for trial in range(4):
        offsets = _cuts(n, g)
        segments = offsets.numel() - 1
        skipped = torch.rand(segments, generator=g) < 0.5
        if trial == 0:
            skipped[:] = False
        if trial == 1:
            skipped[:] = True
        half = [s for s in range(segments) if int(offsets[s]) <= n // 2 < int(offsets[s + 1])]
        skipped[half] = True  # the NaN is always in a skipped segment
        want_u, want_v = torch.empty(n), torch.empty(n)
        ref.dgc_compensate_into(u, v, grad.nan_to_num(), 0.9, False, want_u, want_v)
        floors = _floors(want_v, offsets, g)
        caps = _caps(_oracle(want_v, offsets, floors, torch.zeros(segments, dtype=torch.int64))[1], g)
        caps[skipped] = -1
        keep = torch.zeros(n, dtype=torch.bool)  # the elements of segments not skipped
        for s in range(segments):
            keep[int(offsets[s]):int(offsets[s + 1])] = not bool(skipped[s])
        du, dv = u.clone().to(device), v.clone().to(device)
        u_out, v_out = (du, dv) if in_place else (torch.full_like(du, 7.0), torch.full_like(dv, 7.0))
        maxima, pos, counts, values = torch.ops.gradsparse.dgc_compensate_candidates(
            du, dv, grad.to(device), 0.9, False, u_out, v_out, offsets.to(device), floors.to(device), caps.to(device))
        before = (u, v) if in_place else (torch.full((n,), 7.0), torch.full((n,), 7.0))
        assert torch.equal(u_out.cpu()[keep], want_u[keep]) and torch.equal(v_out.cpu()[keep], want_v[keep]), trial
        assert torch.equal(u_out.cpu()[~keep], before[0][~keep]) and torch.equal(v_out.cpu()[~keep], before[1][~keep])
        kept_g = torch.where(keep, grad, torch.zeros(()))
        want_max = [float(kept_g.abs().max()) if keep.any() else 0.0, float(want_u[keep].abs().max()) if keep.any()
                    else 0.0, float(want_v[keep].abs().max()) if keep.any() else 0.0]
        assert maxima.cpu().tolist() == want_max, (trial, maxima, want_max)
        oracle_caps = caps.clamp(min=0)
        oracle_floors = torch.where(skipped, torch.full_like(floors, INF), floors)
        want_pos, want_counts = _oracle(want_v, offsets, oracle_floors, oracle_caps)
        assert torch.equal(pos.cpu(), want_pos) and torch.equal(counts.cpu(), want_counts), trial
        assert torch.equal(values.cpu(), want_v[want_pos]), trial
        got_ref = ref.dgc_compensate_candidates(u.clone(), v.clone(), grad, 0.9, False, torch.full((n,), 7.0),
                                                torch.full((n,), 7.0), offsets, floors, caps)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(got_ref, (maxima, pos, counts, values))), trial
        dr = u.clone().to(device)
        r_got = torch.ops.gradsparse.residual_compensate_candidates(dr, grad.to(device), dr, offsets.to(device),
                                                                    floors.to(device), caps.to(device))
        r_ref = ref.residual_compensate_candidates(u.clone(), grad, u.clone(), offsets, floors, caps)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(r_got, r_ref)), trial
        assert torch.equal(dr.cpu()[~keep], u[~keep]), trial


@pytest.mark.parametrize("device", DEVICES)
def test_compensate_candidates_with_nan_and_inf(device):
    """NaN: reported in the maxima as today, and counted as a candidate (so the selection refuses it);
    inf: a candidate at every finite floor."""
    n = 70_000
    u, v = torch.zeros(n), torch.zeros(n)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(0))
    grad[5], grad[n - 3] = float("nan"), float("inf")
    offsets, caps = torch.tensor([0, 10, n]), torch.tensor([10, 10])
    for floors, want_pos in (([1e30, 1e30], [5, n - 3]), ([INF, INF], [])):
        floors = torch.tensor(floors, dtype=torch.float64)
        got = _run_dgc(u, v, grad, False, offsets, floors, caps, device, False)
        assert [str(s) for s in got[2].tolist()] == ["nan"] * 3
        assert got[3].tolist() == want_pos
        r_got = torch.ops.gradsparse.residual_compensate_candidates(
            u.to(device), grad.to(device), torch.empty(n, device=device), offsets.to(device), floors.to(device),
            caps.to(device))
        assert r_got[1].cpu().tolist() == want_pos


@pytest.mark.parametrize("device", DEVICES)
def test_compensate_candidates_refuse_bad_arguments(device):
    def z(n, dtype=torch.float32):
        return torch.zeros(n, dtype=dtype, device=device)

    def t(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype, device=device)

    f64 = torch.float64
    cases = [
        ((t([0, 5]), t([1.0], f64), t([1]), 6), "span the gradient's 6 elements"),
        ((t([1, 6]), t([1.0], f64), t([1]), 6), "span the gradient's 6 elements"),
        ((t([-1, 5]), t([1.0], f64), t([1]), 6), "first offset >= 0"),
        ((t([0, 4, 2, 6]), t([1.0, 1.0, 1.0], f64), t([1, 1, 1]), 6), "must not decrease"),
        ((t([0, 6]), t([1.0, 1.0], f64), t([1]), 6), "one more element"),
        ((t([0, 6]), t([1.0], f64), t([1, 2]), 6), "one more element"),
        ((t([0, 6]), t([1.0]), t([1]), 6), "float64"),
        ((t([0, 6], torch.int32), t([1.0], f64), t([1]), 6), "int64"),
        ((t([0, 6]), t([float("nan")], f64), t([1]), 6), "NaN"),
        ((t([0, 6]), t([1.0], f64), t([-2]), 6), r"caps must be >= 0 \(or -1"),
    ]
    for (offsets, floors, caps, n), match in cases:
        with pytest.raises(ValueError, match=match):
            torch.ops.gradsparse.dgc_compensate_candidates(z(n), z(n), z(n), 0.9, False, z(n), z(n), offsets, floors,
                                                           caps)
        with pytest.raises(ValueError, match=match):
            torch.ops.gradsparse.residual_compensate_candidates(z(n), z(n), z(n), offsets, floors, caps)
        if match != "one more element":
            with pytest.raises(ValueError, match=match):
                ref.dgc_compensate_candidates(z(n).cpu(), z(n).cpu(), z(n).cpu(), 0.9, False, z(n).cpu(), z(n).cpu(),
                                              offsets.cpu(), floors.cpu(), caps.cpu())
    ok = (t([0, 6]), t([1.0], f64), t([1]))
    with pytest.raises(ValueError, match="u_out"):  # the checks of dgc_compensate_into still apply
        state = z(30)
        torch.ops.gradsparse.dgc_compensate_candidates(state[:6], state[6:12], z(6), 0.9, False, state[3:9],
                                                       state[20:26], *ok)
    with pytest.raises(ValueError, match="r_out must be r itself"):
        state = z(30)
        torch.ops.gradsparse.residual_compensate_candidates(state[:6], z(6), state[3:9], *ok)


# ------------------------------------------------------------------ segmented_topk_select_candidates

def _tied(n, g):
    """Values from a small set of magnitudes, both signs: ties everywhere."""
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
    x = levels[torch.randint(len(levels), (n,), generator=g)] * (torch.randint(2, (n,), generator=g) * 2 - 1)
    return x + (torch.rand(n, generator=g) < 0.3) * torch.randn(n, generator=g)  # and some distinct values


def _select_case(g, lengths):
    """A bucket: x = v_out of a DGC step whose v is tied values, segments of the given lengths, a k per segment
    (0, 1, its length, beyond it, a density), and floors below, at and above each segment's k-th magnitude."""
    lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=g).tolist()]
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    n = int(offsets[-1])
    choices = [lambda m: 0, lambda m: 1, lambda m: m, lambda m: m + 3,
               *[lambda m, d=d: max(1, math.ceil(d * m)) for d in (0.001, 0.01, 0.1, 0.5)]]
    ks = torch.tensor([choices[int(torch.randint(len(choices), (1,), generator=g))](m) for m in lengths])
    u, v = torch.zeros(n), _tied(n, g)
    grad = torch.zeros(n)  # v_out == v: x is the tied values
    floors = []
    for s, m in enumerate(lengths):
        k = min(max(int(ks[s]), 0), m)
        mags = v[int(offsets[s]):int(offsets[s + 1])].abs().double()
        kth = float(mags.sort(descending=True).values[k - 1]) if 0 < k <= m else 0.0
        factor = [0.0, 0.5, 0.9, 1.0, 1.0 + 1e-6, 2.0, INF][int(torch.randint(7, (1,), generator=g))]
        floors.append(kth * factor if factor != INF else INF)
    return u, v, grad, offsets, ks, torch.tensor(floors, dtype=torch.float64)


def _candidates_for(u, v, grad, offsets, floors, caps, device):
    """Op 1 on ``device``: x (= v_out) and the candidates (positions in x) with their counts and values."""
    n = v.numel()
    v_out = torch.empty(n, device=device)
    _, pos, counts, values = torch.ops.gradsparse.dgc_compensate_candidates(
        u.to(device), v.to(device), grad.to(device), 0.9, False, torch.empty(n, device=device), v_out,
        offsets.to(device), floors.to(device), caps.to(device))
    return v_out, pos, counts, values


def _kth_by_definition(x, offsets, ks):
    kth = []
    for s, k in enumerate(ks.tolist()):
        a, b = int(offsets[s]), int(offsets[s + 1])
        k = min(max(k, 0), b - a)
        kth.append(INF if k == 0 else 0.0 if k == b - a else float(magnitudes(x[a:b][topk_oracle(x[a:b], k)]).min()))
    return torch.tensor(kth, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(6))
def test_segmented_topk_select_candidates_equals_segmented_topk_select(seed, device):
    """Fuzz: tied values, random ks and floors, caps that truncate or not: positions equal segmented_topk_select
    (compiled and reference) and the oracle, kth equals the reference and the definition."""
    g = torch.Generator().manual_seed(seed)
    lengths = [0, 1, 2, 63, 64, 65, 1001, 16_383, 16_384, 70_001] + ([1_100_003] if seed == 0 else [])
    u, v, grad, offsets, ks, floors = _select_case(g, lengths)
    big = torch.full((ks.numel(),), 10**9)
    paths = {"candidates": 0, "full": 0}
    for cap_rule in range(3):
        full_counts = _candidates_for(u, v, grad, offsets, floors, big, "cpu")[2]
        caps = [big, _caps(full_counts, g), torch.zeros_like(big)][cap_rule]
        x, cand, counts, values = _candidates_for(u, v, grad, offsets, floors, caps, device)
        pos, kth = torch.ops.gradsparse.segmented_topk_select_candidates(
            x, offsets.to(device), ks.to(device), cand, counts, caps.to(device), 0.01, seed)
        want = torch.ops.gradsparse.segmented_topk_select(x, offsets.to(device), ks.to(device), 0.01, seed).cpu()
        assert torch.equal(pos.cpu(), want), (seed, cap_rule)
        with_values = torch.ops.gradsparse.segmented_topk_select_candidates(
            x, offsets.to(device), ks.to(device), cand, counts, caps.to(device), 0.01, seed, values)
        assert torch.equal(with_values[0], pos) and torch.equal(with_values[1], kth), (seed, cap_rule)
        x = x.cpu()
        ref_pos, ref_kth = ref.segmented_topk_candidates(x, offsets, ks, cand.cpu(), counts.cpu(), caps)
        assert torch.equal(pos.cpu(), ref_pos) and torch.equal(ref_pos, ref.segmented_topk_indices(x, offsets, ks))
        assert kth.dtype == torch.float64 and torch.equal(kth.cpu(), ref_kth), (seed, cap_rule, kth, ref_kth)
        assert torch.equal(ref_kth, _kth_by_definition(x, offsets, ks))
        for s, k in enumerate(ks.tolist()):  # which path each segment took
            length, c = int(offsets[s + 1] - offsets[s]), int(counts[s])
            if 0 < k < length:
                paths["candidates" if c <= int(caps[s]) and c >= k else "full"] += 1
        for s, k in enumerate(ks.tolist()):
            a, b = int(offsets[s]), int(offsets[s + 1])
            part = want[(want >= a) & (want < b)] - a
            assert torch.equal(part, topk_oracle(x[a:b], k)), (s, b - a, k)
    assert paths["candidates"] >= 1 and paths["full"] >= 1, paths


def test_segmented_topk_select_candidates_reads_only_the_candidates():
    """A complete list with at least k entries is all the kernel reads of its segment: leave an element out
    (breaking the caller's contract on purpose) and it is not selected, and given values, those are what it ranks;
    give the list one entry too few for k, or mark it incomplete, and the segment is selected in full again."""
    x = torch.tensor([1.0, 9.0, 3.0, 2.0, 5.0, 4.0, 0.5, 7.0])
    offsets, ks = torch.tensor([0, 8]), torch.tensor([3])
    full = torch.ops.gradsparse.segmented_topk_select(x, offsets, ks, 0.01, 0)
    assert full.tolist() == [1, 4, 7]
    cand = torch.tensor([2, 4, 5, 7])  # 9.0 at position 1 left out
    pos, kth = torch.ops.gradsparse.segmented_topk_select_candidates(x, offsets, ks, cand, torch.tensor([4]),
                                                                     torch.tensor([4]), 0.01, 0)
    assert pos.tolist() == [4, 5, 7] and kth.tolist() == [4.0]
    values = torch.tensor([3.0, 5.0, 4.0, 0.25])  # given values are what it ranks: x at 7 is not read
    pos, kth = torch.ops.gradsparse.segmented_topk_select_candidates(x, offsets, ks, cand, torch.tensor([4]),
                                                                     torch.tensor([4]), 0.01, 0, values)
    assert pos.tolist() == [2, 4, 5] and kth.tolist() == [3.0]
    for counts, caps, stored in (([2], [8], [4, 7]), ([5], [4], [2, 4, 5, 7])):
        pos, kth = torch.ops.gradsparse.segmented_topk_select_candidates(
            x, offsets, ks, torch.tensor(stored), torch.tensor(counts), torch.tensor(caps), 0.01, 0)
        assert torch.equal(pos, full) and kth.tolist() == [5.0]


def test_segmented_topk_select_candidates_does_not_depend_on_threads():
    g = torch.Generator().manual_seed(9)
    u, v, grad, offsets, ks, floors = _select_case(g, [2_500_000, 1_100_003, 300, 40_000, 70_001, 1001])
    caps = torch.full((ks.numel(),), 10**9)
    threads = torch.get_num_threads()
    try:
        got = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            x, cand, counts, values = _candidates_for(u, v, grad, offsets, floors, caps, "cpu")
            got.append(torch.ops.gradsparse.segmented_topk_select_candidates(x, offsets, ks, cand, counts, caps,
                                                                             0.01, 1, values))
    finally:
        torch.set_num_threads(threads)
    for a in got[1:]:
        assert torch.equal(a[0], got[0][0]) and torch.equal(a[1], got[0][1])
    assert torch.equal(got[0][0], ref.segmented_topk_indices(x, offsets, ks))


@pytest.mark.parametrize("device", DEVICES)
def test_segmented_topk_select_candidates_refuses_nan(device):
    """NaN in a selected segment is refused, naming the segment, whether the segment is selected from its
    candidates (the compensation pass counts NaN as one) or in full; not where nothing or everything is kept."""
    n = 60_000
    offsets = torch.tensor([0, 20_000, 40_000, n])
    v = torch.randn(n, generator=torch.Generator().manual_seed(0))
    v[45_000] = float("nan")
    u, grad = torch.zeros(n), torch.zeros(n)
    for floors, caps in (([2.0] * 3, [10**6] * 3), ([INF] * 3, [10**6] * 3), ([2.0] * 3, [0] * 3)):
        floors, caps = torch.tensor(floors, dtype=torch.float64), torch.tensor(caps)
        x, cand, counts, values = _candidates_for(u, v, grad, offsets, floors, caps, device)
        for given in (None, values):
            with pytest.raises(ValueError, match="segment 2 contains NaN"):
                torch.ops.gradsparse.segmented_topk_select_candidates(
                    x, offsets.to(device), torch.tensor([10] * 3, device=device), cand, counts, caps.to(device), 0.01,
                    0, given)
        for ks in (torch.tensor([10, 10, 0]), torch.tensor([10, 10, 20_000])):
            pos, _ = torch.ops.gradsparse.segmented_topk_select_candidates(x, offsets.to(device), ks.to(device), cand,
                                                                           counts, caps.to(device), 0.01, 0)
            assert torch.equal(pos.cpu(), ref.segmented_topk_indices(x.cpu(), offsets, ks))
    with pytest.raises(ValueError, match="segment 2 contains NaN"):
        ref.segmented_topk_candidates(x.cpu(), offsets, torch.tensor([10] * 3), cand.cpu(), counts.cpu(), caps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cand,counts,caps,match", [
    ([3, 12, 13], [2, 1], [5, 5], "outside the segment"),        # 12 is in segment 1, listed for segment 0
    ([3, 5, 13], [1, 2], [5, 5], "outside the segment"),         # 5 listed for segment 1
    ([3, 13, 100], [1, 2], [5, 5], "outside the segment"),       # beyond x
    ([-1, 13, 14], [1, 2], [5, 5], "outside the segment"),
    ([3, 14, 13], [1, 2], [5, 5], "not above the one before"),   # unsorted
    ([3, 13, 13], [1, 2], [5, 5], "not above the one before"),   # repeated
    ([3, 13], [1, 2], [5, 5], "summed = 3 candidates, got 2"),
    ([3, 13, 14, 15], [1, 9], [5, 2], "summed = 3 candidates, got 4"),
    ([3, 13, 14], [1, 9], [5, 2], None),  # the same sizes, valid: selected
    ([3, 13, 14], [1, 2, 0], [5, 5], "one count and one cap per segment"),
    ([3, 13, 14], [-1, 2], [5, 5], "must be >= 0"),
])
def test_segmented_topk_select_candidates_refuses_bad_candidates(cand, counts, caps, match, device):
    x = torch.randn(20).to(device)
    offsets, ks = torch.tensor([0, 10, 20], device=device), torch.tensor([1, 1], device=device)

    def call(c=cand, n=counts, p=caps, dtype=torch.int64, values=None):
        return torch.ops.gradsparse.segmented_topk_select_candidates(
            x, offsets, ks, torch.tensor(c, dtype=dtype, device=device), torch.tensor(n, device=device),
            torch.tensor(p, device=device), 0.01, 0, values)

    if match is None:
        # segment 0 complete: its one candidate is taken on trust; segment 1 truncated: selected in full
        want = [3, int(ref.segmented_topk_indices(x.cpu(), offsets.cpu(), ks.cpu())[1])]
        assert call()[0].cpu().tolist() == want
        assert call(values=x[torch.tensor(cand, device=device)])[0].cpu().tolist() == want
        for values in (torch.zeros(len(cand) + 1), torch.zeros(len(cand), dtype=torch.float64),
                       torch.zeros(1, len(cand))):
            with pytest.raises(ValueError, match="values must be 1-D, one per candidate"):
                call(values=values.to(device))
            with pytest.raises(ValueError, match="values must be 1-D, one per candidate"):
                ref.segmented_topk_candidates(x.cpu(), offsets.cpu(), ks.cpu(), torch.tensor(cand),
                                              torch.tensor(counts), torch.tensor(caps), values=values)
        return
    with pytest.raises(ValueError, match=match):
        call()
    with pytest.raises(ValueError, match=match):
        ref.segmented_topk_candidates(x.cpu(), offsets.cpu(), ks.cpu(), torch.tensor(cand), torch.tensor(counts),
                                      torch.tensor(caps))
    with pytest.raises(ValueError, match="int64"):
        call(dtype=torch.int32)
    with pytest.raises(ValueError, match="must not decrease"):  # and the checks of segmented_topk_select still apply
        torch.ops.gradsparse.segmented_topk_select_candidates(
            x, torch.tensor([0, 10, 5], device=device), ks, torch.tensor(cand, device=device),
            torch.tensor(counts, device=device), torch.tensor(caps, device=device), 0.01, 0)


def test_ops_wrappers_take_the_compiled_path_and_match_the_reference():
    n = 5000
    u, v, grad = _dgc_case(n, torch.bfloat16, 1)
    offsets, floors, caps = torch.tensor([0, 1000, n]), torch.tensor([2.0, 3.0], dtype=torch.float64), \
        torch.tensor([50, 10**6])
    got = ops.dgc_compensate_candidates(u, v, grad.reshape(50, 100), 0.9, False, torch.empty(n), torch.empty(n),
                                        offsets, floors, caps)
    want = ref.dgc_compensate_candidates(u, v, grad, 0.9, False, torch.empty(n), torch.empty(n), offsets, floors,
                                         caps)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    x = torch.empty(n)
    ref.dgc_compensate_into(u, v, grad, 0.9, False, torch.empty(n), x)
    ks = torch.tensor([10, 25])
    pos, kth = ops.segmented_topk_candidates(x, offsets, ks, got[1], got[2], caps)
    assert torch.equal(pos, ops.segmented_topk_indices(x, offsets, ks))
    assert torch.equal(kth, ref.segmented_topk_candidates(x, offsets, ks, got[1], got[2], caps)[1])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_candidate_ops(device):
    g = torch.Generator().manual_seed(0)

    def randn(n):
        return torch.randn(n, generator=g).to(device)

    offsets = torch.tensor([0, 30, 30, 100], device=device)
    floors = torch.tensor([1.0, INF, 0.5], dtype=torch.float64, device=device)
    caps = torch.tensor([4, 4, 100], device=device)
    torch.library.opcheck(torch.ops.gradsparse.dgc_compensate_candidates.default,
                          (randn(100), randn(100), randn(100).half(), 0.9, True, randn(100), randn(100), offsets,
                           floors, caps))
    torch.library.opcheck(torch.ops.gradsparse.residual_compensate_candidates.default,
                          (randn(100), randn(100).half(), randn(100), offsets, floors, caps))
    x = randn(100)
    _, cand, counts, values = torch.ops.gradsparse.residual_compensate_candidates(
        torch.zeros(100, device=device), x, torch.empty(100, device=device), offsets, floors, caps)
    torch.library.opcheck(torch.ops.gradsparse.segmented_topk_select_candidates.default,
                          (x, offsets, torch.tensor([3, 0, 10], device=device), cand, counts, caps, 0.01, 0))
    torch.library.opcheck(torch.ops.gradsparse.segmented_topk_select_candidates.default,
                          (x, offsets, torch.tensor([3, 0, 10], device=device), cand, counts, caps, 0.01, 0, values))


@pytest.mark.parametrize("at", [0, 4095, 4096, 4097, 9_999])
def test_a_bad_candidate_in_a_long_list_is_named(at):
    """The CPU check runs block by block (4,096 candidates) without a branch per candidate: a bad one is still
    found and named wherever it is, block edges and the list's ends included."""
    x = torch.randn(30_000)
    offsets, ks = torch.tensor([0, 25_000, 30_000]), torch.tensor([10, 1])
    cand = torch.arange(0, 20_000, 2)  # 10,000 candidates for segment 0, none for segment 1
    counts, caps = torch.tensor([10_000, 0]), torch.tensor([10_000, 0])
    torch.ops.gradsparse.segmented_topk_select_candidates(x, offsets, ks, cand, counts, caps, 0.01, 0)  # valid
    bad = cand.clone()
    bad[at] = 25_000 if at == 9_999 else (-1 if at == 0 else bad[at - 1])  # past the segment, before it, repeated
    what = "outside the segment" if at in (0, 9_999) else "not above the one before it"
    with pytest.raises(ValueError, match=f"candidate {at} .* is {what}"):
        torch.ops.gradsparse.segmented_topk_select_candidates(x, offsets, ks, bad, counts, caps, 0.01, 0)
