"""Selection kernels against brute-force definitions."""

import pytest
import torch

from gradsparse import _reference as ref
from gradsparse import ops


def brute_topk(x: torch.Tensor, k: int) -> list[int]:
    """Sort by (-|x|, index): larger magnitude first, ties to the lower index."""
    mags = x.double().abs().tolist()
    order = sorted(range(len(mags)), key=lambda i: (-mags[i], i))
    return sorted(order[:k])


SIZES = [1, 2, 7, 33, 1000, 4097, 20_011, 70_001]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_is_exact(n, dtype):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    for k in {1, max(1, n // 100), max(1, n // 3), n}:
        assert ops.topk_indices(x, k).tolist() == brute_topk(x, k)


def test_topk_ties_go_to_lower_index():
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0])
    assert ops.topk_indices(x, 2).tolist() == [1, 2]
    assert ops.topk_indices(x, 3).tolist() == [1, 2, 4]
    assert ops.topk_indices(torch.ones(10), 4).tolist() == [0, 1, 2, 3]


def test_topk_empty_and_zero_k():
    assert ops.topk_indices(torch.empty(0), 0).tolist() == []
    assert ops.topk_indices(torch.ones(5), 0).tolist() == []


@pytest.mark.parametrize("n", SIZES)
def test_threshold_selects_exactly_at_or_above_tau(n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    for tau in (0.0, 0.5, 1.0, 3.0, 100.0):
        expected = [i for i, v in enumerate(x.tolist()) if abs(v) >= tau]
        assert ops.threshold_indices(x, tau).tolist() == expected


def test_threshold_boundary_is_inclusive():
    x = torch.tensor([0.5, -0.5, 0.49999997, 1.0])
    assert ops.threshold_indices(x, 0.5).tolist() == [0, 1, 3]


@pytest.mark.parametrize("n", [20_000, 100_003, 1_000_000])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_sampled_topk_equals_exact_topk(n, ratio):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * torch.rand(n) ** 4  # heavy-tailed
    k = max(1, round(ratio * n))
    got = ops.sampled_topk_indices(x, k, 0.01, torch.Generator().manual_seed(3))
    assert torch.equal(got, ops.topk_indices(x, k))


@pytest.mark.parametrize("case", ["all_equal", "few_distinct", "mostly_zero", "one_spike"])
def test_sampled_topk_adversarial_inputs(case):
    n, k = 50_000, 50
    g = torch.Generator().manual_seed(0)
    x = {
        "all_equal": torch.full((n,), 0.25),
        "few_distinct": torch.randint(0, 3, (n,), generator=g).float(),
        "mostly_zero": torch.zeros(n).index_fill_(0, torch.randint(0, n, (20,), generator=g), 1.0),
        "one_spike": torch.zeros(n).index_fill_(0, torch.tensor([n - 1]), -5.0),
    }[case]
    got = ops.sampled_topk_indices(x, k, 0.01, torch.Generator().manual_seed(1))
    assert got.numel() == k
    assert got.tolist() == brute_topk(x, k)


def test_sampled_topk_result_does_not_depend_on_the_sample():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(5))
    results = {tuple(ref.sampled_topk_indices(x, 200, 0.01, torch.Generator().manual_seed(s)).tolist())
               for s in range(5)}
    assert len(results) == 1
