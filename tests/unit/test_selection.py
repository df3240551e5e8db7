"""Every selection path against the brute-force oracle (tests/oracles.py), never against itself.

Paths: ``ops`` (the compiled kernels where the extension is built; the reference under
``GRADSPARSE_BACKEND=reference``) and ``_reference``, each for threshold, exact top-k
and sampled top-k; the compressors' ``select`` (TopK, DGC with and without warm-up,
Threshold under a loss scale); and the reducer's per-parameter and per-bucket selection
(what actually goes out). Inputs are seeded (the test's seed, see tests/conftest.py),
heavy-tailed or full of exact ties, in fp16, bf16, fp32 and fp64, with sizes on both
sides of the reference's sampling threshold (16,384) and of the CPU kernels' parallel
threshold (2**20).
"""

import math

import pytest
import torch

from gradsparse import DGC, Threshold, TopK, Warmup
from gradsparse import _reference as ref
from gradsparse import ops
from gradsparse.comm import LocalCommunicator
from gradsparse.reducer import Segment, SparseReducer

from ..oracles import count_for, heavy_tailed, threshold_oracle, topk_oracle, with_ties

PATHS = {
    "ops": (ops.topk_indices, ops.sampled_topk_indices, ops.threshold_indices),
    "reference": (ref.topk_indices, ref.sampled_topk_indices, ref.threshold_indices),
}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SIZES = [1, 2, 7, 33, 1000, 4097, 16_384, 20_011, 70_001]
LARGE = 1_048_583  # above the CPU kernels' kMinParallelNumel (2**20)
KINDS = {"heavy": heavy_tailed, "ties": with_ties}


def _input(kind, n, dtype, seed):
    return KINDS[kind](n, dtype, seed)


def _ks(n):
    return sorted({1, max(1, n // 1000), max(1, n // 100), max(1, n // 3), n})


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_exact_topk_equals_oracle(path, n, dtype, kind, seed):
    x = _input(kind, n, dtype, seed)
    topk = PATHS[path][0]
    for k in _ks(n):
        assert torch.equal(topk(x, k), topk_oracle(x, k)), (n, k)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [20_011, 100_003, LARGE])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_sampled_topk_equals_oracle(path, n, dtype, kind, seed):
    x = _input(kind, n, dtype, seed)
    sampled = PATHS[path][1]
    for ratio in (0.001, 0.01, 0.1):
        k = max(1, round(ratio * n))
        got = sampled(x, k, 0.01, torch.Generator().manual_seed(seed + k))
        assert torch.equal(got, topk_oracle(x, k)), (n, k)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_large_exact_topk_and_threshold_equal_oracle(path, seed):
    x = _input("heavy", LARGE, torch.float32, seed)
    topk, _, threshold = PATHS[path]
    for k in (1, LARGE // 1000, LARGE // 3):
        assert torch.equal(topk(x, k), topk_oracle(x, k)), k
    assert torch.equal(threshold(x, 0.3), threshold_oracle(x, 0.3))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_threshold_equals_oracle(path, n, dtype, kind, seed):
    x = _input(kind, n, dtype, seed)
    threshold = PATHS[path][2]
    mags = x.double().abs()
    # values present in x (the boundary is inclusive), a tau between values, 0 and beyond the largest
    taus = [0.0, float(mags.median()), float(mags.max()), float(mags.max()) * 1.5, 1e-3, 0.3]
    for tau in taus:
        assert torch.equal(threshold(x, tau), threshold_oracle(x, tau)), tau


def test_threshold_boundary_is_inclusive():
    x = torch.tensor([0.5, -0.5, 0.49999997, 1.0])
    for _, _, threshold in PATHS.values():
        assert threshold(x, 0.5).tolist() == [0, 1, 3] == threshold_oracle(x, 0.5).tolist()


def test_ties_go_to_lower_index():
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 2.0])
    for topk, sampled, _ in PATHS.values():
        for k, want in ((2, [1, 2]), (3, [1, 2, 4])):
            assert topk(x, k).tolist() == sampled(x, k).tolist() == topk_oracle(x, k).tolist() == want
        assert topk(torch.ones(10), 4).tolist() == [0, 1, 2, 3]


def test_empty_and_zero_k():
    for topk, sampled, threshold in PATHS.values():
        assert topk(torch.empty(0), 0).tolist() == [] and topk(torch.ones(5), 0).tolist() == []
        assert sampled(torch.ones(50_000), 0).tolist() == []
        assert threshold(torch.empty(0), 0.5).tolist() == []


@pytest.mark.parametrize("case", ["all_equal", "few_distinct", "mostly_zero", "one_spike", "misleading_sample"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_sampled_topk_adversarial_inputs(path, case):
    n, k = 50_000, 50
    g = torch.Generator().manual_seed(0)
    x = {
        "all_equal": torch.full((n,), 0.25),
        "few_distinct": torch.randint(0, 3, (n,), generator=g).float(),
        "mostly_zero": torch.zeros(n).index_fill_(0, torch.randint(0, n, (20,), generator=g), 1.0),
        "one_spike": torch.zeros(n).index_fill_(0, torch.tensor([n - 1]), -5.0),
        # every stride-th value large: whatever the sample's start, its estimate misleads
        "misleading_sample": torch.rand(n, generator=g).index_fill_(0, torch.arange(0, n, 7), 10.0),
    }[case]
    for k in (50, 5_000, 30_000):
        got = PATHS[path][1](x, k, 0.01, torch.Generator().manual_seed(1))
        assert got.numel() == k
        assert torch.equal(got, topk_oracle(x, k)), k


def test_the_sample_sees_a_periodic_gradient_in_proportion():
    # The gradient of a 3x3 convolution whose input is 1x1 (ResNet-50's last stage on 32x32 images) is
    # non-zero only at the kernel's centre, every 9th element. The sampled selection's stride there is
    # 99: from one start it sampled only zeros (or only centres), its bracket said nothing, and the
    # selection fell back to radix passes (10x slower). One position drawn per stride sees the centres
    # in proportion, for any seed; the kernels draw the same positions (tests/tools/test_constants.py).
    n = 512 * 512 * 9
    stride = n // math.ceil(n * 0.01)
    assert stride % 9 == 0
    for seed in (0, 1, 4, 12345, 2**31 - 2):
        positions = ref.sample_positions(n, stride, seed)
        assert torch.equal(positions // stride, torch.arange(positions.numel()))  # one in each stride
        centre = (positions % 9 == 4).double().mean().item()
        assert 0.09 < centre < 0.13, (seed, centre)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_sampled_topk_result_does_not_depend_on_the_sample(path):
    x = heavy_tailed(200_000, torch.float32, 5)
    expected = topk_oracle(x, 200)
    for s in range(5):
        assert torch.equal(PATHS[path][1](x, 200, 0.01, torch.Generator().manual_seed(s)), expected), s


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["ops", "reference"])
def test_segmented_topk_equals_oracle_per_segment(path, dtype, kind, seed):
    """One call for a bucket of tensors: each segment's own oracle top-k, shifted by its offset."""
    segmented = {"ops": ops.segmented_topk_indices, "reference": ref.segmented_topk_indices}[path]
    lengths = [1, 7, 1000, 0, 20_011, 4097, LARGE]
    x = torch.cat([_input(kind, n, dtype, seed + i) * 10.0 ** (i % 3) for i, n in enumerate(lengths)])
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    for ratio in (0.001, 0.01, 0.25):
        ks = torch.tensor([count_for(ratio, n) if n else 0 for n in lengths])
        expected = torch.cat([topk_oracle(x[a:b], k) + a for a, b, k in
                              zip(offsets.tolist(), offsets[1:].tolist(), ks.tolist())])
        assert torch.equal(segmented(x, offsets, ks, 0.01, torch.Generator().manual_seed(seed)), expected), ratio


# ------------------------------------------------------------------------------------- compressors

@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("n", [1, 1000, 20_011, LARGE])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.3, 1.0])
def test_topk_and_dgc_select_the_oracle_top_k(ratio, n, kind, seed):
    v = _input(kind, n, torch.float32, seed)  # memories hand compressors fp32
    k = count_for(ratio, n)
    assert k == max(1, math.ceil(ratio * n)) or k == n
    expected = topk_oracle(v, k)
    assert torch.equal(TopK(ratio).select(v, 5, 0), expected)
    assert torch.equal(DGC(ratio, warmup=None, seed=seed).select(v, 5, 0), expected)


def test_dgc_select_follows_the_warmup_count(seed):
    v = heavy_tailed(50_000, torch.float32, seed)
    dgc = DGC(0.001, warmup=Warmup(ratios=(0.25, 0.05), length=2, unit="step"))
    for step, ratio in enumerate([0.25, 0.25, 0.05, 0.05, 0.001, 0.001]):
        assert torch.equal(dgc.select(v, step, 0), topk_oracle(v, count_for(ratio, v.numel()))), step


@pytest.mark.parametrize("loss_scale", [1.0, 1024.0, 2.0**-8])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_threshold_select_is_the_oracle_scan_at_the_scaled_tau(kind, loss_scale, seed):
    v = _input(kind, 70_001, torch.float32, seed) * loss_scale
    for tau in (0.0, 0.125, 0.3, 2.0):
        got = Threshold(tau).select(v, 0, 0, loss_scale=loss_scale)
        assert torch.equal(got, threshold_oracle(v, tau * loss_scale)), tau


# ------------------------------------------------------------------------- what the reducer sends

SEGMENTS = [Segment("loud", 0, 3000), Segment("small", 3000, 50), Segment("quiet", 3050, 20_000),
            Segment("large", 23_050, LARGE)]
SCALES = {"loud": 100.0, "small": 1.0, "quiet": 0.01, "large": 1.0}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("method", ["topk", "dgc", "threshold"])
@pytest.mark.parametrize("granularity", ["parameter", "bucket"])
def test_reducer_sends_the_oracle_selection(granularity, method, kind, seed):
    """Per parameter, each tensor's own top-k; per bucket, one top-k over the bucket's compressed tensors.

    One rank, a fresh memory, fp32 wire: what goes out is the gradient itself at the
    selected positions (DGC's first compensation is ``v = g``), so the output's nonzero
    positions and values are compared with the oracle run on the test's own copy.
    """
    ratio, tau = 0.01, 1.0
    compressor = {"topk": TopK(ratio), "dgc": DGC(ratio, warmup=None, seed=seed), "threshold": Threshold(tau)}[method]
    r = SparseReducer(compressor, LocalCommunicator(), granularity=granularity, min_compress_numel=100)
    numel = sum(s.numel for s in SEGMENTS)
    g = torch.empty(numel)
    for i, s in enumerate(SEGMENTS):
        g[s.offset:s.offset + s.numel] = _input(kind, s.numel, torch.float32, seed + i) * SCALES[s.key]
    out = r.reduce(g.clone(), SEGMENTS, step=3).wait()

    compressed = [s for s in SEGMENTS if s.key != "small"]
    groups = [[s] for s in compressed] if granularity == "parameter" else [compressed]
    expected = torch.zeros(numel)
    small = SEGMENTS[1]
    expected[small.offset:small.offset + small.numel] = g[small.offset:small.offset + small.numel]  # sent whole
    for group in groups:
        positions = torch.cat([torch.arange(s.offset, s.offset + s.numel) for s in group])
        joined = g[positions]
        chosen = threshold_oracle(joined, tau) if method == "threshold" else \
            topk_oracle(joined, count_for(ratio, joined.numel()))
        expected[positions[chosen]] = joined[chosen]
    assert torch.equal(out, expected)
    if granularity == "bucket" and method != "threshold":  # the loud tensor takes more than its own k
        loud = SEGMENTS[0]
        assert int(torch.count_nonzero(out[loud.offset:loud.offset + loud.numel])) > count_for(ratio, loud.numel)
