"""The Communicator protocol: how payloads move between ranks.

The reducer needs three operations (:meth:`~Communicator.allgather`,
:meth:`~Communicator.allreduce_sum`, :meth:`~Communicator.exchange_sizes` /
:meth:`~Communicator.allgather_ints`). Implementations exist for torch.distributed
(:mod:`gradsparse.comm.torch_dist`), MPI (:mod:`gradsparse.comm.mpi`) and Horovod
(:mod:`gradsparse.comm.horovod`). Every operation must be called in the same order
on every rank, unless the communicator matches collectives by name (Horovod: see
:meth:`~Communicator.tagged`).

Completion is part of the contract. :meth:`~Communicator.allgather` and
:meth:`~Communicator.allreduce_sum` return a future. Where
:attr:`~Communicator.needs_complete` is False (torch.distributed, MPI, local) the
future resolves on its own; where it is True (Horovod) it resolves only once
:meth:`~Communicator.complete` is called with the tag the collective was started
under. Code that must work with every communicator therefore starts collectives
inside ``with comm.tagged(tag):`` and calls ``comm.complete(tag)`` before it waits;
both are no-ops where nothing needs them.

Example::

    >>> import torch
    >>> from gradsparse.comm import LocalCommunicator
    >>> comm = LocalCommunicator()
    >>> comm.world_size, comm.exchange_sizes(12, "cpu")
    (1, [12])
    >>> with comm.tagged("layer1.weight"):
    ...     fut = comm.allgather(torch.zeros(8, dtype=torch.uint8))
    >>> comm.complete("layer1.weight")
    >>> [p.numel() for p in fut.wait()]
    [8]
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence

import torch

from ..errors import PayloadError, PayloadTypeError


class Communicator(abc.ABC):
    """Moves payloads between the ranks of one group."""

    rank: int
    world_size: int
    #: whether an allgather of differing sizes pads every payload to the largest on the wire
    #: (torch.distributed) or moves each as it is (Horovod, MPI's Allgatherv); the reducer's
    #: byte counts follow it
    pads_to_largest: bool = True
    #: whether the futures of :meth:`allgather` and :meth:`allreduce_sum` resolve only once
    #: :meth:`complete` is called with their tag (Horovod), rather than on their own
    needs_complete: bool = False
    #: what bounds a collective's wait on this backend, for the reducer's transport-failure message
    timeout_hint: str = "the backend's own timeout"
    #: the name of the collectives being started (set with :meth:`tagged`)
    _tag: str = "gradsparse"

    @property
    def carries_cpu_tensors(self) -> bool:
        """Whether its collectives take CPU tensors (False for an NCCL process group)."""
        return True

    @contextlib.contextmanager
    def tagged(self, tag: str):
        """Start the collectives issued inside the block under ``tag``.

        ``tag`` is what :meth:`complete` takes, and the name by which communicators
        that match collectives by name (Horovod) pair them across ranks. Only one
        collective may be in flight per tag.
        """
        previous, self._tag = self._tag, tag
        try:
            yield
        finally:
            self._tag = previous

    def complete(self, tag: str) -> None:
        """Drive the collective started under ``tag`` to completion and resolve its future (in this thread).

        Call it once per tagged :meth:`allgather` / :meth:`allreduce_sum`, before
        waiting on the future. Nothing to do here: this communicator's futures
        resolve on their own (:attr:`needs_complete` is False).
        """

    def in_flight(self) -> list[str]:
        """Tags of collectives started and not yet completed (always empty where nothing needs :meth:`complete`)."""
        return []

    def exchange_sizes(self, nbytes: int, device: torch.device) -> list[int]:
        """Blocking: every rank's payload size in bytes, in rank order."""
        return [values[0] for values in self.allgather_ints([nbytes], device)]

    def allgather_ints(self, values: Sequence[int], device: torch.device) -> list[list[int]]:
        """Blocking: every rank's list of int64 ``values`` (same length everywhere), in rank order.

        The default moves them as one ``uint8`` allgather; subclasses may do better.
        """
        mine = torch.tensor(list(values), dtype=torch.int64, device=device)
        fut = self.allgather(mine.view(torch.uint8))
        self.complete(self._tag)
        return [t.view(torch.int64).tolist() for t in fut.wait()]

    def broadcast_ints(self, values: Sequence[int], device: torch.device, root: int = 0) -> list[int]:
        """Blocking: rank ``root``'s list of int64 ``values`` on every rank (same length everywhere).

        The default takes it from :meth:`allgather_ints`; subclasses may do better.
        """
        return self.allgather_ints(values, device)[root]

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

    #: whether :meth:`alltoall` is implemented (the reducer's ``"split"`` transport needs it)
    carries_alltoall: bool = False

    def alltoall(self, pieces: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Blocking: send ``pieces[j]`` (flat ``uint8``) to rank ``j``; one collective.

        ``sizes[r][j]`` is the bytes rank ``r`` sends rank ``j`` (every rank's list, as
        :meth:`allgather_ints` returns them). Returns the ``uint8`` piece each rank sent this
        one, in rank order.
        """
        raise NotImplementedError(f"{type(self).__name__} has no alltoall; use transport='allgather' or 'bytes'")

    def _alltoall_sizes(self, pieces: Sequence[torch.Tensor], sizes: Sequence[Sequence[int]]) -> list[int]:
        """What each rank sends this one, after checking ``pieces`` against this rank's row of ``sizes``."""
        if len(pieces) != self.world_size or len(sizes) != self.world_size:
            raise PayloadError(f"alltoall takes one piece per rank and every rank's sizes ({self.world_size}), got "
                               f"{len(pieces)} pieces and {len(sizes)} rows")
        for p in pieces:
            if p.dtype != torch.uint8 or p.dim() != 1:
                raise PayloadTypeError(f"alltoall pieces are flat uint8 tensors, got {p.dtype} of shape "
                                       f"{tuple(p.shape)}")
        if [p.numel() for p in pieces] != list(sizes[self.rank]):
            raise PayloadError(f"this rank ({self.rank}) sends pieces of {[p.numel() for p in pieces]} bytes and "
                               f"announced {list(sizes[self.rank])}")
        return [int(row[self.rank]) for row in sizes]

    def _sizes(self, payload: torch.Tensor, sizes: list[int] | None, *, check_own: bool = True) -> list[int]:
        """``sizes``, or this payload's size for every rank, before anything is sent.

        Refuses a payload that is not a flat uint8 tensor (:class:`PayloadTypeError`) and,
        with ``check_own``, ``sizes`` that do not list one size per rank with this
        payload's size at this rank (:class:`PayloadError`).
        """
        if payload.dtype != torch.uint8 or payload.dim() != 1:
            raise PayloadTypeError(f"payloads are flat uint8 tensors, got {payload.dtype} of shape "
                                   f"{tuple(payload.shape)}: pass its bytes, tensor.reshape(-1).view(torch.uint8)")
        if sizes is None:
            return [payload.numel()] * self.world_size
        if check_own and (len(sizes) != self.world_size or sizes[self.rank] != payload.numel()):
            raise PayloadError(f"this rank ({self.rank} of {self.world_size}) has a {payload.numel()}-byte payload and "
                               f"the sizes {list(sizes)[:8]}: pass the sizes exchange_sizes() returned for "
                               "these payloads")
        return sizes


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

    carries_alltoall = True

    def alltoall(self, pieces, sizes):
        self._alltoall_sizes(pieces, sizes)
        return list(pieces)
