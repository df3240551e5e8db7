"""The tolerance rule (tests/tolerances.py) and the oracles (tests/oracles.py), checked themselves.

A tolerance is only useful if it rejects the errors users hit: here real rounding
passes and planted errors (a gradient halved, 15 % of its entries zeroed) fail, in
every dtype, while the rule it replaced (rtol 1e-2, atol 1e-3) accepted them.
"""

import pytest
import torch

from ..oracles import slow_topk, threshold_oracle, topk_oracle, with_ties
from ..tolerances import close, is_close, planted_errors, rejects_planted_errors, tolerance

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _rank_gradients(world, n, seed, scale=1e-3):
    """Seeded per-rank gradients of magnitude ~``scale`` (a small model's)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) * scale for _ in range(world)]


def _ddp_average(grads, dtype):
    """What DDP's allreduce does in ``dtype``: divide each rank's gradient, then sum with a rounding per add."""
    parts = [(g.to(dtype) / len(grads)).to(dtype) for g in grads]
    total = parts[0]
    for p in parts[1:]:
        total = (total + p).to(dtype)
    return total


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_rounding_passes(dtype, world, seed):
    grads = _rank_gradients(world, 5000, seed)
    exact = sum(grads) / world
    # the hook's way: each rank's gradient rounded once to dtype, summed in fp32 (fp64 for fp64), rounded once
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    hook = sum(g.to(dtype).to(acc) * (1 / world) for g in grads).to(dtype)
    close(hook, exact, dtype)
    close(_ddp_average(grads, dtype), exact, dtype)
    close(hook, _ddp_average(grads, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_planted_errors_fail(dtype, seed):
    grads = _rank_gradients(3, 5000, seed)
    expected = _ddp_average(grads, dtype)
    for name, wrong in planted_errors(expected, seed).items():
        with pytest.raises(AssertionError, match="differ beyond"):
            close(wrong, expected, dtype)
    assert rejects_planted_errors(expected, dtype)
    # one rank's gradient halved before the average: also outside the tolerance
    halved_rank = _ddp_average([grads[0] * 0.5, *grads[1:]], dtype)
    assert not is_close(halved_rank, expected, dtype)


def test_the_old_rule_accepted_the_planted_errors():
    """Why the rule changed: rtol 1e-2 / atol 1e-3 on gradients of size ~1e-3 accepted every planted error."""
    expected = _ddp_average(_rank_gradients(3, 5000, 0, scale=3e-4), torch.float16)
    assert 5e-4 < float(expected.abs().max()) < 2e-3
    for wrong in planted_errors(expected).values():
        assert torch.allclose(wrong, expected, rtol=1e-2, atol=1e-3)
        assert not is_close(wrong, expected, torch.float16)


def test_scale_is_the_compared_quantity():
    """Parameters near 1 moved by updates near 1e-3: compare the update with its own scale."""
    p0 = torch.ones(1000, dtype=torch.float64)
    update = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-3
    wrong = p0 - 0.5 * update
    assert is_close(wrong, p0 - update, torch.float16, scale=1.0)  # the parameter's scale hides it
    assert not is_close(wrong - p0, -update, torch.float16)  # the update's scale does not


def test_message_names_the_worst_element():
    with pytest.raises(AssertionError, match=r"1 of 3 elements; worst at flat index 2"):
        close(torch.tensor([1.0, 2.0, 3.5]), torch.tensor([1.0, 2.0, 3.0]), torch.float32, what="grad")
    assert tolerance(torch.float32, 2.0, ulps=1) == 2 * torch.finfo(torch.float32).eps
    close(torch.zeros(3), torch.zeros(3), torch.float16)  # all-zero expected: exact zeros required
    assert not is_close(torch.tensor([0.0, 1e-30]), torch.zeros(2), torch.float16)
    assert not is_close(torch.tensor([float("nan")]), torch.tensor([1.0]), torch.float16)


# ---------------------------------------------------------------------------------------------- oracles

@pytest.mark.parametrize("n", [1, 2, 9, 100, 1000])
def test_topk_oracle_is_the_definition(n, seed):
    x = with_ties(n, torch.float32, seed)
    for k in sorted({0, 1, n // 3, n // 2, n}):
        assert topk_oracle(x, k).tolist() == slow_topk(x, k), k


def test_oracles_by_hand():
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0, float("inf")])
    assert topk_oracle(x, 1).tolist() == [6]
    assert topk_oracle(x, 3).tolist() == [1, 2, 6]  # ties at 2.0 go to the lower index
    assert topk_oracle(x, 0).tolist() == [] and topk_oracle(x, 99).tolist() == list(range(7))
    assert threshold_oracle(x, 2.0).tolist() == [1, 2, 4, 5, 6]
    assert threshold_oracle(torch.tensor([0.1, float("nan")]), 0.0).tolist() == [0]
    # tau is compared in the precision of the magnitudes: fp32 for fp16/bf16/fp32 input, fp64 for fp64
    just_above = 0.1 + 1e-12
    assert threshold_oracle(torch.tensor([0.1]), just_above).tolist() == [0]
    assert threshold_oracle(torch.tensor([0.1], dtype=torch.float64), just_above).tolist() == []
    with pytest.raises(ValueError, match="NaN"):
        topk_oracle(torch.tensor([1.0, float("nan"), 0.0]), 1)
