"""DGC and the optimizer: DGCSGD's algebra, the compressor's optimizer rules, and the step guard."""

import io
import logging

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import OneCycleLR

from gradsparse import DGC, DGCSGD, Threshold, TopK
from gradsparse import ddp as gddp
from gradsparse.errors import IncompatibleOptimizerError, InvalidConfigError
from gradsparse.optim import guard

from ..distributed import run_world
from ..logs import LogLines
from ..models import loss_of, make_model

M = 0.9

# ----------------------------------------------------------------------------------------------
# DGCSGD fed with DGC's momentum-corrected gradients (nothing dropped) is dense momentum SGD.


def _model():
    torch.manual_seed(0)
    return nn.Linear(6, 3).double()


def _loss(model, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64)
    return nn.functional.mse_loss(model(x), y)


def _momentum_corrected(u, g, nesterov):
    """DGC's momentum correction with nothing dropped: the new u and what is sent."""
    if nesterov:
        u = M * (u + g)
        return u, u + g
    u = M * u + g
    return u, u.clone()


def trajectory(kind, *, nesterov, wd, steps=150):
    """Parameters after each step: ``dense`` torch SGD on raw grads, ``dgc`` DGCSGD on corrected grads."""
    model = _model()
    groups = [{"params": [model.weight], "weight_decay": wd}, {"params": [model.bias], "weight_decay": 0.0}]
    if kind == "dense":
        opt = torch.optim.SGD(groups, lr=0.05, momentum=M, nesterov=nesterov)
    else:
        opt = DGCSGD(groups, lr=0.05, momentum=M, nesterov=nesterov)
    sched = OneCycleLR(opt, max_lr=0.2, total_steps=steps, cycle_momentum=False)
    u = {p: torch.zeros_like(p) for p in model.parameters()}
    out = []
    for step in range(steps):
        opt.zero_grad()
        _loss(model, step).backward()
        if kind == "dgc":
            for p in model.parameters():
                u[p], p.grad = _momentum_corrected(u[p], p.grad, nesterov)
        opt.step()
        sched.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_dgcsgd_on_corrected_grads_equals_dense_momentum_sgd(nesterov, wd):
    dense, dgc = trajectory("dense", nesterov=nesterov, wd=wd), trajectory("dgc", nesterov=nesterov, wd=wd)
    for got, want in zip(dgc, dense, strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(dense[-1][0], _model().weight.detach())  # it trained


def _decay_only(opt_cls, **kwargs) -> float:
    """A parameter whose gradient is always zero: only weight decay moves it."""
    w = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = opt_cls([w], lr=0.1, weight_decay=5e-4, **kwargs)
    for _ in range(200):
        w.grad = torch.zeros_like(w)
        opt.step()
    return w.item()


def test_weight_decay_gets_momentum_unlike_plain_sgd():
    dense = _decay_only(torch.optim.SGD, momentum=M)
    assert _decay_only(DGCSGD, momentum=M) == pytest.approx(dense, abs=1e-12)
    plain = _decay_only(torch.optim.SGD)  # what docs used to recommend beside DGC
    assert dense == pytest.approx(0.9085, abs=1e-3) and plain == pytest.approx(0.990, abs=1e-3)


def test_dgcsgd_without_weight_decay_is_plain_sgd_and_keeps_no_state():
    w = nn.Parameter(torch.ones(3))
    opt = DGCSGD([w], lr=0.5, momentum=M)
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([0.5, 0.0, -0.5])) and len(opt.state) == 0


def test_dgcsgd_sparse_gradient_equals_dense_gradient():
    results = []
    for sparse in (True, False):
        torch.manual_seed(0)
        emb = nn.Embedding(20, 4, sparse=sparse)
        opt = DGCSGD(emb.parameters(), lr=0.1, momentum=M, weight_decay=0.01, nesterov=True)
        for step in range(3):
            opt.zero_grad()
            emb(torch.tensor([step, 7])).sum().backward()
            opt.step()
        results.append(emb.weight.detach())
    torch.testing.assert_close(results[0], results[1])


def test_dgcsgd_state_dict_resumes_exactly():
    def build():
        model = _model()
        return model, DGCSGD(model.parameters(), lr=0.05, momentum=M, weight_decay=0.05)

    def train(model, opt, steps):
        for step in steps:
            opt.zero_grad()
            _loss(model, step).backward()
            opt.step()

    model, opt = build()
    train(model, opt, range(5))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, range(5, 10))
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert set(ckpt["opt"]["state"][0]) == {"weight_decay_buffer"}
    model2, opt2 = build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, range(5, 10))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("kwargs", [dict(lr=-0.1), dict(lr=float("nan")), dict(momentum=1.0), dict(momentum=-0.1),
                                    dict(weight_decay=-1e-4), dict(nesterov="yes"), dict(momentum=0.0, nesterov=True),
                                    dict(momentum=True)])
def test_dgcsgd_refuses_bad_arguments(kwargs):
    w = nn.Parameter(torch.zeros(1))
    with pytest.raises(InvalidConfigError):
        DGCSGD([w], **{"lr": 0.1, **kwargs})


def test_dgcsgd_validates_added_groups_and_needs_lr():
    opt = DGCSGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(InvalidConfigError, match="momentum"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "momentum": 1.5})
    assert len(opt.param_groups) == 1
    with pytest.raises(InvalidConfigError, match="needs lr"):
        DGCSGD([nn.Parameter(torch.zeros(1))])
    assert DGCSGD(opt.param_groups).param_groups[0]["lr"] == 0.1  # how Horovod rebuilds an optimizer


# ----------------------------------------------------------------------------------------------
# Compressor.check_optimizer: what DGC's momentum correction accepts and refuses.


def _params():
    return [nn.Parameter(torch.zeros(2))]


ACCEPTED = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_dampening_without_momentum": lambda p: torch.optim.SGD(p, lr=0.1, dampening=0.5),
    "dgcsgd": lambda p: DGCSGD(p, lr=0.1, momentum=M, weight_decay=1e-4),
    "dgcsgd_no_decay": lambda p: DGCSGD(p, lr=0.1, momentum=M),
}

REFUSED = {  # optimizer, words its message must hold
    "sgd_momentum": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), ["momentum=0.9", "second time",
                                                                         "gradsparse.DGCSGD(params, lr, momentum=0.9"]),
    "sgd_momentum_decay": (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4),
                           ["weight_decay=0.0001", "DGCSGD"]),
    "sgd_weight_decay": (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=5e-4),
                         ["no momentum", "10x weaker", "gradsparse.DGCSGD(params, lr, momentum=0.9, weight_decay=0.0005)"]),
    "adam": (lambda p: torch.optim.Adam(p), ["Adam", "moment estimates", "DGC(momentum=0)", "TopK"]),
    "adamw": (lambda p: torch.optim.AdamW(p), ["AdamW", "DGC(momentum=0)"]),
    "nadam": (lambda p: torch.optim.NAdam(p), ["NAdam"]),
    "radam": (lambda p: torch.optim.RAdam(p), ["RAdam"]),
    "adamax": (lambda p: torch.optim.Adamax(p), ["Adamax"]),
    "rmsprop_momentum": (lambda p: torch.optim.RMSprop(p, momentum=0.9), ["RMSprop", "momentum=0.9"]),
    "dgcsgd_momentum_mismatch": (lambda p: DGCSGD(p, lr=0.1, momentum=0.8), ["momentum=0.8", "momentum=0.9"]),
    "dgcsgd_nesterov_mismatch": (lambda p: DGCSGD(p, lr=0.1, momentum=0.9, nesterov=True),
                                 ["nesterov=True", "nesterov=False"]),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_dgc_accepts(name):
    opt = ACCEPTED[name](_params())
    DGC(0.01, momentum=M).check_optimizer(opt)
    gddp.check_optimizer(opt, DGC(0.01, momentum=M))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_dgc_refuses_with_the_fix_in_the_message(name):
    factory, words = REFUSED[name]
    for check in (lambda o: DGC(0.01, momentum=M).check_optimizer(o), lambda o: gddp.check_optimizer(o, DGC(0.01))):
        with pytest.raises(IncompatibleOptimizerError) as err:
            check(factory(_params()))
        for word in words:
            assert word in str(err.value), (word, str(err.value))


def test_dgcsgd_with_nesterov_dgc_is_accepted():
    DGC(0.01, momentum=M, nesterov=True).check_optimizer(DGCSGD(_params(), lr=0.1, momentum=M, nesterov=True))


def test_second_param_group_is_checked_and_named():
    opt = torch.optim.SGD(_params(), lr=0.1)
    opt.add_param_group({"params": _params(), "momentum": 0.9})
    with pytest.raises(IncompatibleOptimizerError, match="param group 1"):
        DGC(0.01).check_optimizer(opt)


@pytest.mark.parametrize("compressor", [TopK(0.01), Threshold(0.1), DGC(0.01, momentum=0.0)],
                         ids=["topk", "threshold", "dgc_no_momentum"])
def test_without_momentum_correction_anything_goes(compressor):
    for factory, _ in REFUSED.values():
        compressor.check_optimizer(factory(_params()))


# ----------------------------------------------------------------------------------------------
# guard(): the rule holds before every step, whatever changed the optimizer since.


def _step(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    try:
        opt.step()
    except IncompatibleOptimizerError as err:
        assert all(torch.equal(p, b) for p, b in zip(params, before)), "the step was applied"
        return str(err)
    return None


def test_guard_catches_one_cycle_lr_with_cycle_momentum_on_the_next_step():
    params = _params()
    opt = torch.optim.SGD(params, lr=0.1)
    guard(opt, DGC(0.01))
    assert _step(opt, params) is None
    OneCycleLR(opt, max_lr=0.1, total_steps=10)  # cycle_momentum=True is the default
    message = _step(opt, params)
    assert "param group 0 now has momentum=0.95 (was 0 at registration)" in message, message
    assert "pass cycle_momentum=False" in message and "second time" in message


def test_guard_accepts_one_cycle_lr_without_cycle_momentum():
    params = _params()
    opt = DGCSGD(params, lr=0.1, momentum=M, weight_decay=1e-4)
    guard(opt, DGC(0.01))
    sched = OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False)
    for _ in range(10):
        assert _step(opt, params) is None
        sched.step()


def test_guard_catches_cycled_dgcsgd_momentum():
    params = _params()
    opt = DGCSGD(params, lr=0.1, momentum=M)
    guard(opt, DGC(0.01))
    OneCycleLR(opt, max_lr=0.1, total_steps=10)
    message = _step(opt, params)
    assert "DGCSGD has momentum=0.95" in message and "cycle_momentum=False" in message, message


def test_guard_catches_a_group_added_with_momentum():
    params = _params()
    opt = torch.optim.SGD(params, lr=0.1)
    guard(opt, DGC(0.01))
    extra = _params()
    opt.add_param_group({"params": extra, "momentum": 0.9})
    message = _step(opt, params + extra)
    assert "param group 1 was added after registration (add_param_group) with momentum=0.9" in message, message


def test_guard_refuses_at_once_and_is_idempotent():
    with pytest.raises(IncompatibleOptimizerError):
        guard(torch.optim.Adam(_params()), DGC(0.01))
    opt, compressor = torch.optim.SGD(_params(), lr=0.1), DGC(0.01)
    handle = guard(opt, compressor)
    assert guard(opt, compressor) is handle and len(opt._optimizer_step_pre_hooks) == 1
    handle.remove()
    assert guard(opt, compressor) is not handle and len(opt._optimizer_step_pre_hooks) == 1
    guard(opt, TopK(0.01))
    assert len(opt._optimizer_step_pre_hooks) == 2


# ----------------------------------------------------------------------------------------------
# The same through gradsparse.ddp.register on real gloo process groups.

LR, WD = 0.05, 0.01


NOTHING_DROPPED = {  # DGC configurations that send every coordinate
    "whole_tensors": dict(ratio=0.01, min_compress_numel=10**9),  # momentum on the averaged gradient
    "ratio_1": dict(ratio=1.0, min_compress_numel=1),  # the sparse path with k = n
}


def _nothing_dropped(rank, case, nesterov, steps=8):
    """DGC sending everything + DGCSGD vs dense DDP + SGD(momentum, weight_decay, nesterov)."""
    models = [DDP(make_model("mlp")), DDP(make_model("mlp"))]
    opts = [torch.optim.SGD(models[0].parameters(), lr=LR, momentum=M, weight_decay=WD, nesterov=nesterov),
            DGCSGD(models[1].parameters(), lr=LR, momentum=M, weight_decay=WD, nesterov=nesterov)]
    cfg = NOTHING_DROPPED[case]
    gddp.register(models[1], DGC(cfg["ratio"], momentum=M, nesterov=nesterov, warmup=None), optimizer=opts[1],
                  min_compress_numel=cfg["min_compress_numel"])
    scheds = [OneCycleLR(opt, max_lr=0.1, total_steps=steps, cycle_momentum=False) for opt in opts]
    for step in range(steps):
        for model, opt, sched in zip(models, opts, scheds, strict=True):
            opt.zero_grad()
            loss_of(model, "mlp", rank, step).backward()
            opt.step()
            sched.step()
    pairs = zip(models[0].parameters(), models[1].parameters(), strict=True)
    return max(float((a.detach() - b.detach()).abs().max()) for a, b in pairs)


def ddp_worker(rank, world):
    lines = LogLines(logging.WARNING)
    logging.getLogger("gradsparse").addHandler(lines)
    out = {"worst": {(case, n): _nothing_dropped(rank, case, n) for case in NOTHING_DROPPED for n in (False, True)}}
    model = DDP(make_model("mlp"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gddp.register(model, DGC(0.01), optimizer=opt)
    OneCycleLR(opt, max_lr=0.1, total_steps=10)  # cycle_momentum=True: momentum 0.95 from now on
    opt.zero_grad()
    loss_of(model, "mlp", rank, 0).backward()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step()
    except IncompatibleOptimizerError as err:
        out["cycle_momentum"] = str(err)
    out["unchanged"] = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    out["warnings_before"] = len(lines.lines)
    gddp.register(DDP(make_model("mlp")), TopK(0.01))  # nothing to check: no warning
    gddp.register(DDP(make_model("mlp")), DGC(0.01))
    gddp.register(DDP(make_model("mlp")), DGC(0.01))
    out["warnings"] = lines.lines[out["warnings_before"]:]
    return out


def test_register_guards_the_optimizer_world_2():
    for r in run_world(ddp_worker, 2):
        assert max(r["worst"].values()) < 1e-6, r["worst"]
        assert "now has momentum=0.95" in r["cycle_momentum"] and "cycle_momentum=False" in r["cycle_momentum"]
        assert r["unchanged"]
        assert r["warnings_before"] == 0
        assert len(r["warnings"]) == 1 and "optimizer=" in r["warnings"][0], r["warnings"]


# ----------------------------------------------------------------------------------------------
# torch.distributed.optim.ZeroRedundancyOptimizer: judged by the optimizer class it steps.

def zero_worker(rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer as ZeRO

    def attempt(compressor, optimizer_class, **kwargs):
        torch.manual_seed(0)
        model = DDP(nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4)))
        opt = ZeRO(model.parameters(), optimizer_class=optimizer_class, lr=0.1, **kwargs)
        try:
            gddp.register(model, compressor, optimizer=opt, log_every=0)
        except IncompatibleOptimizerError as err:
            return str(err)
        for step in range(3):
            g = torch.Generator().manual_seed(10 * rank + step)
            opt.zero_grad()
            model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
            opt.step()
        # as a scheduler with cycle_momentum=True would, on ZeRO's own param groups
        opt.param_groups[0]["momentum"] = 0.5
        opt.zero_grad()
        model(torch.ones(2, 16)).sum().backward()
        try:
            opt.step()
        except IncompatibleOptimizerError as err:
            return "accepted; then at the step: " + str(err)
        return "accepted"

    return {
        "dgcsgd_wd": attempt(DGC(0.05, momentum=0.9), DGCSGD, momentum=0.9, weight_decay=1e-4),
        "sgd_wd": attempt(DGC(0.05, momentum=0.9), torch.optim.SGD, weight_decay=1e-4),
        "sgd_momentum": attempt(DGC(0.05, momentum=0.9), torch.optim.SGD, momentum=0.9),
        "adam": attempt(DGC(0.05, momentum=0.9), torch.optim.Adam),
        "topk_sgd_momentum": attempt(TopK(0.05), torch.optim.SGD, momentum=0.9),
    }


def test_zero_redundancy_optimizer_is_judged_by_the_optimizer_it_steps():
    """ZeRO(optimizer_class=DGCSGD, momentum=m, weight_decay=wd) is what DGC needs: accepted (it was refused
    as "ZeroRedundancyOptimizer has momentum=0.9", naming DGCSGD as the fix); ZeRO around SGD with weight
    decay gives weight decay no momentum: refused (it was accepted silently). The step guard sees ZeRO's groups."""
    for r in run_world(zero_worker, 2):
        assert r["dgcsgd_wd"].startswith("accepted; then at the step: param group 0 now has momentum=0.5"), r
        assert "gives weight decay no momentum" in r["sgd_wd"], r
        assert "optimizer_class=gradsparse.DGCSGD" in r["sgd_wd"], r
        assert "ZeroRedundancyOptimizer(optimizer_class=SGD) has momentum=0.9" in r["sgd_momentum"], r
        assert "ZeroRedundancyOptimizer(optimizer_class=Adam) keeps its own moment estimates" in r["adam"], r
        assert r["topk_sgd_momentum"] == "accepted", r
