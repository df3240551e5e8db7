"""The compiled kernels (csrc/) equal the pure-PyTorch reference, bit for bit.

`make test` builds the extension, so these tests require it; set
GRADSPARSE_NO_EXTENSION=1 (which also skips building it) to run the suite without.
"""

import os

import pytest
import torch

from gradsparse import _reference as ref
from gradsparse import ops
from gradsparse.errors import PayloadError

if os.environ.get("GRADSPARSE_NO_EXTENSION") == "1":
    pytest.skip("extension disabled by GRADSPARSE_NO_EXTENSION=1", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [0, 1, 2, 17, 1001, 16_383, 16_384, 65_537, 1_000_003]


def test_extension_is_built_and_used():
    assert ops.BACKEND == "extension"
    assert hasattr(torch.ops.gradsparse, "threshold_select")


def _inputs(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_threshold_select_equals_reference(n, dtype):
    x = _inputs(n, dtype, n)
    for tau in (0.0, 1e-3, 0.1, 0.5, 2.0):
        assert torch.equal(torch.ops.gradsparse.threshold_select(x, tau), ref.threshold_indices(x, tau))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_topk_select_equals_reference(n, dtype):
    x = _inputs(n, dtype, n + 1)
    for k in {0, 1, max(1, n // 1000), max(1, n // 100), max(1, n // 3), n, n + 5}:
        got = torch.ops.gradsparse.topk_select(x, k, 0.01, 7)
        assert torch.equal(got, ref.topk_indices(x, k)), (n, k)


def test_large_input_over_2_pow_24():
    n = 2**24 + 3
    x = _inputs(n, torch.float32, 3)
    k = n // 1000
    assert torch.equal(torch.ops.gradsparse.topk_select(x, k, 0.01, 1), ref.topk_indices(x, k))
    assert torch.equal(torch.ops.gradsparse.threshold_select(x, 0.7), ref.threshold_indices(x, 0.7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_topk_select_parallel_sizes(dtype):
    # above select_core's kMinParallelNumel: several workers, several chunks
    n = 3_000_017
    x = _inputs(n, dtype, 5)
    for k in (1, n // 1000, n // 100, n // 3):
        assert torch.equal(torch.ops.gradsparse.topk_select(x, k, 0.01, 3), ref.topk_indices(x, k)), k
    assert torch.equal(torch.ops.gradsparse.threshold_select(x, 0.3), ref.threshold_indices(x, 0.3))


def test_results_do_not_depend_on_threads():
    x = _inputs(2_500_000, torch.float32, 9)
    threads = torch.get_num_threads()
    try:
        got = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            got.append((torch.ops.gradsparse.topk_select(x, 25_000, 0.01, 1),
                        torch.ops.gradsparse.threshold_select(x, 0.5)))
    finally:
        torch.set_num_threads(threads)
    for a, b in got[1:]:
        assert torch.equal(a, got[0][0]) and torch.equal(b, got[0][1])


def test_topk_select_when_the_sample_misleads():
    # every sampled position holds a large value: each threshold estimate finds too few candidates,
    # the estimate is lowered until the sample is exhausted, then every element is a candidate
    n, seed = 100_000, 5
    stride = n // 1024
    x = torch.rand(n, generator=torch.Generator().manual_seed(0))
    x[seed % stride::stride] = 10.0
    for k in (2_000, 5_000, 60_000):
        assert torch.equal(torch.ops.gradsparse.topk_select(x, k, 0.01, seed), ref.topk_indices(x, k)), k


@pytest.mark.parametrize("case", ["all_equal", "few_distinct", "ties_at_kth", "with_inf", "zeros"])
@pytest.mark.parametrize("n", [100, 50_000])
def test_special_inputs(case, n):
    g = torch.Generator().manual_seed(0)
    x = {
        "all_equal": torch.full((n,), -0.5),
        "few_distinct": torch.randint(-2, 3, (n,), generator=g).float(),
        "ties_at_kth": torch.cat([torch.full((n // 2,), 1.0), torch.full((n - n // 2,), -1.0)]),
        "with_inf": torch.randn(n, generator=g).index_fill_(0, torch.tensor([3, n - 1]), float("inf")),
        "zeros": torch.zeros(n),
    }[case]
    for k in (1, 2, n // 10, n // 2):
        assert torch.equal(torch.ops.gradsparse.topk_select(x, k, 0.01, 0), ref.topk_indices(x, k)), k
    for tau in (0.0, 0.5, 1.0, float("inf")):
        assert torch.equal(torch.ops.gradsparse.threshold_select(x, tau), ref.threshold_indices(x, tau))


@pytest.mark.parametrize("n", [100, 50_000, 2_000_003])
def test_nan_is_refused_by_topk_and_skipped_by_threshold(n):
    x = torch.randn(n)
    x[n // 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        torch.ops.gradsparse.topk_select(x, 5, 0.01, 0)
    with pytest.raises(ValueError, match="NaN"):
        ref.sampled_topk_indices(x, 5)
    assert torch.equal(torch.ops.gradsparse.threshold_select(x, 0.5), ref.threshold_indices(x, 0.5))


@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("count,n_dense", [(0, 0), (1, 3), (50, 0), (257, 9)])
def test_pack_equals_reference(value_dtype, count, n_dense):
    numel = 1000
    idx = torch.randperm(numel, generator=torch.Generator().manual_seed(count))[:count].sort().values
    values, dense = torch.randn(count), torch.randn(n_dense)
    got = torch.ops.gradsparse.pack(idx, values, dense, numel, value_dtype, 1)
    assert torch.equal(got, ref.pack(idx, values, dense, numel, value_dtype, 1))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("world,alpha,overwrite", [(1, 1.0, False), (3, 1 / 3, True), (4, 0.25, True)])
def test_unpack_add_equals_reference(out_dtype, value_dtype, world, alpha, overwrite):
    numel, g = 40_000, torch.Generator().manual_seed(world)
    dense_index = torch.tensor([39_999, 17, 20_000])  # unsorted, spread over several output chunks
    payloads = []
    for r in range(world):
        # sparse indices may coincide with dense positions: the order of additions must still match
        idx = torch.cat([torch.tensor([17, 20_000]), torch.randperm(numel, generator=g)[: 400 * (r + 1)]]).unique()
        payloads.append(ref.pack(idx, torch.randn(idx.numel(), generator=g), torch.randn(3, generator=g), numel,
                                 value_dtype, flags=r % 2))
    start = torch.randn(numel, generator=g).to(out_dtype)
    a, b = start.clone(), start.clone()
    fa = torch.ops.gradsparse.unpack_add(payloads, a, value_dtype, dense_index, alpha, overwrite)
    fb = ref.unpack_add(payloads, b, value_dtype, dense_index, alpha, overwrite)
    assert int(fa) == fb and torch.equal(a, b)


def test_unpack_add_errors_leave_destination_unchanged():
    good = ref.pack(torch.tensor([1, 5]), torch.tensor([1.0, 2.0]), torch.empty(0), 10, torch.float32)
    bad = good.clone()
    bad[36:40].view(torch.int32).fill_(11)  # last index out of range
    out = torch.arange(10.0)
    with pytest.raises(PayloadError, match="out of range"):
        ops.unpack_add([good, bad], out, torch.float32, overwrite=True)
    assert torch.equal(out, torch.arange(10.0))


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 17, 100_003])
def test_dgc_compensate_equals_reference(n, dtype, nesterov):
    g = torch.Generator().manual_seed(n)
    u, v = torch.randn(n, generator=g), torch.randn(n, generator=g)
    a_u, a_v, b_u, b_v = u.clone(), v.clone(), u.clone(), v.clone()
    for step in range(3):
        grad = torch.randn(n, generator=g).to(dtype)
        torch.ops.gradsparse.dgc_compensate(a_u, a_v, grad, 0.9, nesterov)
        ref.dgc_compensate_(b_u, b_v, grad, 0.9, nesterov)
        assert torch.equal(a_u, b_u) and torch.equal(a_v, b_v), step


def test_dgc_compensate_refuses_mismatched_state():
    with pytest.raises(ValueError, match="elements"):
        torch.ops.gradsparse.dgc_compensate(torch.zeros(3), torch.zeros(3), torch.zeros(4), 0.9, False)
    with pytest.raises(ValueError, match="float32"):
        torch.ops.gradsparse.dgc_compensate(torch.zeros(3).double(), torch.zeros(3), torch.zeros(3), 0.9, False)


def test_opcheck_every_op():
    x = torch.randn(40_000)
    torch.library.opcheck(torch.ops.gradsparse.threshold_select.default, (x, 1.0))
    torch.library.opcheck(torch.ops.gradsparse.topk_select.default, (x, 40, 0.01, 0))
    idx, vals, dense = torch.tensor([1, 7, 9]), torch.randn(3), torch.randn(2)
    torch.library.opcheck(torch.ops.gradsparse.pack.default, (idx, vals, dense, 20, torch.float16, 0))
    payload = ref.pack(idx, vals, dense, 20, torch.float32)
    torch.library.opcheck(torch.ops.gradsparse.dgc_compensate.default,
                          (torch.randn(100), torch.randn(100), torch.randn(100).half(), 0.9, True))
    torch.library.opcheck(torch.ops.gradsparse.unpack_add.default,
                          ([payload, payload], torch.zeros(20), torch.float32, torch.tensor([18, 19]), 0.5, True))
