"""Compress + decompress of a 25M-element fp32 gradient, pure-PyTorch path.

Run: ``make bench`` (or ``pytest benchmarks --benchmark-only``). Each group
(density 0.1 % and 1 %) times, in the same run:

- ``torch_topk``: ``torch.topk(|g|, k)`` alone, the baseline;
- ``memory_pass_clone`` / ``memory_pass_sum``: one pass over the array;
- ``memory_write_zero``: one dense write (``zero_``) of an existing 25M array;
- ``select_*``: the selection kernels from :mod:`gradsparse.ops` (the C++
  extension when built), ``ref_select_*`` the pure-PyTorch reference;
- ``select_per_sign`` / ``select_gradient_dropping``: :class:`PerSignTopK` (0.5 x density of each
  sign, so about the same count) and :class:`GradientDropping` (drop ``1 - density``) ``select``,
  compositions of the same kernels (comparable with ``select_dgc_sampled``);
- ``select_pack_*``: selection, gathering the values (``index_select``, as the
  reducer does) and packing the payload;
- ``unpack_add_world4``: validating and scatter-adding 4 ranks' payloads of k
  pairs into a zeroed 25M output;
- ``roundtrip_*``: the whole :class:`SparseReducer` step on one rank
  (compensate, select, pack, unpack-add, average, memory update).

Correctness claims are asserted exactly, after the timing, against oracles that do
not use gradsparse: a full sort of ``(-|g|, index)`` (numpy, computed once) for every
top-k, a full scan (numpy) for every threshold, a numpy scatter-add for unpack-add.
Sets must equal the oracle's, counts must equal ``k``, values must be the gradient's.
The four baselines (``torch_topk``, ``memory_pass_*``, ``memory_write_zero``) are
timings only and carry no claim. ``pytest benchmarks --benchmark-disable`` runs every
function once, as a correctness check, without timing.
"""

import math

import numpy as np
import pytest
import torch

from gradsparse import DGC, GradientDropping, PerSignTopK, Threshold, TopK, _reference, ops
from gradsparse.comm import LocalCommunicator
from gradsparse.payload import parse
from gradsparse.reducer import SparseReducer
from gradsparse.stats import ALLGATHER

N = 25_000_000
DENSITIES = [0.001, 0.01]
ROUNDS = 5


@pytest.fixture(scope="module")
def grad():
    return torch.randn(N, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def full_order(grad):
    """The oracle's full sort: positions by decreasing ``|g|``, ties to the lower index (stable sort)."""
    return np.argsort(-np.abs(grad.numpy()), kind="stable")


def _topk_oracle(full_order, k):
    return torch.from_numpy(np.sort(full_order[:k]).astype(np.int64))


def _threshold_oracle(grad, tau):
    return torch.from_numpy(np.flatnonzero(np.abs(grad.numpy()) >= np.float32(tau)).astype(np.int64))


def _k(density):
    """The compressors' count, ``max(1, ceil(density * N))``."""
    return max(1, math.ceil(density * N))


def _tau(grad, density):
    return float(torch.quantile(grad[:1_000_000].abs(), 1 - density))


def _run(benchmark, density, fn, *args, setup=None):
    benchmark.group = f"25M fp32, density {density:g}"
    if setup is None:
        return benchmark.pedantic(fn, args=args, rounds=ROUNDS, warmup_rounds=1)
    return benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, warmup_rounds=1)


def _assert_payload(payload, grad, expected):
    """The payload holds exactly the oracle's positions and the gradient's values there."""
    flags, indices, values, dense = parse(payload, N, torch.float32, 0)
    assert flags == 0 and dense.numel() == 0
    assert torch.equal(indices.long(), expected)
    assert torch.equal(values, grad[expected])


@pytest.mark.parametrize("density", DENSITIES)
def test_torch_topk(benchmark, grad, density):
    """Baseline timing; no claim."""
    _run(benchmark, density, lambda g: torch.topk(g.abs(), int(density * N)), grad)


@pytest.mark.parametrize("density", DENSITIES)
def test_memory_pass_clone(benchmark, grad, density):
    """Baseline timing; no claim."""
    _run(benchmark, density, torch.clone, grad)


@pytest.mark.parametrize("density", DENSITIES)
def test_memory_pass_sum(benchmark, grad, density):
    """Baseline timing; no claim."""
    _run(benchmark, density, torch.sum, grad)


@pytest.mark.parametrize("density", DENSITIES)
def test_memory_write_zero(benchmark, grad, density):
    """Baseline timing; no claim."""
    out = torch.empty_like(grad)
    _run(benchmark, density, out.zero_)


@pytest.mark.parametrize("density", DENSITIES)
def test_ref_select_threshold(benchmark, grad, density):
    tau = _tau(grad, density)
    idx = _run(benchmark, density, _reference.threshold_indices, grad, tau)
    assert torch.equal(idx, _threshold_oracle(grad, tau))


@pytest.mark.parametrize("density", DENSITIES)
def test_ref_select_dgc_sampled(benchmark, grad, full_order, density):
    k = int(density * N)
    idx = _run(benchmark, density, _reference.sampled_topk_indices, grad, k, 0.01)
    assert idx.numel() == k and torch.equal(idx, _topk_oracle(full_order, k))


@pytest.mark.parametrize("density", DENSITIES)
def test_select_pack_threshold(benchmark, grad, density):
    tau = _tau(grad, density)

    def select_pack():
        idx = ops.threshold_indices(grad, tau)
        return ops.pack(idx, grad.index_select(0, idx), grad.new_empty(0), N, torch.float32)

    _assert_payload(_run(benchmark, density, select_pack), grad, _threshold_oracle(grad, tau))


@pytest.mark.parametrize("density", DENSITIES)
def test_select_pack_dgc(benchmark, grad, full_order, density):
    k = int(density * N)

    def select_pack():
        idx = ops.sampled_topk_indices(grad, k, 0.01)
        return ops.pack(idx, grad.index_select(0, idx), grad.new_empty(0), N, torch.float32)

    _assert_payload(_run(benchmark, density, select_pack), grad, _topk_oracle(full_order, k))


@pytest.mark.parametrize("density", DENSITIES)
def test_unpack_add_world4(benchmark, grad, density):
    k = int(density * N)
    payloads, expected = [], np.zeros(N, dtype=np.float32)
    g = grad.numpy()
    for r in range(4):
        idx = torch.randperm(N, generator=torch.Generator().manual_seed(r))[:k].sort().values
        payloads.append(ops.pack(idx, grad[idx], grad.new_empty(0), N, torch.float32))
        where = idx.numpy()
        expected[where] += g[where] * np.float32(0.25)  # the oracle: rank by rank, in fp32
    out = torch.empty_like(grad)
    flags = _run(benchmark, density, lambda: ops.unpack_add(payloads, out, torch.float32, alpha=0.25, overwrite=True))
    assert flags == 0 and torch.equal(out, torch.from_numpy(expected))


@pytest.mark.parametrize("density", DENSITIES)
def test_select_topk_exact(benchmark, grad, full_order, density):
    k = int(density * N)
    idx = _run(benchmark, density, ops.topk_indices, grad, k)
    assert idx.numel() == k and torch.equal(idx, _topk_oracle(full_order, k))


@pytest.mark.parametrize("density", DENSITIES)
def test_select_dgc_sampled(benchmark, grad, full_order, density):
    k = int(density * N)
    idx = _run(benchmark, density, ops.sampled_topk_indices, grad, k, 0.01, torch.Generator().manual_seed(0))
    assert idx.numel() == k and torch.equal(idx, _topk_oracle(full_order, k))


@pytest.mark.parametrize("density", DENSITIES)
def test_select_threshold(benchmark, grad, density):
    tau = _tau(grad, density)
    idx = _run(benchmark, density, ops.threshold_indices, grad, tau)
    assert torch.equal(idx, _threshold_oracle(grad, tau))


@pytest.mark.parametrize("density", DENSITIES)
def test_select_per_sign(benchmark, grad, density):
    c = PerSignTopK(density)
    idx = _run(benchmark, density, c.select, grad, 0, 0)
    g = grad.numpy()
    expected = []
    for sign in (1, -1):  # the oracle: each sign's values by a stable sort, largest first, ties to the lower index
        where = np.flatnonzero(sign * g > 0)
        order = where[np.argsort(-sign * g[where], kind="stable")]
        expected.append(order[:max(1, math.ceil(density * where.size))])
    assert torch.equal(idx, torch.from_numpy(np.sort(np.concatenate(expected)).astype(np.int64)))


@pytest.mark.parametrize("density", DENSITIES)
def test_select_gradient_dropping(benchmark, grad, density):
    c = GradientDropping(1.0 - density)
    idx = _run(benchmark, density, c.select, grad, 0, 0)
    mag = np.abs(grad.numpy())  # the oracle: 100,000 magnitudes at stride N // 100,000 from 0, sorted
    sample = np.sort(mag[:N // 100_000 * 100_000:N // 100_000])
    t = sample[math.floor(100_000 * (1.0 - density)) - 1]
    assert torch.equal(idx, torch.from_numpy(np.flatnonzero(mag > t).astype(np.int64)))


def _roundtrip(benchmark, grad, density, compressor, expected):
    """One rank, a fresh memory each round: the output is the gradient at exactly the oracle's positions."""
    reducer = SparseReducer(compressor, LocalCommunicator())
    stats = []
    bucket = grad.clone()

    def fresh():  # same input and an empty memory every round (steady state: no allocation)
        bucket.copy_(grad)
        for slots in reducer.memory.state.values():
            for t in slots.values():
                t.zero_()
        return (bucket,), {}

    out = _run(benchmark, density, lambda g: reducer.reduce(g, None, step=1, on_stats=stats.append).wait(),
               setup=fresh)
    assert stats[-1].transport == ALLGATHER
    assert stats[-1].selected == expected.numel()
    want = torch.zeros(N)
    want[expected] = grad[expected]
    assert torch.equal(out, want)


@pytest.mark.parametrize("density", DENSITIES)
def test_roundtrip_topk(benchmark, grad, full_order, density):
    _roundtrip(benchmark, grad, density, TopK(density), _topk_oracle(full_order, _k(density)))


@pytest.mark.parametrize("density", DENSITIES)
def test_roundtrip_dgc(benchmark, grad, full_order, density):
    # DGC's first compensation from an empty memory is v = 0.9 * 0 + g = g
    _roundtrip(benchmark, grad, density, DGC(density, warmup=None), _topk_oracle(full_order, _k(density)))


@pytest.mark.parametrize("density", DENSITIES)
def test_roundtrip_threshold(benchmark, grad, density):
    tau = _tau(grad, density)
    _roundtrip(benchmark, grad, density, Threshold(tau), _threshold_oracle(grad, tau))
