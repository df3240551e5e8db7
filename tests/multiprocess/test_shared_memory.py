"""Shared memory inside a node (gradsparse.comm.shared_memory) on real gloo worlds: the segments, their
files, and the hierarchical reducer falling back to the node's collectives where ranks do not share it."""

import glob
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import TopK
from gradsparse import ddp as gddp
from gradsparse import hierarchical as hier
from gradsparse.comm import TorchDistCommunicator
from gradsparse.comm import shared_memory as shm
from gradsparse.reducer import Segment

from ..distributed import run_world
from ..models import loss_of, make_model
from ..tolerances import close


def test_capacity_is_the_next_power_of_two_of_at_least_one_mib():
    assert shm.capacity(1) == 1 << 20 and shm.capacity(1 << 20) == 1 << 20
    assert shm.capacity((1 << 20) + 1) == 2 << 20 and shm.capacity(100_000_000) == 1 << 27


def segments_worker(rank, world):
    """Operations of growing, shrinking and growing sizes: every rank reads every peer's values of this operation
    (not a stale slot or generation); regions persist; and no file is left once every rank mapped them."""
    assert TorchDistCommunicator().carries_cpu_tensors  # gloo (an NCCL-only group would not be probed)
    memory = shm.NodeMemory.attach(TorchDistCommunicator(), "test")
    seen = []
    sizes = [10, 300_000, 50, 1_000_000, 7, 2_000_000, 3] + [5] * (2 * shm.WINDOW) + [400_000, 9]
    caps = []
    for op, n in enumerate(sizes):
        mine = memory.start(8 * n).view(torch.float64)
        mine.fill_(1000 * op + rank)
        memory.barrier().wait()
        peers = [p.view(torch.float64) for p in memory.peers()]
        seen.append(all(bool((p == 1000 * op + r).all()) for r, p in enumerate(peers)))
        caps.append(list(memory._cap))
    region = memory.region(0, 8 * (rank + 1)).view(torch.float64)
    region.fill_(rank + 0.5)
    memory.barrier().wait()
    theirs = [memory.region(0, 8 * (r + 1), rank=r).view(torch.float64) for r in range(world)]
    regions = all(t.numel() == r + 1 and bool((t == r + 0.5).all()) for r, t in enumerate(theirs))
    memory.barrier().wait()
    left = sorted(glob.glob(os.path.join(shm.ROOT, f"{memory.prefix}*")))
    return {"seen": seen, "regions": regions, "left": left, "prefix": memory.prefix, "caps": caps}


def test_every_rank_reads_each_operations_values_and_no_file_is_left():
    reports = run_world(segments_worker, 3)
    for r in reports:
        assert all(r["seen"]) and r["regions"]
        assert r["left"] == []  # every file is removed by the last rank to map it
        # slots grew to 16 MiB (2M doubles), shrank back to 1 MiB after a window of small operations, grew again
        assert max(max(c) for c in r["caps"]) == 16 << 20
        assert r["caps"][6 + 2 * shm.WINDOW] == [1 << 20, 1 << 20] and r["caps"][-2][1] == 4 << 20
    assert len({r["prefix"] for r in reports}) == 1  # one name agreed on by the node


def private_root_worker(rank, world, roots):
    """Each rank gets its own directory for shared files: not shared, so the node's collectives carry the
    buckets, and the result is still dense DDP's."""
    shm.ROOT = roots[rank]
    assert shm.NodeMemory.attach(TorchDistCommunicator(), "private") is None
    plain = DDP(make_model("mlp"), bucket_cap_mb=0.05)
    hooked = DDP(make_model("mlp"), bucket_cap_mb=0.05)
    state = gddp.GradSparseState(TopK(1.0), model=hooked, log_every=0,
                                 hierarchy=hier.Hierarchy(local_size=2, transport="hierarchical"))
    hooked.register_comm_hook(state, gddp.sparse_hook)
    for model in (plain, hooked):
        loss_of(model, "mlp", rank, 0).backward()
        model.zero_grad()
        loss_of(model, "mlp", rank, 1).backward()
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters()):
        close(b.grad, a.grad, torch.float32, what=name)
    dist.barrier()
    return {"shared": state.reducer.shared is not None, "files": sorted(os.listdir(roots[rank]))}


def test_ranks_that_do_not_share_the_directory_use_the_nodes_collectives(tmp_path):
    roots = [str(tmp_path / f"rank{r}") for r in range(4)]
    for root in roots:
        os.makedirs(root)
    for r in run_world(private_root_worker, 4, roots):
        assert r == {"shared": False, "files": []}


def half_buckets_worker(rank, world, shared_memory):
    """2 nodes x 2 ranks, fp16 and bf16 buckets of several parameters (one too small to split), nothing dropped:
    the node's ranks end with the same bits, and the result is the average of every rank's bucket."""
    reducer = hier.HierarchicalReducer(TopK(1.0), hier.Groups.create(2), transport="hierarchical",
                                       shared_memory=shared_memory)
    out = {}
    segments = [Segment("a", 0, 9_000), Segment("b", 9_000, 100), Segment("c", 9_100, 20_001)]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        grads = [torch.randn(29_101, generator=torch.Generator().manual_seed(r)).to(dtype) for r in range(world)]
        flat = grads[rank].clone()
        reducer.reduce(flat, segments, step=1).wait()
        out[str(dtype)] = flat
        close(flat, sum(g.double() for g in grads) / world, dtype, what=str(dtype), ulps=16)
    return {"shared": reducer.shared is not None, "out": out}


def test_half_precision_buckets_through_shared_memory_equal_the_average_with_one_result_per_node():
    for shared_memory in (True, False):
        reports = run_world(half_buckets_worker, 4, shared_memory)
        assert all(r["shared"] == shared_memory for r in reports)
        for node in (0, 2):
            assert all(torch.equal(reports[node]["out"][k], reports[node + 1]["out"][k]) for k in reports[node]["out"])
