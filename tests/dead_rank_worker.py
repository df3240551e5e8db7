"""One rank of the dead-rank tests under a real launcher; launched by tests/multiprocess/test_horovod.py,
test_horovod_hierarchical.py, test_mpi.py and test_mpi_hierarchical.py.

``python -m tests.dead_rank_worker BACKEND PATH VICTIM OUTDIR`` under ``horovodrun --gloo -np 4``
(BACKEND ``horovod``) or ``mpirun -np 4`` (``mpi``): 4 ranks train DGC 1 % through the
``hierarchical`` path (2 emulated nodes x 2 ranks) or the ``flat`` one; at step 3 rank VICTIM
SIGKILLs itself (recording the time in ``OUTDIR/killed.pt``). A surviving rank whose training
raises records what and when in ``OUTDIR/rank{r}.pt`` and exits 1, as a user's script would
(after ``LINGER_S``). Horovod and mpi4py are imported inside ``main`` only (pytest collects
this module).
"""

import os
import signal
import sys
import time

import torch

from gradsparse import DGC
from gradsparse.hierarchical import Hierarchy

from .models import loss_of, make_model

LOCAL, KILL_STEP, STEPS = 2, 3, 8
LINGER_S = 2.0  # a survivor waits after recording before it exits: the launcher ends the job at the first exit


def _horovod(hierarchical: bool):
    import horovod.torch as hvd

    import gradsparse.horovod as gh

    hvd.init(process_sets="dynamic")
    rank = hvd.rank()
    model = make_model("mlp")
    compression = gh.SparseCompression(DGC(0.01, warmup=None), log_every=0,
                                       hierarchy=Hierarchy(local_size=LOCAL) if hierarchical else None)
    opt = gh.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(), compression=compression)

    def step(i: int) -> None:
        opt.zero_grad()
        loss_of(model, "mlp", rank, i).backward()
        opt.step()
    return rank, step


def _mpi(hierarchical: bool):
    from gradsparse.comm.mpi import MPICommunicator
    from gradsparse.hierarchical import Groups, HierarchicalReducer
    from gradsparse.reducer import Segment, SparseReducer

    if hierarchical:
        groups = Groups.from_mpi(LOCAL)
        rank, reducer = groups.world.rank, HierarchicalReducer(DGC(0.01, warmup=None), groups)
    else:
        world = MPICommunicator()
        rank, reducer = world.rank, SparseReducer(DGC(0.01, warmup=None), world)
    model = make_model("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(i: int) -> None:
        opt.zero_grad()
        loss_of(model, "mlp", rank, i).backward()
        for name, p in model.named_parameters():
            reducer.reduce(p.grad.view(-1), [Segment(name, 0, p.numel())], i).wait()
        opt.step()
    return rank, step


def main(backend: str, path: str, victim: int, outdir: str) -> None:
    torch.set_num_threads(1)
    rank, step = {"horovod": _horovod, "mpi": _mpi}[backend]({"hierarchical": True, "flat": False}[path])
    outcome = {"rank": rank, "error": "no error", "type": None}
    try:
        for i in range(STEPS):
            if rank == victim and i == KILL_STEP:
                torch.save(time.time(), os.path.join(outdir, "killed.pt"))
                os.kill(os.getpid(), signal.SIGKILL)
            step(i)
            outcome["steps"] = i + 1
    except Exception as err:  # noqa: BLE001 - the test inspects type and message
        outcome.update(error=f"{type(err).__name__}: {err}", type=type(err).__name__,
                       mro=[c.__name__ for c in type(err).__mro__])
    outcome["time"] = time.time()
    torch.save(outcome, os.path.join(outdir, f"rank{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(LINGER_S)  # so that the other survivors that already failed get to record theirs
    os._exit(1 if outcome["type"] else 0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
