"""TorchDistCommunicator on real gloo groups (worlds 2 and 3), collective by collective.

Each rank runs every operation of the Communicator contract and returns what it got;
the test compares it with values computed here from each rank's own inputs:
allgather of different sizes (one rank empty, all equal, all empty), exchange_sizes,
allgather_ints and broadcast_ints (values past int32), allreduce_sum in place for
the dtypes gradients have, a subgroup, the completion contract (futures resolve on
their own), pickling, and the typed errors raised before any byte moves.
"""

import pickle

import pytest
import torch

from gradsparse.comm import TorchDistCommunicator

from ..distributed import run_world

LENGTHS = {
    "varying_with_empty": lambda rank: 0 if rank == 1 else 5 + 1000 * rank,
    "equal": lambda rank: 64,
    "all_empty": lambda rank: 0,
}
REDUCED = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64)


def payload_for(rank: int, n: int) -> torch.Tensor:
    return ((torch.arange(n) * 7 + 31 * rank) % 251).to(torch.uint8)


def ints_of(rank: int) -> list[int]:
    return [rank, -rank - 1, 2**40 + rank, -(2**62) + rank]


def _errors(comm, rank, world) -> dict:
    """Refused calls, the same on every rank (none is left waiting in a collective): (type, TypeError?, ValueError?)."""
    calls = {
        "float_payload": lambda: comm.allgather(torch.zeros(4)),
        "2d_payload": lambda: comm.allgather(torch.zeros((2, 4), dtype=torch.uint8)),
        "size_not_announced": lambda: comm.allgather(payload_for(rank, 8), [9] * world),
        "sizes_of_another_world": lambda: comm.allgather(payload_for(rank, 8), [8] * (world + 1)),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except Exception as err:  # noqa: BLE001 - reported to the test
            out[name] = (type(err).__name__, isinstance(err, TypeError), isinstance(err, ValueError), str(err))
    return out


def _contract(rank: int, world: int) -> dict:
    import torch.distributed as dist

    comm = TorchDistCommunicator()
    out = {"rank": comm.rank, "world_size": comm.world_size, "needs_complete": comm.needs_complete}
    for name, length_of in LENGTHS.items():
        mine = payload_for(rank, length_of(rank))
        sizes = comm.exchange_sizes(mine.numel(), mine.device)
        tag = f"gather.{name}"
        with comm.tagged(tag):
            fut = comm.allgather(mine, None if name == "equal" else sizes)
        out[f"in_flight.{name}"] = comm.in_flight()
        comm.complete(tag)  # a no-op here: the future resolves on its own
        out[name] = {"sizes": sizes, "got": [t.clone() for t in fut.wait()]}
    out["ints"] = comm.allgather_ints(ints_of(rank), torch.device("cpu"))
    out["broadcast"] = comm.broadcast_ints(ints_of(rank), torch.device("cpu"), root=world - 1)
    for dtype in REDUCED:
        t = (torch.arange(6) * (rank + 1)).to(dtype)
        got = comm.allreduce_sum(t).wait()
        out[f"allreduce.{dtype}"] = {"got": got.clone(), "in_place": got.data_ptr() == t.data_ptr(),
                                     "same": torch.equal(got, t)}
    group = dist.new_group([0, world - 1])  # every rank takes part in creating it
    if rank in (0, world - 1):
        sub = TorchDistCommunicator(group)
        out["sub"] = {"rank": sub.rank, "world_size": sub.world_size,
                      "ints": sub.allgather_ints([rank, 100 + rank], torch.device("cpu"))}
    out["errors"] = _errors(comm, rank, world)
    out["after_errors"] = comm.exchange_sizes(10 + rank, torch.device("cpu"))  # nothing was left half-done
    clone = pickle.loads(pickle.dumps(comm))
    out["unpickled"] = {"group": clone.process_group, "world_size": clone.world_size, "rank": clone.rank}
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3"])
def world(request):
    return request.param, run_world(_contract, request.param)


def test_ranks_and_completion_contract(world):
    size, results = world
    for rank, r in enumerate(results):
        assert (r["rank"], r["world_size"], r["needs_complete"]) == (rank, size, False)
        assert all(r[f"in_flight.{name}"] == [] for name in LENGTHS)


@pytest.mark.parametrize("name", sorted(LENGTHS))
def test_allgather_returns_every_ranks_bytes_trimmed_to_its_size(world, name):
    size, results = world
    lengths = [LENGTHS[name](r) for r in range(size)]
    for r in results:
        assert r[name]["sizes"] == lengths
        got = r[name]["got"]
        assert len(got) == size
        for sender in range(size):
            assert got[sender].dtype == torch.uint8
            assert torch.equal(got[sender], payload_for(sender, lengths[sender])), (name, sender)


def test_allgather_ints_and_broadcast_ints_keep_int64(world):
    size, results = world
    for r in results:
        assert r["ints"] == [ints_of(sender) for sender in range(size)]
        assert r["broadcast"] == ints_of(size - 1)


@pytest.mark.parametrize("dtype", REDUCED, ids=str)
def test_allreduce_sum_is_in_place_and_sums_every_rank(world, dtype):
    size, results = world
    expected = (torch.arange(6) * sum(range(1, size + 1))).to(dtype)
    for r in results:
        got = r[f"allreduce.{dtype}"]
        assert got["in_place"] and got["same"]
        assert got["got"].dtype == dtype and torch.equal(got["got"], expected)


def test_a_subgroup_has_its_own_ranks(world):
    size, results = world
    members = [0, size - 1]
    for rank, r in enumerate(results):
        if rank not in members:
            assert "sub" not in r
            continue
        assert r["sub"] == {"rank": members.index(rank), "world_size": 2,
                            "ints": [[m, 100 + m] for m in members]}


def test_refused_calls_are_typed_and_leave_the_group_usable(world):
    size, results = world
    for rank, r in enumerate(results):
        errors = r["errors"]
        assert errors["float_payload"][:3] == ("PayloadTypeError", True, True)
        assert errors["2d_payload"][:3] == ("PayloadTypeError", True, True)
        assert "reshape(-1).view(torch.uint8)" in errors["float_payload"][3]
        for name in ("size_not_announced", "sizes_of_another_world"):
            assert errors[name][:3] == ("PayloadError", False, True), name
            assert "exchange_sizes()" in errors[name][3]
        assert r["after_errors"] == [10 + sender for sender in range(size)]


def test_pickling_drops_the_group(world):
    size, results = world
    for rank, r in enumerate(results):
        assert r["unpickled"] == {"group": None, "world_size": size, "rank": rank}


class _Holder:
    """Stands for a reducer: what a future's callback keeps alive through its closure."""

    def __init__(self, comm):
        self.comm = comm


def _freed_in_callback_worker(rank, world):
    """A subgroup's communicator whose last reference is a callback's, dropped on the group's own gloo worker
    thread after torch's reference went with destroy_process_group (as a reducer freed right after its last
    bucket is): the group is kept, not destroyed there (which aborts the process), and released once the next
    communicator is built on this thread. Rank 0 registers its callback before rank 1 joins the allreduce, so
    its callbacks run on gloo's thread (rank 1's may run here, inline)."""
    import threading
    import time

    import torch.distributed as dist

    from gradsparse.comm import torch_dist

    threads, kept = [], []
    for _ in range(3):
        group = dist.new_group(list(range(world)))
        kept.append(len(torch_dist._orphans))
        holder = _Holder(TorchDistCommunicator(group))
        out = torch.futures.Future()

        def land(fut, holder=holder):
            threads.append(threading.current_thread().name)
            out.set_result(holder.comm.world_size)
            time.sleep(0.05)  # this thread still holds the closure when the caller drops its references

        if rank > 0:
            time.sleep(0.2)
        holder.comm.allreduce_sum(torch.ones(4)).add_done_callback(land)
        size = out.wait()
        dist.destroy_process_group(group)
        del holder, group, land
        deadline = time.monotonic() + 30
        while rank == 0 and not torch_dist._orphans and time.monotonic() < deadline:
            time.sleep(0.01)
    kept.append(len(torch_dist._orphans))
    TorchDistCommunicator()
    return {"size": size, "kept": kept, "left": len(torch_dist._orphans), "threads": threads}


def test_a_group_freed_on_its_own_worker_thread_is_kept_until_a_python_thread_releases_it():
    reports = run_world(_freed_in_callback_worker, 2)  # a worker that aborted fails here
    assert all(r["size"] == 2 and r["left"] == 0 for r in reports)
    assert all(name.startswith("Dummy") for name in reports[0]["threads"])  # rank 0's callbacks ran on gloo's
    assert reports[0]["kept"] == [0, 1, 1, 1]  # one kept per round, released by the next
