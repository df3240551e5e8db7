"""Selection candidates collected in the compensation pass (gradsparse.arena): they change how fast a
bucket is selected, never what is selected or what the memory keeps."""

import math

import pytest
import torch

from gradsparse import DGC, TopK
from gradsparse.arena import FLOOR_HIGH, FLOOR_LOW, Arena, Candidates
from gradsparse.comm import LocalCommunicator
from gradsparse.memory import ResidualMemory
from gradsparse.reducer import Segment, SparseReducer
from gradsparse.schedule import Warmup

# three compressed parameters with a whole tensor (under min_compress_numel) between the first two
SEGMENTS = [Segment("a", 0, 60000), Segment("bias", 60000, 100), Segment("c", 60100, 90000),
            Segment("d", 150100, 20000)]
NUMEL = 170100

METHODS = {
    "topk": lambda: TopK(0.003),
    "topk-1%": lambda: TopK(0.01),  # k up to 1/64 of a parameter collects (reducer.CANDIDATES_BELOW)
    "dgc": lambda: DGC(0.002, warmup=None),
    "dgc-nesterov": lambda: DGC(0.001, nesterov=True, warmup=None),
    "dgc-clipped": lambda: DGC(0.002, clip_norm=50.0, warmup=None),  # clipping replaces each parameter's piece
    "dgc-warmup": lambda: DGC(0.001, warmup=Warmup(ratios=(0.25, 0.003, 0.002), length=4)),  # k changes
}


def _run(compressor, steps, wire=None, with_candidates=True):
    if not with_candidates:
        compressor.selects_from_candidates = False
    r = SparseReducer(compressor, LocalCommunicator(), value_dtype=wire)
    gen = torch.Generator().manual_seed(1)
    outs = []
    for step in range(steps):
        g = torch.randn(NUMEL, generator=gen) * (1 + 0.2 * (step % 3))
        scale = 2.0 ** (step // 5)  # the loss scale changes: the memory and the floors are rescaled
        outs.append(r.reduce(g * scale, SEGMENTS, step, epoch=step // 4, loss_scale=scale).wait().clone())
    return r, outs


@pytest.mark.parametrize("wire", [None, torch.float16])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_candidates_change_nothing_but_speed(method, wire):
    steps = 14
    with_c, outs = _run(METHODS[method](), steps, wire)
    without, expected = _run(METHODS[method](), steps, wire, with_candidates=False)
    for step, (got, want) in enumerate(zip(outs, expected)):
        assert torch.equal(got, want), f"step {step}"
    for key, slot in without.memory.state.items():
        for name, want in slot.items():
            assert torch.equal(with_c.memory.state[key][name], want), (key, name)
    arena = next(a for a in with_c.memory.arenas.values() if len(a.segments) == 3)
    # the path under test was taken: many selections came from the candidates alone (the floors adapt over
    # the first steps, and again after each change of k)
    assert arena.candidate_hits > 0 and arena.candidate_hits >= arena.candidate_tries // 3, \
        (arena.candidate_hits, arena.candidate_tries)
    assert torch.isfinite(arena.floors).all()


@pytest.mark.parametrize("ratio", [0.25, 0.02])
def test_no_candidates_where_k_is_a_large_part_of_the_parameter(ratio):
    r, _ = _run(TopK(ratio), 3)
    arena = next(iter(r.memory.arenas.values()))
    assert arena.candidate_tries == 0 and math.isinf(arena.floors.max())


def test_floors_adapt_to_cut_and_short_lists():
    memory = ResidualMemory()
    arena = Arena.of(memory, [Segment("a", 0, 10), Segment("b", 10, 10), Segment("c", 20, 10)], 30,
                  torch.device("cpu"))
    kth = torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64)
    caps, ks = torch.tensor([5, 5, 0]), torch.tensor([2, 2, 2])
    arena.learn(kth, None, ks)  # the first selection: floors from the k-th magnitudes, no candidates yet
    start = arena.floors.clone()
    assert torch.all(start < kth)
    # a: cut at its cap (floor too low) -> nearer kth; b: fewer than k (floor too high) -> lower; c: no cap
    arena.learn(kth, Candidates(torch.zeros(6, dtype=torch.int64), torch.tensor([9, 1, 0]), caps, torch.zeros(6)),
                ks)
    assert start[0] < arena.floors[0] <= kth[0] * FLOOR_HIGH
    assert kth[1] * FLOOR_LOW <= arena.floors[1] < start[1]
    assert math.isinf(arena.floors[2])
    before = arena.floors.clone()
    memory.rescale(0.5)
    assert torch.equal(arena.floors, before * 0.5)


def test_a_piece_must_cover_whole_segments():
    arena = Arena(ResidualMemory(), [Segment("a", 0, 10), Segment("b", 10, 10)], 20, torch.device("cpu"))
    with pytest.raises(ValueError, match="whole segments"):
        arena.compensate_collecting([(0, torch.ones(15))], torch.tensor([4, 4]))


@pytest.mark.parametrize("memory_of", ["residual", "dgc"])
def test_one_call_for_the_bucket_equals_one_call_per_piece(memory_of):
    """Arena.compensate_collecting with the bucket (one kernel call, the whole tensors between the parameters
    skipped) gives the per-piece calls' state, bounds and candidates bit for bit, and leaves the whole tensors'
    slots zero; a NaN in a whole tensor is not read."""
    from gradsparse.memory import DGCMemory

    def memory():
        return ResidualMemory() if memory_of == "residual" else DGCMemory(0.9)

    compressed = [s for s in SEGMENTS if s.key != "bias"]
    gen = torch.Generator().manual_seed(3)
    arenas = [Arena.of(memory(), compressed, NUMEL, torch.device("cpu")) for _ in range(2)]
    for arena in arenas:
        arena.floors = torch.tensor([2.0, 3.0, math.inf], dtype=torch.float64)
    caps = torch.tensor([500, 5000, 0], dtype=torch.int64)
    for step in range(3):
        bucket = torch.randn(NUMEL, generator=gen)
        bucket[60050] = float("nan")  # in the bias, sent whole
        pieces = [(0, bucket[:60000]), (60100, bucket[60100:170100])]  # "c" and "d" adjacent: one piece
        by_piece = arenas[0].compensate_collecting(pieces, caps)
        by_bucket = arenas[1].compensate_collecting(pieces, caps, bucket)
        for a, b in zip(arenas[0].state, arenas[1].state):
            assert torch.equal(a, b), step
            assert not a[60000:60100].any(), "a whole tensor's slots were written"
        assert arenas[0].bounds == arenas[1].bounds and all(math.isfinite(b) for b in arenas[1].bounds)
        for name in ("positions", "counts", "values"):
            assert torch.equal(getattr(by_piece, name), getattr(by_bucket, name)), (step, name)
        assert int(by_bucket.counts[0]) > int(caps[0]) and int(by_bucket.counts[2]) == 0  # a list cut, one empty
        assert step > 0 or 0 < int(by_bucket.counts[1]) <= int(caps[1])  # and a complete one
