"""gradsparse state through torch.distributed.checkpoint: per-rank residuals survive dcp.save / dcp.load.

A DCP checkpoint at step k, loaded into fresh models, optimizers and states in new
processes, continues bit for bit like the uninterrupted run; a checkpoint of another
world size is refused before anything is read.
"""

import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, DGCSGD, Warmup, checkpoint
from gradsparse import ddp as gddp
from gradsparse.errors import StateMismatchError

from ..distributed import run_world
from ..models import loss_of, make_model, params_hash

SAVE_AT, AFTER = 9, 30


def build():
    model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
    opt = DGCSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    compressor = DGC(0.01, warmup=Warmup(ratios=(0.25, 0.06), length=4, unit="step"))
    return model, opt, gddp.register(model, compressor, optimizer=opt, log_every=0)


def train(model, opt, rank, steps):
    for step in steps:
        opt.zero_grad()
        loss_of(model, "mlp", rank, step).backward()
        opt.step()


def uninterrupted(rank, world, folder):
    model, opt, state = build()
    train(model, opt, rank, range(SAVE_AT))
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "opt": opt_sd, **checkpoint.dcp_state_dict(state)}, checkpoint_id=folder)
    residual = state.reducer.memory.state["0.weight"]["velocity"].clone()
    train(model, opt, rank, range(SAVE_AT, SAVE_AT + AFTER))
    return params_hash(model), residual


def resumed(rank, world, folder):
    model, opt, state = build()
    model_sd, opt_sd = get_state_dict(model, opt)
    sd = {"model": model_sd, "opt": opt_sd, **checkpoint.dcp_state_dict(state, checkpoint_id=folder)}
    dcp.load(sd, checkpoint_id=folder)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["opt"])
    checkpoint.load_dcp_state_dict(state, sd)
    residual = state.reducer.memory.state["0.weight"]["velocity"].clone()
    train(model, opt, rank, range(SAVE_AT, SAVE_AT + AFTER))
    return params_hash(model), residual


def other_world(rank, world, folder):
    model, opt, state = build()
    before = params_hash(model)
    try:
        checkpoint.dcp_state_dict(state, checkpoint_id=folder)
    except StateMismatchError as err:
        return str(err), before == params_hash(model) and state.iter == 0 and state.reducer.memory.state == {}
    return None, None


def test_dcp_resume_equals_uninterrupted_run_and_other_world_is_refused(tmp_path):
    folder = str(tmp_path / "step9")
    expected = run_world(uninterrupted, 2, folder)
    assert not torch.equal(expected[0][1], expected[1][1])  # the ranks' residuals differ: both must be kept
    assert {os.path.basename(f) for f in os.listdir(folder)} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}
    got = run_world(resumed, 2, folder)
    for rank in range(2):
        assert torch.equal(got[rank][1], expected[rank][1]), f"rank {rank} loaded another rank's residual"
        assert got[rank][0] == expected[rank][0], f"rank {rank}: resumed run differs from the uninterrupted one"
    for message, unchanged in run_world(other_world, 3, folder):
        assert message and "world size 2, this job has 3" in message and unchanged, message
