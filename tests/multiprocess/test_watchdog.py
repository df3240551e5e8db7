"""A gradsparse state whose hook never runs is noticed (gradsparse.watchdog), on real DDP with 2 ranks."""

import logging
import pickle

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, TopK, watchdog
from gradsparse import ddp as gddp

from ..distributed import run_world
from ..logs import LogLines
from ..models import loss_of, make_model


def _train(model, opt, rank, steps):
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, "mlp", rank, step).backward()
        opt.step()


def watchdog_worker(rank, world):
    records = LogLines(logging.WARNING)
    logging.getLogger("gradsparse.watchdog").addHandler(records)
    out = {}
    # 1. registered: its hook runs, it is dropped from the watch at the first step, nothing logged
    model = DDP(make_model("mlp"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = gddp.register(model, TopK(0.1), optimizer=opt)
    _train(model, opt, rank, 1)
    out["registered"] = (watchdog.watched(state), list(records.messages))
    # 2. bound to a DDP model but never registered: a warning by the third optimizer step, not before
    model = DDP(make_model("mlp"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    forgotten = gddp.GradSparseState(DGC(0.01), model=model)
    _train(model, opt, rank, watchdog.WATCH_STEPS - 1)
    out["before"] = list(records.messages)
    _train(model, opt, rank, 1)
    out["bound"] = (watchdog.watched(forgotten), list(records.messages))
    # 3. no model (as DDPStrategy(ddp_comm_state=...) builds it), unpickled as ddp_spawn would: noticed too
    records.messages.clear()
    unbound = pickle.loads(pickle.dumps(gddp.GradSparseState(TopK(0.01))))
    _train(model, opt, rank, watchdog.WATCH_STEPS)
    out["unbound"] = (watchdog.watched(unbound), list(records.messages))
    out["hook_removed"] = watchdog._handle is None
    return out


def test_a_hook_that_never_ran_is_reported_after_a_few_steps():
    for out in run_world(watchdog_worker, 2):
        assert out["registered"] == (False, [])
        assert out["before"] == []
        watched, messages = out["bound"]
        assert not watched and len(messages) == 1, messages
        assert "optimizer stepped 3 times, but the hook of GradSparseState(DGC(" in messages[0]
        assert "gradsparse.lightning.GradSparseStrategy" in messages[0]
        watched, messages = out["unbound"]
        assert not watched and len(messages) == 1 and "GradSparseState(TopK(" in messages[0], messages
        assert out["hook_removed"]  # nothing left to watch: the global optimizer hook is gone
