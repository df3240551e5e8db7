"""Communicator over ``torch.distributed`` (gloo, nccl).

Each allgather is one collective. When payload sizes differ, the sizes were
exchanged first (a blocking allgather of one int64 per rank issued from the
calling thread) and every payload is padded to the largest; receivers trim.
No collective is ever issued from a future callback, so the order of
collectives is the order of calls, identical on every rank. Futures resolve
when the collective finishes (``needs_complete`` is False): ``complete(tag)``
has nothing to do.

A communicator freed on a thread Python did not start (a gloo worker running a future's
callback that held the last reference, after ``destroy_process_group`` removed torch's own)
does not free its process group there: the group's destructor would join the very thread
it runs on, and the process aborts ("Resource deadlock avoided"). The group is kept until
the next communicator is built on a Python thread, or the interpreter exits.

Example::

    import torch.distributed as dist
    from gradsparse.comm import TorchDistCommunicator
    dist.init_process_group("gloo")
    comm = TorchDistCommunicator()
    fut = comm.allgather(payload)
"""

from __future__ import annotations

import atexit
import threading

import torch
import torch.distributed as dist

from .base import Communicator

_orphans: list = []  # process groups whose communicator was freed on a worker thread (see the module docstring)


def _on_worker_thread() -> bool:
    """Whether this thread was started outside Python (a C++ worker that runs futures' callbacks)."""
    return isinstance(threading.current_thread(), threading._DummyThread)


@atexit.register
def _release_orphans() -> None:
    """Drop the kept process groups (on a Python thread, where their destructors may join their workers)."""
    if _orphans and not _on_worker_thread():
        _orphans.clear()


class TorchDistCommunicator(Communicator):
    """Allgather / allreduce on a ``torch.distributed`` process group.

    Args:
        process_group: the group to use; None means the default (world) group.
    """

    timeout_hint = "the timeout is set by init_process_group"

    def __init__(self, process_group: dist.ProcessGroup | None = None):
        _release_orphans()
        self.process_group = process_group

    def __del__(self):
        group = getattr(self, "process_group", None)
        if group is not None and _on_worker_thread():
            _orphans.append(group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def carries_cpu_tensors(self) -> bool:
        """False for a group whose only backend is NCCL (``"cpu:gloo,cuda:nccl"`` and gloo carry them)."""
        return dist.get_backend(self.process_group) != "nccl"

    def allgather_ints(self, values, device):
        mine = torch.tensor(list(values), dtype=torch.int64, device=device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine, group=self.process_group)
        return [t.tolist() for t in gathered]

    def allgather(self, payload, sizes=None):
        self._sizes(payload, sizes)  # refuses a payload that is not flat uint8 or not its announced size
        if sizes is None:
            send = payload
        else:
            send = payload.new_zeros(max(sizes))
            send[: payload.numel()].copy_(payload)
        outputs = [torch.empty_like(send) for _ in range(self.world_size)]
        work = dist.all_gather(outputs, send, group=self.process_group, async_op=True)

        def trim(fut):
            fut.wait()
            if sizes is None:
                return outputs
            return [out[:size] for out, size in zip(outputs, sizes, strict=True)]

        return work.get_future().then(trim)

    def allreduce_sum(self, tensor):
        work = dist.all_reduce(tensor, group=self.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])

    carries_alltoall = True

    def alltoall(self, pieces, sizes):
        received = self._alltoall_sizes(pieces, sizes)
        send = torch.cat(list(pieces)) if len(pieces) > 1 else pieces[0]
        out = send.new_empty(sum(received))
        dist.all_to_all_single(out, send, received, [p.numel() for p in pieces], group=self.process_group)
        return list(torch.split(out, received))

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.process_group = None
