"""gradsparse.checkpoint: every rank's state gathered into rank 0's checkpoint and given back, no pickle."""

import io

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, checkpoint
from gradsparse import ddp as gddp
from gradsparse.errors import PayloadError, StateMismatchError

from ..distributed import run_world
from ..models import loss_of, make_model


def _odd_state(rank):
    """Nested containers, every leaf type, and a shape and a key that differ between ranks."""
    return {"iter": 7, "rank": rank, "scale": 0.1 + rank, "inf": float("inf"), "flag": rank == 1, "none": None,
            "name": "dgc", "pair": (1, "two"), "list": [1.5, [2]],
            "memory": {"w": {"u": torch.arange(3 + rank, dtype=torch.float32) * (rank + 1)},
                       "b": {"v": torch.tensor(2.5 + rank, dtype=torch.float64)}},
            "mask": torch.tensor([True, rank == 0]), "half": torch.full((2, 2), rank, dtype=torch.bfloat16),
            **({"extra": torch.zeros(0, 4, dtype=torch.int32)} if rank else {})}


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def gather_worker(rank, world, folder):
    saved = checkpoint.gather_state_dicts(_odd_state(rank))
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    out = {"saved": buffer.getvalue() if saved is not None else None}
    # a real state after a few DGC steps: gathered, saved by rank 0, loaded back by every rank
    model = DDP(make_model("mlp"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = gddp.register(model, DGC(0.05, warmup=None), optimizer=opt, min_compress_numel=64)
    for step in range(4):
        opt.zero_grad()
        loss_of(model, "mlp", rank, step).backward()
        opt.step()
    wrapped = checkpoint.AllRanksState(state)
    full = wrapped.state_dict()
    torch.save(full, f"{folder}/rank{rank}.pt")  # what Accelerate does: only rank 0's is kept
    torch.distributed.barrier()
    loaded = torch.load(f"{folder}/rank0.pt", weights_only=True)
    fresh = gddp.GradSparseState(DGC(0.05, warmup=None), model=model, min_compress_numel=64)
    checkpoint.AllRanksState(fresh).load_state_dict(loaded)
    out["roundtrip"] = _equal(fresh.state_dict(), state.state_dict()) and fresh.state_dict()["rank"] == rank
    out["nonempty"] = len(state.state_dict()["memory"]["state"])
    try:
        checkpoint.own_state_dict({"world_size": world + 1, "ranks": [None] * (world + 1)})
    except StateMismatchError as err:
        out["mismatch"] = str(err)
    try:  # what a non-root rank's AllRanksState.state_dict() returned, loaded back without the file rank 0 wrote
        checkpoint.AllRanksState(fresh).load_state_dict(full if rank else {"world_size": world, "ranks": None})
    except StateMismatchError as err:  # before: TypeError: object of type 'NoneType' has no len()
        out["no_ranks"] = str(err)
    return out


def test_every_rank_state_reaches_rank_0_and_comes_back(tmp_path):
    results = run_world(gather_worker, 2, str(tmp_path))
    saved = torch.load(io.BytesIO(results[0]["saved"]), weights_only=True)
    assert results[1]["saved"] is None
    assert saved["world_size"] == 2
    for rank in range(2):
        assert _equal(saved["ranks"][rank], _odd_state(rank)), rank
    for out in results:
        assert out["roundtrip"] and out["nonempty"] >= 2
        assert "holds gradsparse state of 3 ranks, this job has 2" in out["mismatch"]
        assert "Load the checkpoint rank 0 wrote" in out["no_ranks"]


def test_malformed_payload_is_refused():
    good = checkpoint._pack({"a": torch.ones(2), "b": [1, "x"]})
    assert _equal(checkpoint._unpack(good, 0), {"a": torch.ones(2), "b": [1, "x"]})
    with pytest.raises(PayloadError, match="fewer tensor bytes"):
        checkpoint._unpack(good[:-1], 3)
    with pytest.raises(PayloadError, match="more tensor bytes"):
        checkpoint._unpack(torch.cat([good, torch.zeros(1, dtype=torch.uint8)]), 3)
    skeleton = b'{"d": [[{"v": "a"}, {"t": ["Tensor", [1]]}]]}'
    evil = torch.cat([torch.tensor(list(len(skeleton).to_bytes(8, "little") + skeleton), dtype=torch.uint8)])
    with pytest.raises(PayloadError, match="unknown dtype"):
        checkpoint._unpack(evil, 1)
    with pytest.raises(TypeError, match="not object"):
        checkpoint._pack({"a": object()})
