"""The compiled kernels (csrc/) equal the pure-PyTorch reference bit for bit, and the selection
kernels equal the brute-force oracle (tests/oracles.py), on every device.

Every kernel test is parametrized by device: ``cpu`` always, ``cuda`` where
``torch.cuda.is_available()`` (skipped otherwise, with the reason), so the same tests
run the CUDA kernels on a GPU machine. Inputs are drawn on the CPU from seeded
generators and moved to the device; results come back to the CPU to be compared
with the reference (run on the CPU) and the oracle.

`make test` builds the extension, so these tests require it; set
GRADSPARSE_NO_EXTENSION=1 (which also skips building it) to run the suite without.
With GRADSPARSE_BACKEND=reference (the mutation run's reference mode) the extension is
not loaded and these tests are skipped.
"""

import itertools
import math
import os

import pytest
import torch

from gradsparse import _reference as ref
from gradsparse import ops
from gradsparse.errors import PayloadError
from gradsparse.payload import HEADER_BYTES, PayloadLayout

from ..oracles import threshold_oracle, topk_oracle

if os.environ.get("GRADSPARSE_NO_EXTENSION") == "1":
    pytest.skip("extension disabled by GRADSPARSE_NO_EXTENSION=1", allow_module_level=True)
if os.environ.get("GRADSPARSE_BACKEND") == "reference":
    pytest.skip("GRADSPARSE_BACKEND=reference: the extension is not loaded", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [0, 1, 2, 17, 1001, 16_383, 16_384, 65_537, 1_000_003]
ORACLE_MAX = 3_000_017  # the oracle's full sort is run up to this size
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here (torch.cuda.is_available() is False): "
    "the cuda cases run on a GPU machine"))]


def test_extension_is_built_and_used():
    assert ops.BACKEND == "extension"
    assert hasattr(torch.ops.gradsparse, "threshold_select")
    if torch.cuda.is_available():
        assert "cuda" in ops.KERNEL_DEVICES, "a GPU is present but the extension has no CUDA kernels"


def _topk(x, k, device, sample_ratio=0.01, seed=7):
    """The compiled top-k on ``device``, back on the CPU."""
    return torch.ops.gradsparse.topk_select(x.to(device), k, sample_ratio, seed).cpu()


def _threshold(x, tau, device):
    return torch.ops.gradsparse.threshold_select(x.to(device), tau).cpu()


def _inputs(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 3
    return x.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_threshold_select_equals_reference_and_oracle(n, dtype, device):
    x = _inputs(n, dtype, n)
    for tau in (0.0, 1e-3, 0.1, 0.5, 2.0):
        got = _threshold(x, tau, device)
        assert torch.equal(got, ref.threshold_indices(x, tau)), tau
        assert torch.equal(got, threshold_oracle(x, tau)), tau


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_topk_select_equals_reference_and_oracle(n, dtype, device):
    x = _inputs(n, dtype, n + 1)
    for k in sorted({0, 1, max(1, n // 1000), max(1, n // 100), max(1, n // 3), n, n + 5}):
        got = _topk(x, k, device)
        assert torch.equal(got, ref.topk_indices(x, k)), (n, k)
        assert torch.equal(got, topk_oracle(x, k)), (n, k)


@pytest.mark.parametrize("device", DEVICES)
def test_large_input_over_2_pow_24(device):
    n = 2**24 + 3
    x = _inputs(n, torch.float32, 3)
    for k in (n // 1000, n // 4):  # a small k (positions kept by pass 1) and a large one (pass 2 reads x again)
        assert torch.equal(_topk(x, k, device, seed=1), ref.topk_indices(x, k)), k
    assert torch.equal(_threshold(x, 0.7, device), ref.threshold_indices(x, 0.7))
    assert torch.equal(_threshold(x, 0.7, device), threshold_oracle(x, 0.7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_topk_select_parallel_sizes(dtype, device):
    # above select_core's kMinParallelNumel (2**20): several workers, several chunks on the CPU
    n = ORACLE_MAX
    x = _inputs(n, dtype, 5)
    for k in (1, n // 1000, n // 100, n // 3):
        got = _topk(x, k, device, seed=3)
        assert torch.equal(got, ref.topk_indices(x, k)), k
        assert torch.equal(got, topk_oracle(x, k)), k
    assert torch.equal(_threshold(x, 0.3, device), ref.threshold_indices(x, 0.3))
    assert torch.equal(_threshold(x, 0.3, device), threshold_oracle(x, 0.3))


def test_results_do_not_depend_on_threads():
    """CPU only: the number of OpenMP threads must not change a result."""
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


@pytest.mark.parametrize("device", DEVICES)
def test_topk_select_when_the_sample_misleads(device):
    # every sampled position holds a large value: each threshold estimate finds too few candidates,
    # the estimate is lowered until the sample is exhausted, then every element is a candidate
    n, seed = 100_000, 5
    stride = n // 1024
    x = torch.rand(n, generator=torch.Generator().manual_seed(0))
    x[seed % stride::stride] = 10.0
    for k in (2_000, 5_000, 60_000):
        got = _topk(x, k, device, seed=seed)
        assert torch.equal(got, ref.topk_indices(x, k)), k
        assert torch.equal(got, topk_oracle(x, k)), k


def _sample_positions(n, sample_ratio, seed):
    """The positions topk_select samples: a stride of n // sample size from seed % stride (csrc/cpu/topk_core.h)."""
    stride = n // min(n, max(1024, math.ceil(n * sample_ratio)))
    return torch.arange(seed % stride, n, stride)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["sample_high", "sample_low", "crowded_bracket", "zeros_at_kth"])
def test_topk_select_every_path(case, device):
    """Inputs built so that the CPU kernel takes each of its ways to the k-th magnitude.

    The sample brackets the k-th magnitude between two of its values. ``sample_high``: every
    sampled value is larger than the rest (the bracket lies above the k-th: radix digits below
    it); ``sample_low``: every sampled value is smaller (the bracket lies below: radix digits
    above it); ``crowded_bracket``: the unsampled values crowd around the median, inside the
    bracket, more than are kept (radix digits inside it) for k = n/2 and the bracket itself
    for other k; ``zeros_at_kth``: 80 % zeros, so the k-th magnitude is the bracket's lower end
    for large k (ties to the lower positions among the zeros). Checked in a C++ harness
    against the kernel's counts when written; each is the exact top-k whatever the path.
    """
    n, seed = 2_000_003, 5
    g = torch.Generator().manual_seed(1)
    r = torch.rand(n, generator=g)
    sampled = torch.zeros(n, dtype=torch.bool)
    sampled[_sample_positions(n, 0.01, seed)] = True
    x = {
        "sample_high": torch.where(sampled, 10.0 + r, r),
        "sample_low": torch.where(sampled, r * 1e-3, 1.0 + r),
        "crowded_bracket": torch.where(sampled, r, 0.5 + (r - 0.5) * 1e-3),
        "zeros_at_kth": torch.where(torch.arange(n) % 5 == 0, 1.0 + r, torch.zeros(n)),
    }[case]
    for k in (n // 1000, n // 10, n // 2, 3 * n // 10):
        got = _topk(x, k, device, seed=seed)
        assert torch.equal(got, ref.topk_indices(x, k)), k
        assert torch.equal(got, topk_oracle(x, k)), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k_per_mille", [1, 10, 25])
def test_small_k_with_ties_around_the_kth_over_many_chunks(k_per_mille, device):
    """Small k keeps every position at or above the bracket's low end, tagged, and pass 2 picks from them
    without a branch per position (csrc/cpu/topk_core.h): magnitudes in steps of 1/64, so thousands tie at
    the k-th, across the chunks of 2M elements, give the exact top-k with ties to the lower positions."""
    g = torch.Generator().manual_seed(k_per_mille)
    x = torch.round(torch.randn(2_000_003, generator=g) * 64) / 64
    k = x.numel() * k_per_mille // 1000
    got = _topk(x, k, device, seed=3)
    assert torch.equal(got, ref.topk_indices(x, k))
    assert torch.equal(got, topk_oracle(x, k))


@pytest.mark.parametrize("device", DEVICES)
def test_small_k_with_a_bracket_too_crowded_to_keep(device):
    """Small k keeps positions, and the bracket's keys up to a limit (csrc/cpu/topk_core.h, pass 1): here one
    element in 25, unsampled, sits inside the sample's bracket, about 80K keys against a limit of 64K (checked in
    a C++ harness when written), so the keys stop being kept mid-pass and the k-th comes from radix digits."""
    n, seed = 2_000_003, 5
    r = torch.rand(n, generator=torch.Generator().manual_seed(1))
    sampled = torch.zeros(n, dtype=torch.bool)
    sampled[_sample_positions(n, 0.01, seed)] = True
    crowd = (torch.arange(n) % 25 == 0) & ~sampled
    x = torch.where(sampled, r, torch.where(crowd, 0.999 + r * 1e-5, r * 0.5))
    for k in (n // 1000, n // 200):
        got = _topk(x, k, device, seed=seed)
        assert torch.equal(got, ref.topk_indices(x, k)), k
        assert torch.equal(got, topk_oracle(x, k)), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["all_equal", "few_distinct", "ties_at_kth", "with_inf", "zeros"])
@pytest.mark.parametrize("n", [100, 50_000])
def test_special_inputs(case, n, device):
    g = torch.Generator().manual_seed(0)
    x = {
        "all_equal": torch.full((n,), -0.5),
        "few_distinct": torch.randint(-2, 3, (n,), generator=g).float(),
        "ties_at_kth": torch.cat([torch.full((n // 2,), 1.0), torch.full((n - n // 2,), -1.0)]),
        "with_inf": torch.randn(n, generator=g).index_fill_(0, torch.tensor([3, n - 1]), float("inf")),
        "zeros": torch.zeros(n),
    }[case]
    for k in (1, 2, n // 10, n // 2):
        got = _topk(x, k, device, seed=0)
        assert torch.equal(got, ref.topk_indices(x, k)), k
        assert torch.equal(got, topk_oracle(x, k)), k
    for tau in (0.0, 0.5, 1.0, float("inf")):
        got = _threshold(x, tau, device)
        assert torch.equal(got, ref.threshold_indices(x, tau)), tau
        assert torch.equal(got, threshold_oracle(x, tau)), tau


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [100, 50_000, 2_000_003])
def test_nan_is_refused_by_topk_and_skipped_by_threshold(n, device):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    x[n // 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        torch.ops.gradsparse.topk_select(x.to(device), 5, 0.01, 0)
    with pytest.raises(ValueError, match="NaN"):
        ref.sampled_topk_indices(x, 5)
    got = _threshold(x, 0.5, device)
    assert torch.equal(got, ref.threshold_indices(x, 0.5))
    assert torch.equal(got, threshold_oracle(x, 0.5))


# ------------------------------------------------------------------ segmented_topk_select

SEGMENT_LENGTHS = [0, 1, 2, 17, 1001, 16_383, 16_384, 70_001, 1_100_003]  # the last above kMinParallelNumel


def _segments(lengths, seed):
    """Offsets of consecutive segments of the given lengths (in shuffled order) and a k for each:
    0, 1, its length, beyond it, negative, or a density from 0.1 % to 50 %."""
    g = torch.Generator().manual_seed(seed)
    lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=g).tolist()]
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    choices = [lambda n: 0, lambda n: 1, lambda n: n, lambda n: n + 3, lambda n: -2,
               *[lambda n, d=d: max(1, math.ceil(d * n)) for d in (0.001, 0.01, 0.0625, 0.25, 0.5)]]
    ks = torch.tensor([choices[int(torch.randint(len(choices), (1,), generator=g))](n) for n in lengths])
    return offsets, ks


def _segmented(x, offsets, ks, device, seed=7):
    return torch.ops.gradsparse.segmented_topk_select(x.to(device), offsets.to(device), ks.to(device), 0.01,
                                                      seed).cpu()


def _per_segment(x, offsets, ks, device):
    """The contract: each segment's topk_select, shifted by its offset, concatenated."""
    parts = [torch.empty(0, dtype=torch.int64)]
    for i, k in enumerate(ks.tolist()):
        a, b = offsets[i].item(), offsets[i + 1].item()
        parts.append(_topk(x[a:b], k, device) + a)
    return torch.cat(parts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmented_topk_select_equals_each_segments_topk(seed, dtype, device):
    offsets, ks = _segments(SEGMENT_LENGTHS, seed)
    x = _inputs(int(offsets[-1]), dtype, seed)
    got = _segmented(x, offsets, ks, device)
    assert torch.equal(got, _per_segment(x, offsets, ks, device))
    assert torch.equal(got, ref.segmented_topk_indices(x, offsets, ks))
    for i, k in enumerate(ks.tolist()):  # and each segment's part is the oracle's top-k of that segment
        a, b = offsets[i].item(), offsets[i + 1].item()
        part = got[(got >= a) & (got < b)] - a
        assert torch.equal(part, topk_oracle(x[a:b], k)), (i, b - a, k)


@pytest.mark.parametrize("device", DEVICES)
def test_segmented_topk_select_ties_and_edges(device):
    # ties everywhere (zeros, equal magnitudes of both signs), single-element segments, an empty
    # segment between others, a segment beginning after 0 and one ending before the end of x
    x = torch.cat([torch.zeros(40_000), torch.full((30_000,), -0.5), torch.full((30_000,), 0.5),
                   torch.tensor([3.0, -3.0, 1.0]), torch.randint(-2, 3, (50_000,)).float()])
    offsets = torch.tensor([5, 40_005, 40_005, 100_000, 100_001, 100_002, 100_003, 150_000])
    for ks in (torch.tensor([100, 7, 30_000, 1, 1, 1, 20_000]), torch.tensor([40_000, 0, 59_995, 0, 1, 0, 49_997]),
               torch.tensor([39_999, 3, 29_999, 2, 0, 5, 1])):
        got = _segmented(x, offsets, ks, device)
        assert torch.equal(got, _per_segment(x, offsets, ks, device)), ks
        assert torch.equal(got, ref.segmented_topk_indices(x, offsets, ks)), ks
    empty = _segmented(x, torch.tensor([0]), torch.empty(0, dtype=torch.int64), device)
    assert empty.dtype == torch.int64 and empty.numel() == 0


def test_segmented_topk_select_does_not_depend_on_threads():
    """CPU only: the worker count changes which segments run side by side, never a result."""
    offsets, ks = _segments(SEGMENT_LENGTHS + [2_500_000, 300, 40_000], 4)
    x = _inputs(int(offsets[-1]), torch.float32, 4)
    threads = torch.get_num_threads()
    try:
        got = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            got.append(torch.ops.gradsparse.segmented_topk_select(x, offsets, ks, 0.01, 1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])
    assert torch.equal(got[0], ref.segmented_topk_indices(x, offsets, ks))


@pytest.mark.parametrize("device", DEVICES)
def test_segmented_topk_select_refuses_nan_in_a_selected_segment(device):
    x = torch.randn(60_000, generator=torch.Generator().manual_seed(0))
    x[45_000] = float("nan")
    offsets = torch.tensor([0, 20_000, 40_000, 60_000])
    with pytest.raises(ValueError, match="segment 2 contains NaN"):
        _segmented(x, offsets, torch.tensor([10, 10, 10]), device)
    with pytest.raises(ValueError, match="segment 2 contains NaN"):
        ref.segmented_topk_indices(x, offsets, torch.tensor([10, 10, 10]))
    for ks in (torch.tensor([10, 10, 0]), torch.tensor([10, 10, 20_000])):  # not selected from, or all of it
        assert torch.equal(_segmented(x, offsets, ks, device), ref.segmented_topk_indices(x, offsets, ks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offsets,ks,match", [
    ([0, 10, 5], [1, 1], "must not decrease"),
    ([0, 10, 101], [1, 1], r"must lie in \[0, 100\]"),
    ([-1, 10], [1], r"must lie in \[0, 100\]"),
    ([0, 10], [1, 1], "one more element"),
])
def test_segmented_topk_select_refuses_bad_segments(offsets, ks, match, device):
    x = torch.randn(100).to(device)
    with pytest.raises(ValueError, match=match):
        torch.ops.gradsparse.segmented_topk_select(x, torch.tensor(offsets, device=device),
                                                   torch.tensor(ks, device=device), 0.01, 0)
    with pytest.raises(ValueError, match="int64"):
        torch.ops.gradsparse.segmented_topk_select(x, torch.tensor([0, 10], dtype=torch.int32, device=device),
                                                   torch.tensor([1], device=device), 0.01, 0)
    if match != "one more element":
        with pytest.raises(ValueError, match="segmented_topk_select"):
            ref.segmented_topk_indices(x.cpu(), torch.tensor(offsets), torch.tensor(ks))


# ------------------------------------------------------------------ segmented_topk_select_pack

def _select_pack(x, offsets, ks, dense, numel, device, seed=7, flags=0):
    """segmented_topk_select_pack's positions and payload (into a buffer of 0xAB bytes: every byte is written);
    a second call with a bitmap (of -1 words: every word is zeroed first) must return the same positions and
    bytes, and a bitmap of exactly those positions."""
    n = int(torch.ops.gradsparse.segmented_topk_select(x.to(device), offsets.to(device), ks.to(device), 0.01,
                                                       seed).numel())
    out = torch.full((PayloadLayout(n, dense.numel(), torch.float32).nbytes,), 0xAB, dtype=torch.uint8, device=device)
    positions = torch.ops.gradsparse.segmented_topk_select_pack(x.to(device), offsets.to(device), ks.to(device), 0.01,
                                                                seed, dense.to(device), numel, flags, out)
    again = torch.full_like(out, 0xCD)
    bits = torch.full((ops.bitmap_words(x.numel()),), -1, dtype=torch.int64, device=device)
    assert torch.equal(torch.ops.gradsparse.segmented_topk_select_pack(
        x.to(device), offsets.to(device), ks.to(device), 0.01, seed, dense.to(device), numel, flags, again, bits),
        positions)
    assert torch.equal(again, out)
    assert torch.equal(bits.cpu(), _bitmap_of(positions.cpu(), x.numel()))
    return positions.cpu(), out.cpu()


def _bitmap_of(positions, numel):
    """The bitmap of distinct positions, one Python int per word (bit p % 64 of word p // 64)."""
    words = [0] * ops.bitmap_words(numel)
    for p in positions.tolist():
        words[p // 64] |= 1 << (p % 64)
    return torch.tensor([w - (1 << 64) if w >= 1 << 63 else w for w in words], dtype=torch.int64)


def _packed_after(x, positions, dense, numel, flags=0):
    """The contract: pack_gathered of segmented_topk_select's positions, fp32 values (the reference's bytes)."""
    out = torch.empty(PayloadLayout(positions.numel(), dense.numel(), torch.float32).nbytes, dtype=torch.uint8)
    ref.pack_gathered(positions, x.float(), dense, numel, torch.float32, flags, out)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmented_topk_select_pack_equals_select_then_pack(seed, dtype, device):
    """Every path of pass 2 (kept positions at small k, the dense and sparse AVX2 blocks and the scalar tail at
    large k, whole segments, k = 0): the positions of segmented_topk_select and the bytes of pack_gathered."""
    offsets, ks = _segments(SEGMENT_LENGTHS, seed)
    x = _inputs(int(offsets[-1]), dtype, seed)
    dense = torch.randn(5, generator=torch.Generator().manual_seed(seed)).to(dtype)
    numel = int(offsets[-1]) + 11
    positions, payload = _select_pack(x, offsets, ks, dense, numel, device, flags=seed)
    assert torch.equal(positions, _segmented(x, offsets, ks, device))
    assert torch.equal(payload, _packed_after(x, positions, dense, numel, flags=seed))
    got = torch.empty_like(payload)
    bits = torch.empty(ops.bitmap_words(x.numel()), dtype=torch.int64)
    assert torch.equal(ref.segmented_topk_select_pack(x, offsets, ks, 0.01, None, dense, numel, seed, got, bits),
                       positions)
    assert torch.equal(got, payload)
    assert torch.equal(bits, _bitmap_of(positions, x.numel()))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_selection_bitmap_does_not_depend_on_threads(threads):
    """Segments at offsets that are not multiples of 64 (words shared by neighbours), small ones side by side on
    several workers and a large one split over all of them, at the densities of every path of pass 2: the
    bitmap is exactly the positions' whatever the thread count (shared words take atomic ORs)."""
    g = torch.Generator().manual_seed(threads)
    lengths = [37, 4_100, 70, 1_500_001, 9_000, 130, 250_000, 5]
    offsets = torch.tensor([0, *itertools.accumulate(lengths)])
    x = torch.randn(int(offsets[-1]), generator=g)
    ks = torch.tensor([37, 1_000, 3, 375_001, 9, 130, 20_000, 2])  # whole, large, small k
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        positions, _ = _select_pack(x, offsets, ks, torch.empty(0), x.numel(), "cpu")
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(positions, ref.segmented_topk_indices(x, offsets, ks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.0625, 0.25])
def test_segmented_topk_select_pack_with_ties_across_chunks(density, device):
    """Magnitudes in steps of 1/64 (thousands tie at each k-th) over a segment of several chunks, between two
    others: the pairs written beside the positions follow the ties allowed to the lower positions."""
    g = torch.Generator().manual_seed(3)
    x = torch.round(torch.randn(2_600_003, generator=g) * 64) / 64
    offsets = torch.tensor([0, 77, 2_500_077, 2_600_003])
    ks = torch.tensor([5, math.ceil(density * 2_500_000), math.ceil(density * 99_926)])
    positions, payload = _select_pack(x, offsets, ks, torch.empty(0), 2_600_003, device)
    assert torch.equal(positions, ref.segmented_topk_indices(x, offsets, ks))
    assert torch.equal(payload, _packed_after(x, positions, torch.empty(0), 2_600_003))


@pytest.mark.parametrize("device", DEVICES)
def test_segmented_topk_select_pack_refuses_what_it_cannot_write(device):
    x = torch.randn(60_000, generator=torch.Generator().manual_seed(0)).to(device)
    offsets, ks = torch.tensor([0, 20_000, 60_000], device=device), torch.tensor([10, 10], device=device)
    dense = torch.randn(3, device=device)
    good = PayloadLayout(20, 3, torch.float32).nbytes
    for out in (torch.empty(good - 8, dtype=torch.uint8, device=device),
                torch.empty(good, dtype=torch.int8, device=device)):
        with pytest.raises(ValueError, match="out must be a contiguous 1-D uint8 tensor"):
            torch.ops.gradsparse.segmented_topk_select_pack(x, offsets, ks, 0.01, 0, dense, 60_000, 0, out)
    out = torch.empty(good, dtype=torch.uint8, device=device)
    for numel in (2**31, 59_999):
        with pytest.raises(ValueError, match="must hold x's 60000 elements and fit int32"):
            torch.ops.gradsparse.segmented_topk_select_pack(x, offsets, ks, 0.01, 0, dense, numel, 0, out)
        with pytest.raises(ValueError, match="must hold x's 60000 elements and fit int32"):
            ref.segmented_topk_select_pack(x.cpu(), offsets.cpu(), ks.cpu(), 0.01, None, dense.cpu(), numel, 0,
                                           out.cpu())
    x64 = x.double()  # not fp32 (the selection, then pack_gathered): checked the same
    with pytest.raises(ValueError, match="must hold x's 60000 elements and fit int32"):
        torch.ops.gradsparse.segmented_topk_select_pack(x64, offsets, ks, 0.01, 0, dense, 59_999, 0, out)
    for bits, match in ((torch.zeros(937, dtype=torch.int64, device=device), "938 are needed for 60000"),
                        (torch.zeros(939, dtype=torch.int64, device=device), "938 are needed for 60000"),
                        (torch.zeros(938, dtype=torch.int32, device=device), "contiguous 1-D int64"),
                        (torch.zeros(938 * 2, dtype=torch.int64, device=device)[::2], "contiguous 1-D int64")):
        with pytest.raises(ValueError, match=match):
            torch.ops.gradsparse.segmented_topk_select_pack(x, offsets, ks, 0.01, 0, dense, 60_000, 0, out, bits)
        with pytest.raises(ValueError, match=match):
            ref.segmented_topk_select_pack(x.cpu(), offsets.cpu(), ks.cpu(), 0.01, None, dense.cpu(), 60_000, 0,
                                           out.cpu(), bits.cpu())
    x[45_000] = float("nan")
    with pytest.raises(ValueError, match="segment 1 contains NaN"):
        torch.ops.gradsparse.segmented_topk_select_pack(x, offsets, ks, 0.01, 0, dense, 60_000, 0, out)


# ------------------------------------------------------------------ dgc_compensate_into

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 17, 100_003])
def test_dgc_compensate_into_equals_in_place_and_reference(n, dtype, nesterov, device):
    g = torch.Generator().manual_seed(n + 1)
    u, v = torch.randn(n, generator=g), torch.randn(n, generator=g)
    for step in range(3):
        grad = (torch.randn(n, generator=g) * 10.0 ** step).to(dtype)
        u0, v0 = u.clone(), v.clone()
        du, dv = u.clone().to(device), v.clone().to(device)
        u_out, v_out = torch.full_like(du, 7.0), torch.full_like(dv, 7.0)
        stats = torch.ops.gradsparse.dgc_compensate_into(du, dv, grad.to(device), 0.9, nesterov, u_out, v_out)
        assert torch.equal(du.cpu(), u0) and torch.equal(dv.cpu(), v0), "inputs changed"
        ref.dgc_compensate_(u, v, grad, 0.9, nesterov)  # the in-place reference, and the in-place kernel
        assert torch.equal(u_out.cpu(), u) and torch.equal(v_out.cpu(), v), step
        want = [float(grad.double().abs().max()), float(u.abs().max()), float(v.abs().max())]
        assert stats.dtype == torch.float64 and stats.cpu().tolist() == want, step
        iu, iv = u0.clone().to(device), v0.clone().to(device)
        in_place = torch.ops.gradsparse.dgc_compensate_into(iu, iv, grad.to(device), 0.9, nesterov, iu, iv)
        assert torch.equal(iu.cpu(), u) and torch.equal(iv.cpu(), v) and torch.equal(in_place, stats)
        ru, rv = torch.empty(n), torch.empty(n)
        assert torch.equal(ref.dgc_compensate_into(u0, v0, grad, 0.9, nesterov, ru, rv), stats.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_dgc_compensate_into_reports_nan_and_inf(device):
    n = 70_000
    u, v = torch.zeros(n, device=device), torch.zeros(n, device=device)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(0))
    for bad, want in ((float("nan"), "nan"), (float("inf"), "inf")):
        g = grad.clone()
        g[n - 3] = bad
        stats = torch.ops.gradsparse.dgc_compensate_into(u, v, g.to(device), 0.9, False, torch.empty_like(u),
                                                         torch.empty_like(v)).cpu()
        assert [str(s) for s in stats.tolist()] == [want] * 3
    big = torch.full((n,), 3e38)  # finite, but u + g overflows fp32
    stats = torch.ops.gradsparse.dgc_compensate_into(big.to(device), big.to(device), big.to(device), 1.0, False,
                                                     torch.empty_like(u), torch.empty_like(v)).cpu()
    assert stats[0].item() == float(torch.tensor(3e38)) and stats[1:].tolist() == [float("inf")] * 2


@pytest.mark.parametrize("device", DEVICES)
def test_dgc_compensate_into_refuses_overlapping_outputs(device):
    state = torch.zeros(30, device=device)
    u, v, g = state[:10], state[10:20], torch.zeros(10, device=device)
    with pytest.raises(ValueError, match="u_out"):
        torch.ops.gradsparse.dgc_compensate_into(u, v, g, 0.9, False, state[5:15], state[20:30])
    with pytest.raises(ValueError, match="overlap"):
        torch.ops.gradsparse.dgc_compensate_into(u, v, g, 0.9, False, state[20:30], state[20:30])
    with pytest.raises(ValueError, match="v_out"):
        torch.ops.gradsparse.dgc_compensate_into(u, v, g, 0.9, False, state[20:30], u)


# ------------------------------------------------------------------ residual_compensate_into

def _residual_case(n, dtype, seed):
    """A residual (fp32) and a gradient (``dtype``, drawn in float64 so an fp64 one has bits fp32
    cannot hold) whose magnitudes overlap, so sums round."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64) ** 2
    return torch.randn(n, generator=g), grad.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_absmax_equals_reference_and_ops_uses_it(n, dtype, device):
    x = _inputs(n, dtype, n + 5)
    got = torch.ops.gradsparse.absmax(x.to(device))
    want = ref.absmax(x)
    assert got.dtype == torch.float64 and got.shape == () and got.device == x.to(device).device
    assert torch.equal(got.cpu(), want) and float(want) == (float(x.double().abs().max()) if n else 0.0)
    assert ops.absmax(x.to(device)) == float(want)
    if n >= 2:
        for bad, expected in ((float("nan"), math.isnan), (float("-inf"), math.isinf)):
            y = x.clone()
            y[n // 2] = bad
            assert expected(float(torch.ops.gradsparse.absmax(y.to(device)))) and expected(float(ref.absmax(y)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_absmax_finds_the_largest_in_every_lane_and_the_tail(dtype, device):
    """The CPU loop keeps 32 partial maxima (csrc/cpu/compensate_core.h) and finishes the last n % 32 alone: the
    largest magnitude, or a NaN, at each position of a block and in the tail is found."""
    n = 3 * 32 + 7
    for at in list(range(32, 64)) + [n - 1]:
        x = torch.full((n,), 0.5, dtype=dtype)
        x[at] = -3.0
        assert float(torch.ops.gradsparse.absmax(x.to(device))) == 3.0, at
        x[at] = float("nan")
        assert math.isnan(float(torch.ops.gradsparse.absmax(x.to(device)))), at


def test_absmax_does_not_depend_on_threads_and_refuses_integers():
    x = _inputs(2_500_003, torch.float32, 3)
    before = torch.get_num_threads()
    try:
        got = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(torch.ops.gradsparse.absmax(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], ref.absmax(x))
    with pytest.raises(ValueError, match="floating-point"):
        torch.ops.gradsparse.absmax(torch.arange(5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_residual_compensate_into_equals_reference(n, dtype, device):
    r0, grad = _residual_case(n, dtype, n + 3)
    want_r = torch.empty(n)
    want_stats = ref.residual_compensate_into(r0, grad, want_r)
    if n:  # the maxima the reference returns are the plain ones
        assert want_stats.tolist() == [float(grad.double().abs().max()), float(want_r.abs().max())]
    if dtype == torch.float64 and n >= 1001:  # the case is one where the double sum's rounding matters
        assert not torch.equal(want_r, r0 + grad.float())
    r, g = r0.clone().to(device), grad.to(device)  # a copy also on the CPU: r is written in place below
    r_out = torch.full_like(r, 7.0)
    stats = torch.ops.gradsparse.residual_compensate_into(r, g, r_out)
    assert stats.dtype == torch.float64 and stats.device == r.device and stats.shape == (2,)
    assert torch.equal(r.cpu(), r0), "the residual changed"
    assert torch.equal(r_out.cpu(), want_r) and torch.equal(stats.cpu(), want_stats)
    in_place = torch.ops.gradsparse.residual_compensate_into(r, g, r)  # r_out is r itself
    assert torch.equal(r.cpu(), want_r) and torch.equal(in_place.cpu(), want_stats)
    ref_in_place = r0.clone()
    assert torch.equal(ref.residual_compensate_into(ref_in_place, grad, ref_in_place), want_stats)
    assert torch.equal(ref_in_place, want_r)


@pytest.mark.parametrize("device", DEVICES)
def test_residual_compensate_into_takes_any_gradient_layout(device):
    r0, grad = _residual_case(2 * 40_000, torch.bfloat16, 11)
    strided = grad.to(device)[::2]  # 1-D, not contiguous: the op's own argument
    r = r0[:40_000].to(device)
    out, want = torch.empty_like(r), torch.empty(40_000)
    assert torch.equal(torch.ops.gradsparse.residual_compensate_into(r, strided, out).cpu(),
                       ref.residual_compensate_into(r0[:40_000], grad[::2], want))
    assert torch.equal(out.cpu(), want)
    matrix = grad.to(device).reshape(200, 400).t()  # 2-D transposed, through ops
    out, want = torch.empty(80_000, device=device), torch.empty(80_000)
    assert torch.equal(ops.residual_compensate_into(r0.to(device), matrix, out).cpu(),
                       ref.residual_compensate_into(r0, grad.reshape(200, 400).t(), want))
    assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_compensate_into_reports_nan_and_inf(dtype, device):
    n = 70_000
    r0, grad = _residual_case(n, dtype, 1)
    for bad, want in ((float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "inf")):
        g = grad.clone()
        g[n - 3] = bad
        stats = torch.ops.gradsparse.residual_compensate_into(r0.to(device), g.to(device),
                                                              torch.empty(n, device=device)).cpu()
        assert [str(s) for s in stats.tolist()] == [want] * 2
        assert [str(s) for s in ref.residual_compensate_into(r0, g, torch.empty(n)).tolist()] == [want] * 2
    big = {torch.float32: 3e38, torch.bfloat16: 3e38, torch.float64: 1e300}.get(dtype)
    if big is not None:  # finite gradients whose sum with r overflows fp32 (fp16's cannot)
        g = torch.full((n,), big, dtype=dtype)
        stats = torch.ops.gradsparse.residual_compensate_into(torch.full((n,), 3e38, device=device), g.to(device),
                                                              torch.empty(n, device=device)).cpu()
        assert stats.tolist() == [float(g[0]), float("inf")]


@pytest.mark.parametrize("device", DEVICES)
def test_residual_compensate_into_refuses_bad_arguments(device):
    def z(n, dtype=torch.float32):
        return torch.zeros(n, dtype=dtype, device=device)

    op = torch.ops.gradsparse.residual_compensate_into
    with pytest.raises(ValueError, match="float32"):
        op(z(3, torch.float64), z(3), z(3))
    with pytest.raises(ValueError, match="float32"):
        op(z(3), z(3), z(3, torch.float16))
    with pytest.raises(ValueError, match="elements"):
        op(z(3), z(4), z(4))
    with pytest.raises(ValueError, match="elements"):
        op(z(4), z(4), z(3))
    with pytest.raises(ValueError, match="contiguous"):
        op(z(8)[::2], z(4), z(4))
    with pytest.raises(ValueError, match="floating-point"):
        op(z(3), z(3, torch.int32), z(3))
    state = z(30)
    with pytest.raises(ValueError, match="r_out must be r itself or not overlap r"):
        op(state[:10], z(10), state[5:15])
    with pytest.raises(ValueError, match="r_out must be r itself or not overlap r"):
        op(state[5:15], z(10), state[:10])
    op(state[:10], z(10), state[10:20])  # adjacent, not overlapping
    op(state[:10], z(10), state[:10])  # in place


def test_residual_compensate_into_does_not_depend_on_threads():
    """CPU only: the worker count changes which chunks run side by side, never a result or a maximum."""
    r, grad = _residual_case(2_500_003, torch.float32, 5)
    grad[1_234_567] = -40.0  # the largest |g| in a middle chunk
    threads = torch.get_num_threads()
    try:
        got = []
        for t in (1, 2):
            torch.set_num_threads(t)
            out = torch.empty_like(r)
            got.append((out, torch.ops.gradsparse.residual_compensate_into(r, grad, out)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    assert got[0][1][0].item() == 40.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("count,n_dense", [(0, 0), (1, 3), (50, 0), (257, 9)])
def test_pack_equals_reference(value_dtype, count, n_dense, device):
    numel, g = 1000, torch.Generator().manual_seed(count)
    idx = torch.randperm(numel, generator=g)[:count].sort().values
    values, dense = torch.randn(count, generator=g), torch.randn(n_dense, generator=g)
    got = torch.ops.gradsparse.pack(idx.to(device), values.to(device), dense.to(device), numel, value_dtype, 1)
    assert got.device.type == device
    assert torch.equal(got.cpu(), ref.pack(idx, values, dense, numel, value_dtype, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("source_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("count,n_dense", [(0, 0), (1, 3), (257, 9), (300_001, 2)])
def test_pack_gathered_equals_pack_of_the_gathered_values(count, n_dense, index_dtype, value_dtype, source_dtype,
                                                          device):
    """The same bytes as ``pack(indices, source[indices], ...)``: every value rounds to the wire as pack's
    copy does (fp64 and fp32 sources into fp16/bf16 wires included), whatever the index dtype."""
    numel, g = 1_000_003, torch.Generator().manual_seed(count + n_dense)
    idx = torch.randperm(numel, generator=g)[:count].sort().values
    source = (torch.randn(numel, generator=g, dtype=torch.float64) * 1e3).to(source_dtype)
    dense = torch.randn(n_dense, generator=g)
    want = ref.pack(idx, source.index_select(0, idx), dense, numel, value_dtype, 1)
    got = torch.full((want.numel(),), 0xA5, dtype=torch.uint8, device=device)  # a reused buffer: every byte written
    torch.ops.gradsparse.pack_gathered(idx.to(index_dtype).to(device), source.to(device), dense.to(device), numel,
                                       value_dtype, 1, got)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(ops.pack_gathered(idx.to(device), source.to(device), dense.to(device), numel, value_dtype, 1)
                       .cpu(), want)


def test_pack_gathered_refuses_an_index_outside_the_source():
    """CPU: an index outside the source raises IndexError (nothing outside it is read), as index_select does."""
    source = torch.arange(10.0)
    for bad in ([3, 10], [-1, 4], [2, 5, 2**40]):
        with pytest.raises(IndexError, match="out of bounds"):
            ops.pack_gathered(torch.tensor(bad), source, source[:0], 10, torch.float32)
    with pytest.raises(IndexError):
        ref.pack_gathered(torch.tensor([3, 10]), source, source[:0], 10, torch.float32, 0, torch.empty(0))


@pytest.mark.parametrize("out", [torch.empty(63, dtype=torch.uint8), torch.empty(65, dtype=torch.uint8),
                                 torch.empty(64), torch.empty(128, dtype=torch.uint8)[::2]],
                         ids=["short", "long", "float32", "strided"])
def test_pack_gathered_refuses_an_out_that_is_not_the_payload(out):
    """``out`` is exactly the payload (here 64 bytes: header, 2 indices, 2 fp32 values), contiguous uint8."""
    source = torch.arange(10.0)
    with pytest.raises(ValueError, match="out must be"):
        torch.ops.gradsparse.pack_gathered(torch.tensor([1, 2]), source, source[:0], 10, torch.float32, 0, out)
    with pytest.raises(ValueError, match="out must be"):
        ref.pack_gathered(torch.tensor([1, 2]), source, source[:0], 10, torch.float32, 0, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("targets", [1, 2, 3, 5])
@pytest.mark.parametrize("count", [0, 1, 2048, 2049, 700_001])
def test_index_zero_equals_index_fill(count, targets, dtype, device):
    """Every target zeroed at the positions and nowhere else (unsorted and repeated positions too), the
    same as ``index_fill_`` of each: fp32 lists of up to 4 take the one-loop path, the rest index_fill_."""
    numel, g = 1_000_003, torch.Generator().manual_seed(count * 7 + targets)
    positions = torch.randint(numel, (count,), generator=g)  # unsorted, with repeats
    start = [torch.randn(numel, generator=g).to(dtype) for _ in range(targets)]
    got = [t.clone().to(device) for t in start]
    torch.ops.gradsparse.index_zero_(got, positions.to(device))
    want = [t.clone() for t in start]
    ref.index_zero_(want, positions)
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    if count:
        assert all(t.cpu()[positions].eq(0).all() for t in got)


def test_index_zero_refuses_bad_arguments():
    a, b = torch.ones(10), torch.ones(10)
    with pytest.raises(IndexError, match="position 10 is out of bounds for 10"):
        torch.ops.gradsparse.index_zero_([a, b], torch.tensor([1, 10]))
    with pytest.raises(IndexError, match="out of bounds"):
        torch.ops.gradsparse.index_zero_([a, torch.ones(12)], torch.tensor([11]))  # outside the shorter target
    with pytest.raises(IndexError, match="position -1"):
        torch.ops.gradsparse.index_zero_([a], torch.tensor([-1]))
    with pytest.raises(ValueError, match="1-D int64"):
        torch.ops.gradsparse.index_zero_([a], torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous floating-point"):
        torch.ops.gradsparse.index_zero_([torch.ones(10, 2)[:, 0]], torch.tensor([1]))
    with pytest.raises(ValueError, match="contiguous floating-point"):
        torch.ops.gradsparse.index_zero_([torch.ones(10, dtype=torch.int64)], torch.tensor([1]))
    assert torch.equal(b, torch.ones(10))  # no block of these calls reached a write


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("world,alpha,overwrite", [(1, 1.0, False), (3, 1 / 3, True), (4, 0.25, True)])
# spread over several output chunks: unsorted (sorted per call), ascending as the reducer's (used as they are), and
# ascending with a position twice (its values added in their order)
@pytest.mark.parametrize("dense", [(39_999, 17, 20_000), (17, 20_000, 39_999), (17, 20_000, 20_000, 39_999)])
def test_unpack_add_equals_reference(out_dtype, value_dtype, world, alpha, overwrite, device, dense):
    numel, g = 40_000, torch.Generator().manual_seed(world)
    dense_index = torch.tensor(dense)
    payloads = []
    for r in range(world):
        # sparse indices may coincide with dense positions: the order of additions must still match
        idx = torch.cat([torch.tensor([17, 20_000]), torch.randperm(numel, generator=g)[: 400 * (r + 1)]]).unique()
        payloads.append(ref.pack(idx, torch.randn(idx.numel(), generator=g), torch.randn(len(dense), generator=g),
                                 numel, value_dtype, flags=r % 2))
    start = torch.randn(numel, generator=g).to(out_dtype)
    a, b = start.clone().to(device), start.clone()
    fa = torch.ops.gradsparse.unpack_add([p.to(device) for p in payloads], a, value_dtype, dense_index.to(device),
                                         alpha, overwrite)
    fb = ref.unpack_add(payloads, b, value_dtype, dense_index, alpha, overwrite)
    assert int(fa) == fb and torch.equal(a.cpu(), b)


@pytest.mark.parametrize("at", [1, 4096, 4097, 8192, 9_998])
def test_unpack_add_names_the_first_unordered_index_in_a_long_payload(at):
    """The CPU check runs block by block (4,096 indices) without a branch per index: an index not above the one
    before it is still found, and named, wherever it is, block edges included; nothing is written."""
    idx = torch.arange(0, 20_000, 2, dtype=torch.int32)
    payload = ref.pack(idx.long(), torch.ones(idx.numel()), torch.empty(0), 20_000, torch.float32)
    body = payload[HEADER_BYTES:].view(torch.int32)  # the header, then the indices (gradsparse.payload)
    assert torch.equal(body[:idx.numel()], idx)
    body[at] = body[at - 1]
    out = torch.full((20_000,), 7.0)
    with pytest.raises(ValueError, match=f"not strictly ascending .* at position {at}$"):
        torch.ops.gradsparse.unpack_add([payload], out, torch.float32, None, 1.0, True)
    assert torch.equal(out, torch.full((20_000,), 7.0))


@pytest.mark.parametrize("device", DEVICES)
def test_unpack_add_errors_leave_destination_unchanged(device):
    good = ref.pack(torch.tensor([1, 5]), torch.tensor([1.0, 2.0]), torch.empty(0), 10, torch.float32)
    bad = good.clone()
    bad[36:40].view(torch.int32).fill_(11)  # last index out of range
    out = torch.arange(10.0, device=device)
    with pytest.raises(PayloadError, match="out of range"):
        ops.unpack_add([good.to(device), bad.to(device)], out, torch.float32, overwrite=True)
    assert torch.equal(out.cpu(), torch.arange(10.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 17, 100_003])
def test_dgc_compensate_equals_reference(n, dtype, nesterov, device):
    g = torch.Generator().manual_seed(n)
    u, v = torch.randn(n, generator=g), torch.randn(n, generator=g)
    a_u, a_v, b_u, b_v = u.clone().to(device), v.clone().to(device), u.clone(), v.clone()
    for step in range(3):
        grad = torch.randn(n, generator=g).to(dtype)
        torch.ops.gradsparse.dgc_compensate(a_u, a_v, grad.to(device), 0.9, nesterov)
        ref.dgc_compensate_(b_u, b_v, grad, 0.9, nesterov)
        assert torch.equal(a_u.cpu(), b_u) and torch.equal(a_v.cpu(), b_v), step


@pytest.mark.parametrize("device", DEVICES)
def test_dgc_compensate_refuses_mismatched_state(device):
    def z(n, dtype=torch.float32):
        return torch.zeros(n, dtype=dtype, device=device)

    with pytest.raises(ValueError, match="elements"):
        torch.ops.gradsparse.dgc_compensate(z(3), z(3), z(4), 0.9, False)
    with pytest.raises(ValueError, match="float32"):
        torch.ops.gradsparse.dgc_compensate(z(3, torch.float64), z(3), z(3), 0.9, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.001, 0.25, 1.0])
@pytest.mark.parametrize("n", [17, 16_384, 100_003])
def test_dgc_zero_compensate_equals_index_fill_then_compensate(n, density, dtype, nesterov, device):
    """Zeroed positions (sorted, with repeats, at chunk edges when dense) read as zero, every other element is
    compensated as dgc_compensate_into compensates it, and the maxima are those of the result: against
    index_fill_ then the reference, bit for bit, with positions given in another coordinate (offset)."""
    g = torch.Generator().manual_seed(n + int(density * 1000))
    u, v = torch.randn(n, generator=g), torch.randn(n, generator=g) * 3
    u[n // 2] = float("inf")  # zeroed below when dense: a zeroed inf reads as zero, not NaN
    grad = torch.randn(n, generator=g).to(dtype)
    count = int(n * density)
    positions = torch.randint(n, (count,), generator=g).sort().values if density < 1 else torch.arange(n)
    if density == 0.25:
        positions = torch.cat([positions, torch.tensor([n // 2, n // 2, 0, n - 1])]).sort().values
    offset = 1000
    du, dv = u.clone().to(device), v.clone().to(device)
    got = torch.ops.gradsparse.dgc_zero_compensate(du, dv, grad.to(device), 0.9, nesterov,
                                                   (positions + offset).to(device), offset)
    wu, wv = u.clone(), v.clone()
    wu.index_fill_(0, positions, 0)
    wv.index_fill_(0, positions, 0)
    want = ref.dgc_compensate_into(wu, wv, grad, 0.9, nesterov, wu, wv)
    assert torch.equal(du.cpu(), wu) and torch.equal(dv.cpu(), wv)
    assert torch.equal(got.cpu(), want)
    ru, rv = u.clone(), v.clone()
    assert torch.equal(ref.dgc_zero_compensate_(ru, rv, grad, 0.9, nesterov, positions + offset, offset), want)
    assert torch.equal(ru, wu) and torch.equal(rv, wv)


@pytest.mark.parametrize("through", ["list", "bitmap"])
def test_dgc_zero_and_mask_compensate_do_not_depend_on_threads(through):
    n, g = 2_000_003, torch.Generator().manual_seed(3)
    u, v, grad = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    if through == "list":
        positions = torch.randint(n, (n // 5,), generator=g).sort().values

        def call(a, b):
            return torch.ops.gradsparse.dgc_zero_compensate(a, b, grad, 0.9, False, positions, 0)
    else:
        bits = _bitmap_of(torch.nonzero(torch.rand(n + 77, generator=g) < 0.2).reshape(-1), n + 77)

        def call(a, b):
            return torch.ops.gradsparse.dgc_mask_compensate(a, b, grad, 0.9, False, bits, 77)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            a, b = u.clone(), v.clone()
            results.append((call(a, b), a, b))
    finally:
        torch.set_num_threads(threads)
    for stats, a, b in results[1:]:
        assert torch.equal(stats, results[0][0]) and torch.equal(a, results[0][1]) and torch.equal(b, results[0][2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.001, 0.25, 1.0])
@pytest.mark.parametrize("n", [17, 16_384, 100_003])
@pytest.mark.parametrize("offset", [0, 1000, 16_427])
def test_dgc_mask_compensate_equals_zero_compensate_of_the_bitmaps_positions(offset, n, density, dtype, nesterov,
                                                                            device):
    """The bitmap read at an offset (a multiple of 64 or not, chunks starting mid-word) with bits set before
    and after the piece, which must be ignored: bit for bit what dgc_zero_compensate does with the positions."""
    g = torch.Generator().manual_seed(n + offset + int(density * 1000))
    u, v = torch.randn(n, generator=g), torch.randn(n, generator=g) * 3
    u[n // 2] = float("inf")  # zeroed when dense: a zeroed inf reads as zero, not NaN
    grad = torch.randn(n, generator=g).to(dtype)
    mask = torch.rand(offset + n + 300, generator=g) < density
    mask[:offset] = mask[offset + n:] = True  # others' positions
    if density == 0.25:
        mask[offset + n // 2] = mask[offset] = mask[offset + n - 1] = True
    positions = torch.nonzero(mask[offset:offset + n]).reshape(-1)
    bits = _bitmap_of(torch.nonzero(mask).reshape(-1), mask.numel())
    du, dv = u.clone().to(device), v.clone().to(device)
    got = torch.ops.gradsparse.dgc_mask_compensate(du, dv, grad.to(device), 0.9, nesterov, bits.to(device), offset)
    wu, wv = u.clone(), v.clone()
    want = ref.dgc_zero_compensate_(wu, wv, grad, 0.9, nesterov, positions, 0)
    assert torch.equal(du.cpu(), wu) and torch.equal(dv.cpu(), wv)
    assert torch.equal(got.cpu(), want)
    ru, rv = u.clone(), v.clone()
    assert torch.equal(ref.dgc_mask_compensate_(ru, rv, grad, 0.9, nesterov, bits, offset), want)
    assert torch.equal(ru, wu) and torch.equal(rv, wv)


def test_dgc_mask_compensate_off_the_cpu_kernel_is_the_same():
    """The device-neutral kernel (csrc/bitmap.cpp: unpacked bitmap, masked_fill_, dgc_compensate_into), which
    every device without its own runs, reached on the CPU by dispatching to it: the CPU kernel's bits."""
    op = torch.ops.gradsparse.dgc_mask_compensate.default
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    g = torch.Generator().manual_seed(5)
    n, offset = 70_001, 93
    u, v, grad = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g).half()
    bits = _bitmap_of(torch.nonzero(torch.rand(offset + n, generator=g) < 0.3).reshape(-1), offset + n)
    for nesterov in (False, True):
        a, b = u.clone(), v.clone()
        got = op.redispatch(composite, a, b, grad, 0.9, nesterov, bits, offset)
        c, d = u.clone(), v.clone()
        want = op(c, d, grad, 0.9, nesterov, bits, offset)
        assert torch.equal(got, want) and torch.equal(a, c) and torch.equal(b, d)
    with pytest.raises(ValueError, match="at least 1096 are needed for 70094"):
        op.redispatch(composite, u.clone(), v.clone(), grad, 0.9, False, bits[:-1], offset)


@pytest.mark.parametrize("device", DEVICES)
def test_dgc_mask_compensate_refuses_a_bitmap_it_cannot_read(device):
    n = 1000
    u, v, grad = (torch.ones(n, device=device) for _ in range(3))
    for bits, offset, match in ((torch.zeros(15, dtype=torch.int64), 0, "at least 16 are needed for 1000"),
                                (torch.zeros(16, dtype=torch.int64), 25, "at least 17 are needed for 1025"),
                                (torch.zeros(16, dtype=torch.int32), 0, "contiguous 1-D int64"),
                                (torch.zeros(16, dtype=torch.int64), -1, "offset must be >= 0")):
        with pytest.raises(ValueError, match=match):
            torch.ops.gradsparse.dgc_mask_compensate(u, v, grad, 0.9, False, bits.to(device), offset)
        with pytest.raises(ValueError, match=match):
            ref.dgc_mask_compensate_(u.cpu(), v.cpu(), grad.cpu(), 0.9, False, bits, offset)
    assert u.eq(1).all() and v.eq(1).all()
    if device == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="bits is on"):
            torch.ops.gradsparse.dgc_mask_compensate(u, v, grad, 0.9, False, torch.zeros(16, dtype=torch.int64,
                                                                                          device="cuda"), 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zeroed,offset,error,match", [
    ([5, 3], 0, ValueError, "non-decreasing"),
    ([1, 40_000, 20_000], 0, ValueError, "non-decreasing"),  # wrong in a later chunk
    ([1, 50_000], 0, IndexError, "outside"),
    ([-1, 2], 0, IndexError, "outside"),
    ([9, 12], 10, IndexError, "outside"),  # below the offset
    ([12, 50_010], 10, IndexError, "outside"),  # at offset + numel
], ids=["descending", "descending_later", "above", "negative", "below_offset", "at_the_end"])
def test_dgc_zero_compensate_refuses_a_wrong_list_and_writes_nothing_outside(zeroed, offset, error, match, device):
    """A wrong list raises the error that names it; whatever the kernel did before raising, nothing outside
    the state (here: the rest of a larger buffer) is written."""
    n = 50_000
    buf_u, buf_v = torch.ones(n + 200, device=device), torch.ones(n + 200, device=device)
    u, v = buf_u[100:100 + n], buf_v[100:100 + n]
    with pytest.raises(error, match=match):
        torch.ops.gradsparse.dgc_zero_compensate(u, v, torch.ones(n, device=device), 0.9, False,
                                                 torch.tensor(zeroed, device=device), offset)
    assert buf_u[:100].eq(1).all() and buf_u[100 + n:].eq(1).all()
    assert buf_v[:100].eq(1).all() and buf_v[100 + n:].eq(1).all()
    with pytest.raises(error, match=match):
        ref.dgc_zero_compensate_(torch.ones(n), torch.ones(n), torch.ones(n), 0.9, False,
                                 torch.tensor(zeroed), offset)
    with pytest.raises(ValueError, match="1-D int64"):
        torch.ops.gradsparse.dgc_zero_compensate(u, v, torch.ones(n, device=device), 0.9, False,
                                                 torch.tensor([1], dtype=torch.int32, device=device), 0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    g = torch.Generator().manual_seed(0)

    def randn(n):
        return torch.randn(n, generator=g).to(device)

    x = randn(40_000)
    torch.library.opcheck(torch.ops.gradsparse.threshold_select.default, (x, 1.0))
    torch.library.opcheck(torch.ops.gradsparse.absmax.default, (x,))
    torch.library.opcheck(torch.ops.gradsparse.topk_select.default, (x, 40, 0.01, 0))
    torch.library.opcheck(torch.ops.gradsparse.segmented_topk_select.default,
                          (x, torch.tensor([0, 100, 30_000, 40_000], device=device),
                           torch.tensor([3, 0, 400], device=device), 0.01, 0))
    idx, vals, dense = torch.tensor([1, 7, 9], device=device), randn(3), randn(2)
    torch.library.opcheck(torch.ops.gradsparse.pack.default, (idx, vals, dense, 20, torch.float16, 0))
    torch.library.opcheck(torch.ops.gradsparse.pack_gathered.default,
                          (idx, randn(20), dense, 20, torch.float16, 0,
                           torch.empty(PayloadLayout(3, 2, torch.float16).nbytes, dtype=torch.uint8, device=device)))
    torch.library.opcheck(torch.ops.gradsparse.segmented_topk_select_pack.default,
                          (x, torch.tensor([0, 100, 30_000, 40_000], device=device),
                           torch.tensor([3, 0, 400], device=device), 0.01, 0, dense, 40_000, 0,
                           torch.empty(PayloadLayout(403, 2, torch.float32).nbytes, dtype=torch.uint8,
                                       device=device)))
    torch.library.opcheck(torch.ops.gradsparse.index_zero_.default, ([randn(20), randn(20)], idx))
    payload = ref.pack(idx.cpu(), vals.cpu(), dense.cpu(), 20, torch.float32).to(device)
    torch.library.opcheck(torch.ops.gradsparse.dgc_compensate.default,
                          (randn(100), randn(100), randn(100).half(), 0.9, True))
    torch.library.opcheck(torch.ops.gradsparse.dgc_compensate_into.default,
                          (randn(100), randn(100), randn(100).half(), 0.9, True, randn(100), randn(100)))
    torch.library.opcheck(torch.ops.gradsparse.segmented_topk_select_pack.default,
                          (x, torch.tensor([0, 100, 30_000, 40_000], device=device),
                           torch.tensor([3, 0, 400], device=device), 0.01, 0, dense, 40_000, 0,
                           torch.empty(PayloadLayout(403, 2, torch.float32).nbytes, dtype=torch.uint8,
                                       device=device),
                           torch.empty(ops.bitmap_words(40_000), dtype=torch.int64, device=device)))
    torch.library.opcheck(torch.ops.gradsparse.dgc_mask_compensate.default,
                          (randn(100), randn(100), randn(100).half(), 0.9, True,
                           torch.tensor([3, -1, 7], dtype=torch.int64, device=device), 70))
    torch.library.opcheck(torch.ops.gradsparse.dgc_zero_compensate.default,
                          (randn(100), randn(100), randn(100).half(), 0.9, True,
                           torch.tensor([3, 3, 50, 99], device=device) + 7, 7))
    torch.library.opcheck(torch.ops.gradsparse.residual_compensate_into.default,
                          (randn(100), randn(100).half(), randn(100)))
    torch.library.opcheck(torch.ops.gradsparse.unpack_add.default,
                          ([payload, payload], torch.zeros(20, device=device), torch.float32,
                           torch.tensor([18, 19], device=device), 0.5, True))
