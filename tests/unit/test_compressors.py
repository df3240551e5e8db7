"""Compressor configuration, counts, warm-up schedule and memories (one process)."""

import math

import pytest
import torch

from gradsparse import DGC, Threshold, TopK, Warmup
from gradsparse.arena import Arena
from gradsparse.errors import InvalidConfigError, StateMismatchError
from gradsparse.memory import DGCMemory, Memory, ResidualMemory
from gradsparse.reducer import Segment

from ..oracles import topk_oracle


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.0001, 2, float("nan"), True, "0.1", None])
def test_bad_ratio_is_refused(ratio):
    with pytest.raises(InvalidConfigError, match="ratio"):
        TopK(ratio)
    with pytest.raises(InvalidConfigError, match="ratio"):
        DGC(ratio)


@pytest.mark.parametrize("tau", [-1e-9, -1, float("nan"), float("inf"), True])
def test_bad_threshold_is_refused(tau):
    with pytest.raises(InvalidConfigError, match="threshold"):
        Threshold(tau)


@pytest.mark.parametrize("kwargs", [{"momentum": 1.0}, {"momentum": -0.1}, {"clip_norm": 0.0},
                                    {"clip_norm": float("nan")}, {"sample_ratio": 0}, {"warmup": [0.25]}])
def test_bad_dgc_options_are_refused(kwargs):
    with pytest.raises(InvalidConfigError):
        DGC(0.001, **kwargs)


@pytest.mark.parametrize("kwargs", [{"unit": "iteration"}, {"length": 0}, {"ratios": (0.5, 0.0)}, {"ratios": (1.5,)}])
def test_bad_warmup_is_refused(kwargs):
    with pytest.raises(InvalidConfigError):
        Warmup(**kwargs)


@pytest.mark.parametrize("ratio,n", [(0.001, 10), (0.001, 1000), (0.001, 1001), (0.01, 25_000_000), (1.0, 7), (0.3, 10)])
def test_topk_count_is_max_one_ceil(ratio, n):
    assert TopK(ratio).count(n, 0, 0) == max(1, math.ceil(ratio * n))


def test_dgc_default_warmup_is_the_papers_exponential_schedule_in_optimizer_steps():
    """The default needs no epoch: 250 optimizer steps per stage, the target from step 1,000 on."""
    dgc = DGC(0.001)
    sparsity = [1 - dgc.ratio(step=s, epoch=0) for s in (0, 249, 250, 500, 750, 999, 1000, 10**6)]
    assert sparsity == pytest.approx([0.75, 0.75, 0.9375, 0.984375, 0.996, 0.996, 0.999, 0.999])
    by_epoch = DGC(0.001, warmup=Warmup(unit="epoch", length=1))
    assert [1 - by_epoch.ratio(step=0, epoch=e) for e in range(6)] == pytest.approx(
        [0.75, 0.9375, 0.984375, 0.996, 0.999, 0.999])
    assert DGC(0.001, warmup=None).ratio(0, 0) == 0.001
    by_step = DGC(0.01, warmup=Warmup(ratios=(0.5, 0.1), length=3, unit="step"))
    assert [by_step.ratio(s, 0) for s in range(8)] == [0.5] * 3 + [0.1] * 3 + [0.01] * 2


def test_warmup_never_goes_below_target():
    assert DGC(0.1).ratio(500, 0) == 0.1  # stage density 0.015625 < target 0.1


def test_dgc_select_is_exact_topk():
    """Against the full-sort oracle, not against TopK (both end in the same kernel)."""
    v = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    chosen = DGC(0.001, warmup=None).select(v, 0, 0)
    assert torch.equal(chosen, topk_oracle(v, 100))


def test_dgc_local_clipping_threshold_is_the_share_of_the_combined_gradient():
    g = torch.full((100,), 1.0)  # norm 10
    summed = DGC(0.01, clip_norm=4.0).preprocess(g, world_size=4, average=False)
    assert float(summed.norm()) == pytest.approx(2.0, rel=1e-5)  # clip_norm / sqrt(4)
    averaged = DGC(0.01, clip_norm=4.0).preprocess(g, world_size=4)
    assert float(averaged.norm()) == pytest.approx(8.0, rel=1e-5)  # (g / 4) clipped at 4 / sqrt(4)
    small = torch.full((100,), 0.01)
    assert DGC(0.01, clip_norm=4.0).preprocess(small, world_size=4) is small
    assert DGC(0.01, clip_norm=4.0).clip_limit(1) == DGC(0.01, clip_norm=4.0).clip_limit(1, average=False) == 4.0


def _one_loud_rank(rank, world, op):
    from gradsparse.comm.torch_dist import TorchDistCommunicator
    from gradsparse.reducer import Segment, SparseReducer

    reducer = SparseReducer(DGC(1.0, momentum=0.0, clip_norm=2.0, warmup=None), TorchDistCommunicator(), op=op,
                            min_compress_numel=1)
    grad = torch.full((1000,), 1.0 if rank == 0 else 0.0)  # rank 0: norm 31.6, the others nothing
    out = reducer.reduce(grad, [Segment("w", 0, 1000)], step=0).wait()
    return float(out.norm())


@pytest.mark.multiprocess
@pytest.mark.parametrize("op", ["average", "sum"])
def test_dgc_local_clipping_bounds_a_ranks_share_of_the_combined_gradient(op):
    """A rank's contribution to the averaged or summed gradient is clipped at clip_norm / sqrt(world) either way."""
    from ..distributed import run_world

    norms = run_world(_one_loud_rank, 2, op)
    assert norms[0] == norms[1] == pytest.approx(2.0 / 2 ** 0.5, rel=1e-4)


def _arena(memory, numel=1000, key="w"):
    return Arena.of(memory, (Segment(key, 0, numel),), numel, torch.device("cpu"))


@pytest.mark.parametrize("wire", [torch.float32, torch.float16, torch.bfloat16])
def test_residual_conservation_is_exact(wire):
    m = ResidualMemory()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        before = m.state.get("w", {}).get("residual", torch.zeros(1000)).clone()
        g = torch.randn(1000, generator=gen)
        arena = _arena(m)
        arena.compensate([(0, g)])
        v = arena.selectable.clone()
        assert torch.equal(v, before + g)
        idx = topk_oracle(v, 50)
        sent = v[idx].to(wire).float()
        arena.commit(idx, sent, masked=idx)
        scattered = torch.zeros(1000).index_put_((idx,), sent)
        assert torch.equal(m.state["w"]["residual"] + scattered, v)


@pytest.mark.parametrize("nesterov", [False, True])
def test_dgc_memory_follows_the_paper(nesterov):
    m, mom = DGCMemory(0.9, nesterov), 0.9
    u, v = torch.zeros(50), torch.zeros(50)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        g = torch.randn(50, generator=gen)
        if nesterov:
            u = (u + g) * mom
            v = v + u + g
        else:
            u = mom * u + g
            v = v + u
        arena = _arena(m, 50)
        arena.compensate([(0, g)])
        torch.testing.assert_close(arena.selectable, v, rtol=0, atol=0)
        idx = torch.topk(v.abs(), 5).indices.sort().values
        arena.commit(idx, v[idx].clone(), masked=idx)
        u[idx] = 0
        v[idx] = 0
        assert torch.equal(m.state["w"]["momentum"], u) and torch.equal(m.state["w"]["velocity"], v)


def test_memory_without_error_feedback_keeps_nothing():
    g = torch.randn(10, generator=torch.Generator().manual_seed(0))
    m = TopK(0.1, error_feedback=False).make_memory()
    assert type(m) is Memory
    assert m.compensate_into((), g, ()).tolist() == [float(g.abs().max())]
    assert m.state == {}


def test_arena_carries_the_state_to_a_new_bucket_layout_and_takes_in_replaced_tensors():
    """DDP's bucket rebuild puts parameters at other offsets; a checkpoint load or the hierarchical path
    replaces a parameter's tensor: the next arena holds exactly the per-key state."""
    m = DGCMemory(0.9)
    gen = torch.Generator().manual_seed(2)
    first = (Segment("a", 0, 30), Segment("b", 40, 20))
    arena = Arena.of(m, first, 60, torch.device("cpu"))
    arena.compensate([(0, torch.randn(30, generator=gen)), (40, torch.randn(20, generator=gen))])
    arena.commit(torch.tensor([3, 45]), arena.selectable[[3, 45]].clone(), masked=torch.tensor([3, 45]))
    before = {k: {n: t.clone() for n, t in slot.items()} for k, slot in m.state.items()}
    assert Arena.of(m, first, 60, torch.device("cpu")) is arena  # unchanged: the same arena
    moved = (Segment("b", 0, 20), Segment("a", 25, 30))
    rebuilt = Arena.of(m, moved, 55, torch.device("cpu"))
    assert rebuilt is not arena and list(m.arenas.values()) == [rebuilt]  # the old layout's is dropped
    for k, slot in before.items():
        for n, t in slot.items():
            assert torch.equal(m.state[k][n], t)
    assert torch.equal(rebuilt.state[1][20:25], torch.zeros(5))  # the gap stays zero
    assert rebuilt.bounds == [float(rebuilt.state[0].abs().max()), float(rebuilt.state[1].abs().max())]
    m.state["a"]["velocity"] = torch.full((30,), 7.0)  # e.g. gradsparse.hierarchical moving memory
    again = Arena.of(m, moved, 55, torch.device("cpu"))
    assert again is not rebuilt and torch.equal(again.state[1][25:], torch.full((30,), 7.0))
    assert again.bounds[1] == 7.0
    assert torch.equal(m.state["b"]["velocity"], before["b"]["velocity"])
    with pytest.raises(StateMismatchError, match="has 30 elements"):
        Arena.of(m, (Segment("a", 0, 31),), 31, torch.device("cpu"))
