"""Communicator over Horovod's public collectives (``horovod.torch``).

Payloads move with ``hvd.allgather_async``, which accepts a different length on
every rank, so nothing is padded: a rank sends exactly its payload. Horovod
matches collectives across ranks by name, so every operation carries a name
derived from the tag set with :meth:`~gradsparse.comm.Communicator.tagged` (the
adapter uses the parameter name); ranks may then issue them in different orders.

Horovod's handles are not torch futures: :meth:`HorovodCommunicator.allgather`
and :meth:`HorovodCommunicator.allreduce_sum` return a future that
:meth:`HorovodCommunicator.complete` fulfils (it waits for the handle), which runs
the reducer's unpack step in the caller's thread (``needs_complete`` is True).
:meth:`~HorovodCommunicator.exchange_sizes`, :meth:`~HorovodCommunicator.allgather_ints`
and :meth:`~HorovodCommunicator.broadcast_ints` block.

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

import torch

from ..errors import CollectiveOrderError, CommunicationError
from .base import Communicator


class HorovodCommunicator(Communicator):
    """Allgather / allreduce through ``horovod.torch`` on a process set.

    Args:
        process_set: a Horovod ``ProcessSet``; None means the global one. To change
            it later (between steps), call :meth:`use_process_set`.
    """

    timeout_hint = "Horovod's gloo timeout: horovodrun --gloo-timeout-seconds, 30 s by default"

    pads_to_largest = False
    needs_complete = True

    def __init__(self, process_set=None):
        import horovod.torch as hvd  # imported here: gradsparse never needs Horovod unless this class is used

        self._hvd = hvd
        self._pending: dict[str, tuple] = {}
        self.process_set = None
        self.use_process_set(process_set)
        #: bytes of every tensor this rank handed to Horovod, summed over calls
        self.bytes_sent = 0

    def use_process_set(self, process_set=None) -> None:
        """Run every later collective on ``process_set`` (None: Horovod's global one).

        Raises :class:`~gradsparse.errors.CollectiveOrderError` while collectives are in
        flight: complete them first.
        """
        if self._pending:
            raise CollectiveOrderError(f"cannot change the process set with collectives in flight ({self.in_flight()}); "
                                       "complete() them first")
        self.process_set = self._hvd.global_process_set if process_set is None else process_set

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def world_size(self) -> int:
        return self.process_set.size()

    def _start(self, handle, finish) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        self._pending[self._tag] = (handle, fut, finish)
        return fut

    def _refuse_in_flight(self) -> None:
        if self._tag in self._pending:
            raise CollectiveOrderError(f"a collective tagged {self._tag!r} is already in flight; complete() it first")

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

    def broadcast_ints(self, values, device, root=0):
        """Blocking ``hvd.broadcast`` of rank ``root``'s int64 ``values``, named ``{tag}.broadcast``."""
        mine = torch.tensor(list(values), dtype=torch.int64)
        self.bytes_sent += mine.numel() * mine.element_size()
        return self._hvd.broadcast(mine, root_rank=root, name=f"{self._tag}.broadcast",
                                   process_set=self.process_set).tolist()

    def allgather(self, payload, sizes=None):
        # sizes are not checked against this payload here: a rank that sends other than it announced makes
        # every rank's split below fail at completion, rather than this rank alone (and the others wait)
        sizes = self._sizes(payload, sizes, check_own=False)
        self._refuse_in_flight()
        self.bytes_sent += payload.numel()
        handle = self._hvd.allgather_async(payload, name=f"{self._tag}.gather", process_set=self.process_set)

        def split(gathered: torch.Tensor) -> list[torch.Tensor]:
            if gathered.numel() != sum(sizes):
                raise CommunicationError(f"allgather returned {gathered.numel()} bytes, the ranks sent {sum(sizes)}: "
                                         "a rank's payload differs from the size it announced")
            return list(torch.split(gathered, sizes))

        return self._start(handle, split)

    carries_alltoall = True

    def alltoall(self, pieces, sizes):
        """Blocking ``hvd.alltoall``, named ``{tag}.alltoall``."""
        received_sizes = self._alltoall_sizes(pieces, sizes)
        send = torch.cat(list(pieces))
        self.bytes_sent += send.numel()
        out, got = self._hvd.alltoall(send, splits=torch.tensor([p.numel() for p in pieces], dtype=torch.int32),
                                      name=f"{self._tag}.alltoall", process_set=self.process_set)
        if got.tolist() != received_sizes:
            raise CommunicationError(f"alltoall received {got.tolist()} bytes by rank, the ranks announced "
                                     f"{received_sizes}")
        return list(torch.split(out, received_sizes))

    def allreduce_sum(self, tensor):
        self._refuse_in_flight()
        self.bytes_sent += tensor.numel() * tensor.element_size()
        handle = self._hvd.allreduce_async_(tensor, name=f"{self._tag}.dense", op=self._hvd.Sum,
                                            process_set=self.process_set)
        return self._start(handle, lambda reduced: reduced)

    def complete(self, tag: str) -> None:
        """Wait for the collective started under ``tag`` and fulfil its future (runs its callbacks here)."""
        if tag not in self._pending:
            raise CollectiveOrderError(f"complete({tag!r}): no collective tagged {tag!r} is in flight "
                                       f"(in flight: {self.in_flight()}); call complete() once per tagged collective")
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
