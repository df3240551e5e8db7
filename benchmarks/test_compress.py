"""Compress + decompress of a 25M-element fp32 gradient, pure-PyTorch path.

Run: ``make bench`` (or ``pytest benchmarks --benchmark-only``). Each group
(density 0.1 % and 1 %) times, in the same run:

- ``torch_topk``: ``torch.topk(|g|, k)`` alone, the baseline;
- ``memory_pass_clone`` / ``memory_pass_sum``: one pass over the array;
- ``memory_write_zero``: one dense write (``zero_``) of an existing 25M array;
- ``select_*``: the selection kernels from :mod:`gradsparse.ops` (the C++
  extension when built), ``ref_select_*`` the pure-PyTorch reference;
- ``select_pack_*``: selection, gathering the values (``index_select``, as the
  reducer does) and packing the payload;
- ``unpack_add_world4``: validating and scatter-adding 4 ranks' payloads of k
  pairs into a zeroed 25M output;
- ``roundtrip_*``: the whole :class:`SparseReducer` step on one rank
  (compensate, select, pack, unpack-add, average, memory update).
"""

import pytest
import torch

from gradsparse import DGC, Threshold, TopK, _reference, ops
from gradsparse.comm import LocalCommunicator
from gradsparse.reducer import SparseReducer

N = 25_000_000
DENSITIES = [0.001, 0.01]
ROUNDS = 5


@pytest.fixture(scope="module")
def grad():
    torch.manual_seed(0)
    return torch.randn(N)


def _run(benchmark, density, fn, *args, setup=None):
    benchmark.group = f"25M fp32, density {density:g}"
    if setup is None:
        return benchmark.pedantic(fn, args=args, rounds=ROUNDS, warmup_rounds=1)
    return benchmark.pedantic(fn, setup=setup, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("density", DENSITIES)
def test_torch_topk(benchmark, grad, density):
    _run(benchmark, density, lambda g: torch.topk(g.abs(), int(density * N)), grad)


@pytest.mark.parametrize("density", DENSITIES)
def test_memory_pass_clone(benchmark, grad, density):
    _run(benchmark, density, torch.clone, grad)


@pytest.mark.parametrize("density", DENSITIES)
def test_memory_pass_sum(benchmark, grad, density):
    _run(benchmark, density, torch.sum, grad)


@pytest.mark.parametrize("density", DENSITIES)
def test_memory_write_zero(benchmark, grad, density):
    out = torch.empty_like(grad)
    _run(benchmark, density, out.zero_)


@pytest.mark.parametrize("density", DENSITIES)
def test_ref_select_threshold(benchmark, grad, density):
    tau = float(torch.quantile(grad[:1_000_000].abs(), 1 - density))
    _run(benchmark, density, _reference.threshold_indices, grad, tau)


@pytest.mark.parametrize("density", DENSITIES)
def test_ref_select_dgc_sampled(benchmark, grad, density):
    _run(benchmark, density, _reference.sampled_topk_indices, grad, int(density * N), 0.01)


@pytest.mark.parametrize("density", DENSITIES)
def test_select_pack_threshold(benchmark, grad, density):
    tau = float(torch.quantile(grad[:1_000_000].abs(), 1 - density))

    def select_pack():
        idx = ops.threshold_indices(grad, tau)
        return ops.pack(idx, grad.index_select(0, idx), grad.new_empty(0), N, torch.float32)

    _run(benchmark, density, select_pack)


@pytest.mark.parametrize("density", DENSITIES)
def test_select_pack_dgc(benchmark, grad, density):
    def select_pack():
        idx = ops.sampled_topk_indices(grad, int(density * N), 0.01)
        return ops.pack(idx, grad.index_select(0, idx), grad.new_empty(0), N, torch.float32)

    _run(benchmark, density, select_pack)


@pytest.mark.parametrize("density", DENSITIES)
def test_unpack_add_world4(benchmark, grad, density):
    k = int(density * N)
    payloads = []
    for r in range(4):
        idx = torch.randperm(N, generator=torch.Generator().manual_seed(r))[:k].sort().values
        payloads.append(ops.pack(idx, grad[idx], grad.new_empty(0), N, torch.float32))
    out = torch.empty_like(grad)
    _run(benchmark, density, lambda: ops.unpack_add(payloads, out, torch.float32, alpha=0.25, overwrite=True))


@pytest.mark.parametrize("density", DENSITIES)
def test_select_topk_exact(benchmark, grad, density):
    idx = _run(benchmark, density, ops.topk_indices, grad, int(density * N))
    assert idx.numel() == int(density * N)


@pytest.mark.parametrize("density", DENSITIES)
def test_select_dgc_sampled(benchmark, grad, density):
    k = int(density * N)
    idx = _run(benchmark, density, ops.sampled_topk_indices, grad, k, 0.01, torch.Generator().manual_seed(0))
    assert torch.equal(idx, ops.topk_indices(grad, k))


@pytest.mark.parametrize("density", DENSITIES)
def test_select_threshold(benchmark, grad, density):
    tau = float(torch.quantile(grad[:1_000_000].abs(), 1 - density))
    idx = _run(benchmark, density, ops.threshold_indices, grad, tau)
    assert 0.8 * density * N < idx.numel() < 1.2 * density * N


def _roundtrip(benchmark, grad, density, compressor):
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
    assert not stats[-1].dense
    assert 0.5 * density * N < torch.count_nonzero(out) <= 1.5 * density * N + 1


@pytest.mark.parametrize("density", DENSITIES)
def test_roundtrip_topk(benchmark, grad, density):
    _roundtrip(benchmark, grad, density, TopK(density))


@pytest.mark.parametrize("density", DENSITIES)
def test_roundtrip_dgc(benchmark, grad, density):
    _roundtrip(benchmark, grad, density, DGC(density, warmup=None))


@pytest.mark.parametrize("density", DENSITIES)
def test_roundtrip_threshold(benchmark, grad, density):
    tau = float(torch.quantile(grad[:1_000_000].abs(), 1 - density))
    _roundtrip(benchmark, grad, density, Threshold(tau))
