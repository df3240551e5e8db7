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
    arena.learn(kth, Candidates(torch.zeros(6, dtype=torch.int64), torch.tensor([9, 1, 0]), caps), ks)
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
