"""Faults on real gloo worlds: a rank killed mid-step, ranks that disagree. Errors, never hangs.

The SIGKILL run is repeated 20 times, with the time to error recorded, by
``benchmarks/faults.py`` (docs/reliability.md).
"""

import os
import signal
import time

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, Threshold, TopK
from gradsparse import ddp as gddp

from ..distributed import run_world_outcomes
from ..models import loss_of, make_model

COLLECTIVE_TIMEOUT = 20
COMPRESSORS = {"dgc": lambda: DGC(0.01, warmup=None), "threshold": lambda: Threshold(1e-3)}


def train_until_fault(rank, world, victim, kill_step, compressor, when="before", kill_bucket=0, steps=8):
    """Train; rank ``victim`` SIGKILLs itself in its sparse hook at ``kill_step``, bucket ``kill_bucket``.

    ``when="before"``: before reducing the bucket (the others wait in the descriptor
    exchange); ``"after"``: once its payload allgather has been issued; ``"hang"``: it
    does not die but stalls for ``$GRADSPARSE_HANG_SECONDS`` before reducing the bucket
    (the others must time out).
    """
    model = DDP(make_model("mlp"), bucket_cap_mb=0.01)  # buckets 0..2 from step 1 on
    state = gddp.GradSparseState(COMPRESSORS[compressor](), model=model)

    def die():
        torch.save(time.time(), os.environ["GRADSPARSE_KILL_FILE"])
        os.kill(os.getpid(), signal.SIGKILL)

    def hook(state, bucket):
        doomed = rank == victim and state.iter == kill_step and bucket.index() == kill_bucket
        if doomed and when == "hang":
            torch.save(time.time(), os.environ["GRADSPARSE_KILL_FILE"])
            time.sleep(float(os.environ["GRADSPARSE_HANG_SECONDS"]))
            doomed = False
        if doomed and when == "before":
            die()
        fut = gddp.sparse_hook(state, bucket)
        if doomed:
            die()
        return fut

    model.register_comm_hook(state, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        loss_of(model, "mlp", rank, step).backward()
        opt.step()
    return {"steps": steps}


@pytest.mark.parametrize("compressor, when", [("dgc", "before"), ("threshold", "after")])
def test_sigkill_of_one_rank_ends_in_an_error_on_the_others(tmp_path, monkeypatch, compressor, when):
    kill_file = tmp_path / "killed.pt"
    monkeypatch.setenv("GRADSPARSE_KILL_FILE", str(kill_file))
    outcomes = run_world_outcomes(train_until_fault, 3, 2, 3, compressor, when, timeout=COLLECTIVE_TIMEOUT + 90,
                                  collective_timeout=COLLECTIVE_TIMEOUT)
    assert outcomes[2]["exitcode"] == -signal.SIGKILL
    killed_at = torch.load(kill_file)
    for survivor in outcomes[:2]:
        assert survivor["exitcode"] == 1, survivor
        # the step the victim died in, or the next one when its last payload had already gone out
        assert "CommunicationError" in survivor["error"], survivor["error"]
        assert "at step 3 " in survivor["error"] or "at step 4 " in survivor["error"], survivor["error"]
        assert survivor["time"] - killed_at < COLLECTIVE_TIMEOUT + 5


def test_a_stalled_rank_makes_the_others_time_out_with_an_error(tmp_path, monkeypatch):
    timeout = 5
    monkeypatch.setenv("GRADSPARSE_KILL_FILE", str(tmp_path / "stalled.pt"))
    monkeypatch.setenv("GRADSPARSE_HANG_SECONDS", str(timeout + 10))
    outcomes = run_world_outcomes(train_until_fault, 3, 2, 3, "dgc", "hang", timeout=120, collective_timeout=timeout)
    stalled_at = torch.load(tmp_path / "stalled.pt")
    for survivor in outcomes[:2]:
        assert survivor["exitcode"] == 1 and "CommunicationError" in survivor["error"], survivor
        assert timeout - 1 < survivor["time"] - stalled_at < timeout + 5, survivor["time"] - stalled_at
    assert outcomes[2]["exitcode"] == 1  # the stalled rank fails too once it wakes: its peers are gone


def disagreeing_rank(rank, world, what):
    """Rank ``world - 1`` differs from the others in ``what``; returns the error each rank saw."""
    odd = rank == world - 1
    compressor = TopK(0.02 if odd and what == "config" else 0.01)
    kw = {}
    if what == "wire_dtype":
        kw["value_dtype"] = torch.float16 if odd else None
    if what == "threshold_config":
        compressor = Threshold(2e-3 if odd else 1e-3)
    model = DDP(make_model("embed"), bucket_cap_mb=0.01)
    state = gddp.register(model, compressor, **kw)
    if what == "step" and odd:
        state.iter = 5  # e.g. a rank resumed from another checkpoint
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    started = time.monotonic()
    for step in range(4):
        opt.zero_grad()
        try:
            loss_of(model, "embed", rank, step).backward()
        except Exception as err:  # raised by the hook itself, before any payload moves
            return {"error": f"{type(err).__name__}: {err}", "step": step, "seconds": time.monotonic() - started}
        opt.step()
    return {"error": None}


@pytest.mark.parametrize("what, named", [
    ("config", "configuration"),
    ("threshold_config", "configuration"),
    ("wire_dtype", "wire dtype"),
    ("step", "step"),
])
def test_ranks_that_disagree_all_raise_an_error_naming_it(what, named):
    outcomes = run_world_outcomes(disagreeing_rank, 3, what, timeout=120, collective_timeout=COLLECTIVE_TIMEOUT)
    for outcome in outcomes:
        assert outcome["exitcode"] == 0, outcome
        seen = outcome["result"]
        assert seen["error"] is not None and "StateMismatchError" in seen["error"], seen
        assert f"ranks disagree on the {named}" in seen["error"], seen["error"]
        assert seen["step"] == 0


CORRUPTIONS = {  # (int32 position in the payload, value) written into rank 1's outgoing payload
    "index_out_of_range": (8, 10**6),
    "negative_index": (8, -5),
    "wrong_dtype_code": (5, 2),
}


def corrupt_peer(rank, world, corruption):
    """Rank 1's payloads are corrupted on their way out; every rank must refuse them, naming rank 1."""
    model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
    state = gddp.register(model, TopK(0.01))
    if rank == 1:
        comm = state.reducer.communicator
        send = comm.allgather

        def corrupted(payload, sizes=None):
            payload = payload.clone()
            position, value = CORRUPTIONS[corruption]
            payload[:64].view(torch.int32)[position] = value
            return send(payload, sizes)

        comm.allgather = corrupted
    loss_of(model, "mlp", rank, 0).backward()  # dense warm-up step: no payload
    model.zero_grad()
    try:
        loss_of(model, "mlp", rank, 1).backward()
    except RuntimeError as err:  # DDP rethrows the PayloadError raised in the future's callback
        return {"error": str(err)}
    return {"error": None}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_payload_from_a_peer_is_refused_by_every_rank(corruption):
    for outcome in run_world_outcomes(corrupt_peer, 3, corruption, timeout=120):
        seen = outcome["result"]
        assert seen["error"] and "PayloadError" in seen["error"] and "payload 1" in seen["error"], seen
