"""Run a function on N real processes joined by a gloo process group on loopback.

Each worker gets ``(rank, world_size, *args)``; its return value comes back to
the test (through torch.save in a temporary folder). A hang fails the test
after ``timeout`` seconds instead of blocking CI. :func:`run_world_outcomes`
also reports ranks that raised or died (fault tests).
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, folder, args, collective_timeout):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    ok = False
    try:
        try:
            result = fn(rank, world_size, *args)
        except Exception as err:
            # for run_world_outcomes: when and how this rank failed, then exit without teardown
            # (a peer may be dead: destroying the group or a barrier could block)
            torch.save({"error": f"{type(err).__name__}: {err}", "time": time.time()},
                       os.path.join(folder, f"rank{rank}.error.pt"))
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
        del result
        # A DDP model whose backward raised must be freed while its process group
        # is alive (freeing it at interpreter exit can abort); then drain the
        # collectives still in flight before teardown.
        gc.collect()
        dist.barrier()
        ok = True
    finally:
        dist.destroy_process_group()
    if ok:
        # Results are saved and every rank passed the barrier. Skip interpreter teardown: in
        # rare runs (about 1 in 50 worlds here) a torch C++ destructor aborts there with
        # "terminate called without an active exception", after all of the test's work is done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run_world(fn, world_size: int, *args, timeout: float = 180, collective_timeout: float = 60) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results by rank."""
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), folder, args, collective_timeout),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    raise TimeoutError(f"workers did not finish within {timeout} s")
        except mp.ProcessExitedException as err:
            errors = {r: torch.load(os.path.join(folder, f"rank{r}.error.pt"))["error"] for r in range(world_size)
                      if os.path.exists(os.path.join(folder, f"rank{r}.error.pt"))}
            raise RuntimeError(f"worker failed: {errors or err}") from err
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def run_world_outcomes(fn, world_size: int, *args, timeout: float = 180, collective_timeout: float = 60) -> list:
    """Like :func:`run_world`, for worlds where ranks may fail: one dict per rank.

    Each dict has ``exitcode`` and either ``result`` (the return value), or ``error``
    (``"Type: message"``) and ``time`` (``time.time()`` when it was caught), or neither
    (the rank died). Ranks still running after ``timeout`` are killed and reported
    with ``exitcode`` None.
    """
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), folder, args, collective_timeout),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        for p in ctx.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        outcomes = []
        for rank, p in enumerate(ctx.processes):
            hung = p.is_alive()
            if hung:
                p.kill()
                p.join()
            outcome = {"exitcode": None if hung else p.exitcode}
            for suffix in ("pt", "error.pt"):
                path = os.path.join(folder, f"rank{rank}.{suffix}")
                if os.path.exists(path):
                    loaded = torch.load(path, weights_only=False)
                    outcome.update({"result": loaded} if suffix == "pt" else loaded)
            outcomes.append(outcome)
        return outcomes
