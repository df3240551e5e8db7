"""Checkpoints across processes: resume at a random step equals the uninterrupted run, bit for bit, per rank.

The step is drawn from ``GRADSPARSE_TEST_SEED`` (default 0; tests/conftest.py), so a run is
reproducible and another seed checks another step; a failure names the step and the seed.

A checkpoint that does not fit the job (world size, rank, model) is refused on load.
"""

import logging
import os
import random

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, Threshold, Warmup
from gradsparse import ddp as gddp

from ..conftest import BASE_SEED
from ..distributed import run_world
from ..models import loss_of, make_model, params_hash

logger = logging.getLogger(__name__)

AFTER = 50  # steps trained after the checkpoint
METHODS = {
    "dgc": lambda: DGC(0.01, warmup=Warmup(ratios=(0.25, 0.06), length=6, unit="step")),
    "threshold": lambda: Threshold(0.004),
}


def build(name, kind="mlp"):
    model = DDP(make_model(kind), bucket_cap_mb=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return model, opt, gddp.register(model, METHODS[name](), optimizer=opt, log_every=0)


def train(model, opt, rank, steps):
    for step in steps:
        opt.zero_grad()
        loss_of(model, "mlp", rank, step).backward()
        opt.step()


def uninterrupted(rank, world, folder, save_at):
    """Train save_at + AFTER steps, writing each rank's checkpoint at step save_at."""
    hashes = {}
    for name in METHODS:
        model, opt, state = build(name)
        train(model, opt, rank, range(save_at))
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gradsparse": state.state_dict()},
                   os.path.join(folder, f"{name}-rank{rank}.pt"))
        train(model, opt, rank, range(save_at, save_at + AFTER))
        hashes[name] = params_hash(model)
    return hashes


def resumed(rank, world, folder, save_at):
    hashes = {}
    for name in METHODS:
        model, opt, state = build(name)
        ckpt = torch.load(os.path.join(folder, f"{name}-rank{rank}.pt"), weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        state.load_state_dict(ckpt["gradsparse"])
        train(model, opt, rank, range(save_at, save_at + AFTER))
        hashes[name] = params_hash(model)
    return hashes


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ckpt"))
    save_at = random.Random(BASE_SEED).randint(1, 20)
    logger.info("checkpoint at step %d (GRADSPARSE_TEST_SEED=%d)", save_at, BASE_SEED)
    return folder, save_at, run_world(uninterrupted, 3, folder, save_at)


def test_resume_in_new_processes_equals_uninterrupted_run(checkpoints):
    folder, save_at, expected = checkpoints
    got = run_world(resumed, 3, folder, save_at)
    assert got == expected, f"checkpoint at step {save_at} (GRADSPARSE_TEST_SEED={BASE_SEED} reproduces it)"
    assert len({h["dgc"] for h in got}) == 1  # and the ranks agree with each other


def misfits(rank, world, folder):
    """Each way a world-3 checkpoint can fail to fit this job; returns the error for each."""
    seen = {}

    def attempt(what, name, state, path):
        before = {k: {n: t.clone() for n, t in s.items()} for k, s in state.reducer.memory.state.items()}
        try:
            state.load_state_dict(torch.load(path, weights_only=True)["gradsparse"])
            seen[what] = None
        except Exception as err:
            unchanged = before == {} and state.reducer.memory.state == {} and state.iter == 0
            seen[what] = (f"{type(err).__name__}: {err}", unchanged)

    _, _, state = build("dgc")
    attempt("world", "dgc", state, os.path.join(folder, f"dgc-rank{rank}.pt"))
    if world == 3:
        _, _, state = build("dgc")
        attempt("rank", "dgc", state, os.path.join(folder, f"dgc-rank{(rank + 1) % 3}.pt"))
        _, _, state = build("threshold")
        attempt("compressor", "threshold", state, os.path.join(folder, f"dgc-rank{rank}.pt"))
        _, _, state = build("dgc", kind="embed")
        attempt("model", "dgc", state, os.path.join(folder, f"dgc-rank{rank}.pt"))
        resized = DDP(torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 256),
                                          torch.nn.ReLU(), torch.nn.Linear(256, 10)))
        state = gddp.register(resized, METHODS["dgc"]())
        attempt("resized", "dgc", state, os.path.join(folder, f"dgc-rank{rank}.pt"))
    return seen


def test_checkpoints_that_do_not_fit_are_refused_and_change_nothing(checkpoints):
    folder = checkpoints[0]
    (two,) = {tuple(sorted(r.items())) for r in run_world(misfits, 2, folder)}
    message, unchanged = dict(two)["world"]
    assert "StateMismatchError" in message and "world size 3" in message and unchanged
    for seen in run_world(misfits, 3, folder):
        expected = {"world": None, "rank": "each rank must load its own file", "compressor": "written by",
                    "model": "parameters this model lacks", "resized": "elements"}
        fix = "load it into the model it was saved from"  # the message names the fix
        expected = {what: (fragment, fix) if what in ("model", "resized") else (fragment,)
                    for what, fragment in expected.items()}
        for what, fragment in expected.items():
            if fragment == (None,):
                assert seen[what] is None
                continue
            message, unchanged = seen[what]
            assert "StateMismatchError" in message and all(f in message for f in fragment), (what, message)
            assert unchanged, what
