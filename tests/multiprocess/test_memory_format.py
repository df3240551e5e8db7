"""channels_last models through the DDP hook (gloo, 2 ranks).

DDP lays a parameter's gradient out in its bucket with the parameter's strides, so the memory of a
channels_last convolution is kept in memory order, not logical order. A checkpoint must carry that
layout: loaded into a model of the other memory format, the memory is re-laid out, never permuted.
"""

import io

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, TopK
from gradsparse import ddp as gddp
from gradsparse.errors import StateMismatchError

from ..distributed import run_world

CL = torch.channels_last


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)   # 432 elements: sent whole (DGC keeps its momentum)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)  # 4,608: compressed
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def _net(channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    net = CNN()
    return net.to(memory_format=CL) if channels_last else net


def _loss(model, rank, step, channels_last, scale=1.0):
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(4, 3, 6, 6, generator=g)
    x = x.contiguous(memory_format=CL) if channels_last else x
    return nn.functional.cross_entropy(model(x), torch.randint(0, 10, (4,), generator=g)) * scale


def _release(model, rank, channels_last):
    """One step with zero gradients: what the hook delivers is the memory's own top-k, per parameter."""
    model.zero_grad()
    _loss(model, rank, 99, channels_last, scale=0.0).backward()
    return {n: p.grad.detach().clone() for n, p in model.module.named_parameters()}


COMPRESSORS = {"topk": lambda: TopK(0.01), "dgc": lambda: DGC(0.01, warmup=None)}


def cross_layout_worker(rank, world, kind, steps=4):
    compressor = COMPRESSORS[kind]
    report = {}
    for src, dst in ((True, False), (False, True)):
        net = _net(src)
        model = DDP(net)
        state = gddp.register(model, compressor(), log_every=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(steps):
            opt.zero_grad()
            _loss(model, rank, step, src).backward()
            opt.step()
        buf = io.BytesIO()
        torch.save({"model": net.state_dict(), "gradsparse": state.state_dict()}, buf)
        expected = _release(model, rank, src)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        net2 = _net(dst)
        net2.load_state_dict(ckpt["model"])
        model2 = DDP(net2)
        state2 = gddp.register(model2, compressor(), log_every=0)
        state2.load_state_dict(ckpt["gradsparse"])
        got = _release(model2, rank, dst)
        report[f"{src}->{dst}"] = {n: float((expected[n] - got[n]).abs().max()) for n in expected}
        report[f"{src}->{dst} released"] = float(expected["c2.weight"].abs().max())
    return report


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_a_checkpoint_of_a_channels_last_run_loads_into_a_contiguous_model_and_back(kind):
    """The memory a checkpoint holds reaches the same coordinates whatever the memory format of either model.
    Before the layout was recorded, the flat memory was loaded as is: c2.weight's release was 9e-3 (TopK) and
    3e-2 (DGC) off, on permuted coordinates."""
    for report in run_world(cross_layout_worker, 2, kind):
        for direction in ("True->False", "False->True"):
            assert report[f"{direction} released"] > 0, report  # the check can see a permutation
            assert max(report[direction].values()) == 0.0, report


def unbound_worker(rank, world):
    net = _net(True)
    model = DDP(net)
    state = gddp.GradSparseState(TopK(0.01))  # no model=: keys param0, param1, ... and no layout known up front
    model.register_comm_hook(state, gddp.sparse_hook)
    for step in range(3):
        model.zero_grad()
        _loss(model, rank, step, True).backward()
    saved = state.state_dict()
    model2 = DDP(_net(False))
    state2 = gddp.GradSparseState(TopK(0.01))
    model2.register_comm_hook(state2, gddp.sparse_hook)
    state2.load_state_dict(saved)
    try:
        _loss(model2, rank, 0, False).backward()
    except StateMismatchError as err:
        return {"layouts": saved["layouts"], "refused": str(err)}
    return {"layouts": saved["layouts"], "refused": None}


def test_an_unbound_state_refuses_memory_of_another_layout_at_the_first_bucket():
    for report in run_world(unbound_worker, 2):
        assert len(report["layouts"]) == 2, report  # the two convolutions
        assert report["refused"] and "channels_last" in report["refused"], report


def equal_worker(rank, world, steps=4):
    out = {}
    for name in ("plain", "hooked"):
        model = DDP(_net(True))
        if name == "hooked":
            gddp.register(model, TopK(1.0), log_every=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(steps):
            opt.zero_grad()
            _loss(model, rank, step, True).backward()
            opt.step()
        out[name] = [p.detach().clone() for p in model.parameters()]
    return all(torch.equal(a, b) for a, b in zip(out["plain"], out["hooked"]))


def test_nothing_dropped_equals_plain_ddp_for_a_channels_last_model():
    assert all(run_world(equal_worker, 2))
