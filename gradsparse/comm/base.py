"""The Communicator protocol: how payloads move between ranks.

The reducer needs three operations. Implementations exist for torch.distributed
(:mod:`gradsparse.comm.torch_dist`); others (MPI, Horovod) follow the same shape.
Every operation must be called in the same order on every rank.

Example::

    >>> from gradsparse.comm import LocalCommunicator
    >>> comm = LocalCommunicator()
    >>> comm.world_size, comm.exchange_sizes(12, "cpu")
    (1, [12])
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch


class Communicator(abc.ABC):
    """Moves payloads between the ranks of one group."""

    rank: int
    world_size: int
    #: whether an allgather of differing sizes pads every payload to the largest on the wire
    #: (torch.distributed) or moves each as it is (Horovod, MPI's Allgatherv); the reducer's
    #: byte counts follow it
    pads_to_largest: bool = True

    def exchange_sizes(self, nbytes: int, device: torch.device) -> list[int]:
        """Blocking: every rank's payload size in bytes, in rank order."""
        return [values[0] for values in self.allgather_ints([nbytes], device)]

    def allgather_ints(self, values: Sequence[int], device: torch.device) -> list[list[int]]:
        """Blocking: every rank's list of int64 ``values`` (same length everywhere), in rank order.

        The default moves them as one ``uint8`` allgather; subclasses may do better.
        """
        mine = torch.tensor(list(values), dtype=torch.int64, device=device)
        gathered = self.allgather(mine.view(torch.uint8)).wait()
        return [t.view(torch.int64).tolist() for t in gathered]

    @abc.abstractmethod
    def allgather(self, payload: torch.Tensor, sizes: list[int] | None = None) -> torch.futures.Future:
        """Start gathering every rank's ``uint8`` payload; one collective.

        ``sizes`` (from :meth:`exchange_sizes`) is given when sizes differ; when
        None every rank's payload has ``payload.numel()`` bytes. The future's
        value is a list of per-rank ``uint8`` tensors, each trimmed to its size.
        """

    @abc.abstractmethod
    def allreduce_sum(self, tensor: torch.Tensor) -> torch.futures.Future:
        """Start an in-place sum of ``tensor`` over all ranks; the future yields it."""


def completed_future(value) -> torch.futures.Future:
    """A future that is already done, for communicators with blocking collectives."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


class LocalCommunicator(Communicator):
    """World size 1: nothing to exchange. Useful for tests and single-process runs."""

    rank = 0
    world_size = 1

    def allgather_ints(self, values, device):
        return [list(values)]

    def allgather(self, payload, sizes=None):
        return completed_future([payload])

    def allreduce_sum(self, tensor):
        return completed_future(tensor)
