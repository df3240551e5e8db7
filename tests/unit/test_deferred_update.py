"""DGC's memory update deferred into the next compensation pass (gradsparse.arena: Arena.pending, read
through the selection's bitmap, Arena.pending_bits and ops.dgc_mask_compensate_, or through the list of
positions, ops.dgc_zero_compensate_): it changes how fast a step runs, never what is sent, what the memory
keeps, or what anyone reading the memory sees."""

import pytest
import torch

from gradsparse import DGC, TopK
from gradsparse import memory as memory_module
from gradsparse.comm import LocalCommunicator
from gradsparse.reducer import Segment, SparseReducer
from gradsparse.schedule import Warmup

# three compressed parameters with a whole tensor (under min_compress_numel) between the first two; the
# first spans several of the kernel's 16K-element chunks
SEGMENTS = [Segment("a", 0, 60000), Segment("bias", 60000, 100), Segment("c", 60100, 90000),
            Segment("d", 150100, 20000)]
NUMEL = 170100

METHODS = {
    "dgc25": lambda: DGC(0.25, warmup=None),
    "dgc6.25-nesterov": lambda: DGC(0.0625, nesterov=True, warmup=None),
    "dgc-clipped": lambda: DGC(0.1, clip_norm=50.0, warmup=None),  # clipping replaces each parameter's piece
    # k falls from deferred (25 %, 6.25 %) to the candidates' range (0.2 %), where the update is settled first
    "dgc-warmup": lambda: DGC(0.002, warmup=Warmup(ratios=(0.25, 0.0625, 0.002), length=6)),
    "topk": lambda: TopK(0.25),  # a residual: never deferred
}


def _run(compressor, steps, wire=None, read_between=False, checkpoint_at=None):
    r = SparseReducer(compressor, LocalCommunicator(), value_dtype=wire)
    gen = torch.Generator().manual_seed(1)
    outs, pending, bits = [], 0, 0
    for step in range(steps):
        g = torch.randn(NUMEL, generator=gen) * (1 + 0.2 * (step % 3))
        scale = 2.0 ** (step // 5)  # the loss scale changes: the memory is rescaled
        outs.append(r.reduce(g * scale, SEGMENTS, step, epoch=step // 4, loss_scale=scale).wait().clone())
        pending += sum(a.pending is not None for a in r.memory.arenas.values())
        bits += sum(a.pending_bits is not None for a in r.memory.arenas.values())
        if read_between:
            _ = r.memory.state
        if step == checkpoint_at:  # resume in a new reducer from what the memory shows
            saved = r.state_dict()
            r = SparseReducer(compressor, LocalCommunicator(), value_dtype=wire)
            r.load_state_dict(saved)
    return r, outs, (pending, bits)


@pytest.mark.parametrize("wire", [None, torch.float16])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_deferring_the_update_changes_nothing_but_speed(method, wire, monkeypatch):
    steps = 14
    deferred, outs, (pending, bits) = _run(METHODS[method](), steps, wire)
    read, outs_read, _ = _run(METHODS[method](), steps, wire, read_between=True)
    resumed, outs_resumed, _ = _run(METHODS[method](), steps, wire, checkpoint_at=7)
    with monkeypatch.context() as m:  # no bitmap asked for: the deferred update read through its list
        m.setattr(memory_module.DGCMemory, "defers_at", lambda self, count, numel: False)
        listed, outs_listed, (pending_listed, no_bits) = _run(METHODS[method](), steps, wire)
    monkeypatch.setattr(memory_module, "ZERO_IN_PASS_FROM", 0)  # never deferred
    eager, expected, (none, _) = _run(METHODS[method](), steps, wire)
    assert none == 0 and no_bits == 0
    # the paths under test were taken where they apply: DGC with the values sent exactly (fp32 on the wire)
    deferring = wire is None and method.startswith("dgc")
    assert (pending > 0) == deferring and bits == pending and pending_listed == pending, (pending, bits)
    for step, want in enumerate(expected):
        assert torch.equal(outs[step], want), f"step {step}"
        assert torch.equal(outs_listed[step], want), f"step {step}, through the list of positions"
        assert torch.equal(outs_read[step], want), f"step {step}, the memory read between steps"
        assert torch.equal(outs_resumed[step], want), f"step {step}, resumed from a checkpoint at step 7"
    for reducer in (deferred, listed, read, resumed):
        shown = reducer.memory.state  # settles what is pending
        assert all(a.pending is None for a in reducer.memory.arenas.values())
        for key, slot in eager.memory.state.items():
            for name, want in slot.items():
                assert torch.equal(shown[key][name], want), (key, name)


def test_the_zeroed_positions_read_as_zero_before_the_next_step():
    """What the memory shows right after a deferred step: momentum and velocity zero where sent."""
    r = SparseReducer(DGC(0.25, warmup=None), LocalCommunicator())
    g = torch.randn(NUMEL, generator=torch.Generator().manual_seed(2))
    r.reduce(g.clone(), SEGMENTS, 0).wait()
    arena = next(a for a in r.memory.arenas.values() if len(a.segments) == 3)
    sent = arena.pending
    assert sent is not None and sent.numel() > NUMEL // 5
    for name in ("momentum", "velocity"):
        whole = torch.cat([r.memory.state[k][name] for k in ("a", "c", "d")])  # settles
        starts = {0: 0, 60100: 60000, 150100: 150000}
        local = torch.tensor([p - max(s for s in starts if s <= p) + starts[max(s for s in starts if s <= p)]
                              for p in sent.tolist()])
        assert whole[local].eq(0).all() and whole.ne(0).sum() == whole.numel() - sent.numel(), name
    assert arena.pending is None
