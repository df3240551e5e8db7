"""Communicator over Horovod's public collectives (``horovod.torch``).

Payloads move with ``hvd.allgather_async``, which accepts a different length on
every rank, so nothing is padded: a rank sends exactly its payload. Horovod
matches collectives across ranks by name, so every operation carries a name
derived from the tag set with :meth:`HorovodCommunicator.tagged` (the adapter
uses the parameter name); ranks may then issue them in different orders.

Horovod's handles are not torch futures: :meth:`allgather` and
:meth:`allreduce_sum` return a future that :meth:`complete` fulfils (it waits
for the handle), which runs the reducer's unpack step in the caller's thread.
:meth:`exchange_sizes` and :meth:`allgather_ints` block.

Example (under ``horovodrun -np 2``)::

    import horovod.torch as hvd
    from gradsparse.comm.horovod import HorovodCommunicator
    hvd.init()
    comm = HorovodCommunicator()
    with comm.tagged("w"):
        fut = comm.allgather(payload)
    comm.complete("w"); parts = fut.wait()
"""

from __future__ import annotations

import contextlib

import torch

from .base import Communicator


class HorovodCommunicator(Communicator):
    """Allgather / allreduce through ``horovod.torch`` on a process set.

    Args:
        process_set: a Horovod ``ProcessSet``; None means the global one.
    """

    pads_to_largest = False

    def __init__(self, process_set=None):
        import horovod.torch as hvd  # imported here: gradsparse never needs Horovod unless this class is used

        self._hvd = hvd
        self.process_set = hvd.global_process_set if process_set is None else process_set
        self._tag = "gradsparse"
        self._pending: dict[str, tuple] = {}
        #: bytes of every tensor this rank handed to Horovod, summed over calls
        self.bytes_sent = 0

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def world_size(self) -> int:
        return self.process_set.size()

    @contextlib.contextmanager
    def tagged(self, tag: str):
        """Name the collectives issued inside the block ``{tag}.sizes`` / ``.gather`` / ``.dense``."""
        previous, self._tag = self._tag, tag
        try:
            yield
        finally:
            self._tag = previous

    def _start(self, handle, finish) -> torch.futures.Future:
        if self._tag in self._pending:
            raise RuntimeError(f"a collective tagged {self._tag!r} is already in flight; complete() it first")
        fut: torch.futures.Future = torch.futures.Future()
        self._pending[self._tag] = (handle, fut, finish)
        return fut

    def exchange_sizes(self, nbytes, device):
        return [values[0] for values in self._gather_ints([nbytes], "sizes")]

    def allgather_ints(self, values, device):
        return self._gather_ints(values, "descriptor")

    def _gather_ints(self, values, what: str) -> list[list[int]]:
        """Blocking allgather of one int64 row per rank, named ``{tag}.{what}``."""
        mine = torch.tensor([list(values)], dtype=torch.int64)
        self.bytes_sent += mine.numel() * mine.element_size()
        every = self._hvd.allgather(mine, name=f"{self._tag}.{what}", process_set=self.process_set)
        return every.tolist()

    def allgather(self, payload, sizes=None):
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise TypeError(f"payloads are flat uint8 tensors, got {payload.dtype} of shape {tuple(payload.shape)}")
        if sizes is None:
            sizes = [payload.numel()] * self.world_size
        self.bytes_sent += payload.numel()
        handle = self._hvd.allgather_async(payload, name=f"{self._tag}.gather", process_set=self.process_set)

        def split(gathered: torch.Tensor) -> list[torch.Tensor]:
            if gathered.numel() != sum(sizes):
                raise RuntimeError(f"allgather returned {gathered.numel()} bytes, the ranks sent {sum(sizes)}")
            return list(torch.split(gathered, sizes))

        return self._start(handle, split)

    def allreduce_sum(self, tensor):
        self.bytes_sent += tensor.numel() * tensor.element_size()
        handle = self._hvd.allreduce_async_(tensor, name=f"{self._tag}.dense", op=self._hvd.Sum,
                                            process_set=self.process_set)
        return self._start(handle, lambda reduced: reduced)

    def complete(self, tag: str) -> None:
        """Wait for the collective started under ``tag`` and fulfil its future (runs its callbacks here)."""
        handle, fut, finish = self._pending.pop(tag)
        try:
            result = finish(self._hvd.synchronize(handle))
        except Exception as err:  # noqa: BLE001 - handed to the future's waiter
            fut.set_exception(err)
            return
        fut.set_result(result)

    def in_flight(self) -> list[str]:
        """Tags of collectives started and not yet completed."""
        return list(self._pending)
