"""Communicator over MPI (mpi4py): jobs launched with ``mpirun``, no torch.distributed.

Payload sizes are exchanged with one ``Allgather`` of an int64 per rank; payloads
then move with one ``Allgatherv`` (variable counts, no padding). Collectives are
blocking and issued from the calling thread, in call order, so every rank issues
them in the same order. Tensors on other devices are staged through host memory.

Example (under ``mpirun -np 2``)::

    from gradsparse import TopK, SparseReducer, Segment
    from gradsparse.comm.mpi import MPICommunicator
    reducer = SparseReducer(TopK(0.01), MPICommunicator())
    for name, p in model.named_parameters():
        reducer.reduce(p.grad, [Segment(name, 0, p.numel())], step).wait()  # in place, any memory format
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Communicator, completed_future

# dtypes MPI reduces natively (through numpy); others are summed in float32
_NATIVE = (torch.float32, torch.float64, torch.int32, torch.int64)


class MPICommunicator(Communicator):
    """Allgatherv / Allreduce on an mpi4py communicator.

    Args:
        comm: an ``mpi4py.MPI.Comm``; None means ``MPI.COMM_WORLD``. An MPI communicator's
            rank and size never change, so they are read once, here.
    """

    timeout_hint = ("MPI collectives do not time out; mpirun ends the job when a rank dies, or with --with-ft ulfm "
                    "the survivors see MPI_ERR_PROC_FAILED")

    pads_to_largest = False

    def __init__(self, comm=None):
        from mpi4py import MPI  # imported here: gradsparse never needs MPI unless this class is used

        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        #: bytes this rank handed to collectives and got back, summed over calls
        self.bytes_sent = 0
        self.bytes_received = 0

    def split(self, color: int) -> MPICommunicator:
        """The ranks of this communicator with the same ``color``, ordered by rank (``Comm.Split``). Collective."""
        return MPICommunicator(self.comm.Split(color=color, key=self.rank))

    def split_shared(self) -> MPICommunicator:
        """The ranks sharing this rank's memory (a node: ``Split_type(COMM_TYPE_SHARED)``). Collective."""
        return MPICommunicator(self.comm.Split_type(self._mpi.COMM_TYPE_SHARED, key=self.rank))

    def free(self) -> None:
        """Release the underlying communicator (one made by :meth:`split` or :meth:`split_shared`)."""
        self.comm.Free()

    def allgather_ints(self, values, device):
        mine = np.array(list(values), dtype=np.int64)
        every = np.empty((self.world_size, mine.size), dtype=np.int64)
        self.comm.Allgather(mine, every)
        self.bytes_sent += mine.nbytes
        self.bytes_received += every.nbytes
        return every.tolist()

    def allgather(self, payload, sizes=None):
        sizes = self._sizes(payload, sizes)
        host = payload.detach().cpu().contiguous()
        received = torch.empty(sum(sizes), dtype=torch.uint8)
        displacements = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.comm.Allgatherv(host.numpy(), [received.numpy(), (list(sizes), displacements.tolist()), self._mpi.BYTE])
        self.bytes_sent += host.numel()
        self.bytes_received += received.numel()
        received = received.to(payload.device)
        return completed_future([received[int(d):int(d) + s] for d, s in zip(displacements, sizes, strict=True)])

    carries_alltoall = True

    def alltoall(self, pieces, sizes):
        received_sizes = self._alltoall_sizes(pieces, sizes)
        device = pieces[0].device
        host = torch.cat([p.detach().cpu() for p in pieces])
        received = torch.empty(sum(received_sizes), dtype=torch.uint8)
        sent_sizes = [p.numel() for p in pieces]
        offsets = [int(x) for x in np.concatenate([[0], np.cumsum(sent_sizes)[:-1]])]
        recv_offsets = [int(x) for x in np.concatenate([[0], np.cumsum(received_sizes)[:-1]])]
        self.comm.Alltoallv([host.numpy(), (sent_sizes, offsets), self._mpi.BYTE],
                            [received.numpy(), (received_sizes, recv_offsets), self._mpi.BYTE])
        self.bytes_sent += host.numel()
        self.bytes_received += received.numel()
        return list(torch.split(received.to(device), received_sizes))

    def allreduce_sum(self, tensor):
        staged = tensor.detach().cpu().contiguous()
        if staged.dtype not in _NATIVE:
            staged = staged.float()
        self.comm.Allreduce(self._mpi.IN_PLACE, staged.numpy())
        self.bytes_sent += staged.numel() * staged.element_size()
        self.bytes_received += staged.numel() * staged.element_size()
        if staged.data_ptr() != tensor.data_ptr():
            tensor.copy_(staged)
        return completed_future(tensor)
