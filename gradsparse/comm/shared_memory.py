"""Shared memory among the ranks of one node: each rank writes its own segment and reads its peers'.

The node's collectives in :mod:`gradsparse.hierarchical` go through it when the bucket is in
CPU memory: a rank copies its bucket into its segment, a barrier (a one-element allreduce over
the node's :class:`~gradsparse.comm.Communicator`, which also fails loudly when a peer died)
says every rank has written, and each rank reads what it needs straight from its peers'
segments. Inside a node that replaces gloo's loopback TCP (copies through sockets, on the same
cores) with plain memory reads, as NCCL's shared-memory transport does between GPUs.

Segments are POSIX shared memory files (``/dev/shm``), one per rank and *slot*: consecutive
operations alternate between two slots, so a rank may write the next operation while a slower
peer still reads the last one (a rank starts operation ``i + 2`` only after the barrier of
``i + 1``, which no peer enters before it has finished reading ``i``). A segment grows to the
next power of two of what an operation needs, and shrinks after a run of much smaller ones
(every rank sees the same sizes in the same order, so every rank names and sizes its peers'
segments alike). A segment's header holds one flag per
rank, set once that rank has mapped it; whichever rank sets the last flag removes the file (the
mappings stay valid), so a finished job leaves nothing in ``/dev/shm`` (a rank killed after
creating a segment and before every peer mapped it leaves that file).

Besides the slots, :meth:`NodeMemory.region` gives each rank named regions that live as long
as the object (the hierarchical reducer keeps each bucket layout's shard in one, which its peers
read after the exchange, and in another the positions of the shard they read).

Example (every rank of the node, in the same order)::

    memory = NodeMemory.attach(node_communicator, "node")   # None where /dev/shm is not shared
    mine = memory.start(bucket.numel() * 4)                 # this rank's segment for this operation
    mine.view(torch.float32).copy_(bucket)
    memory.barrier().wait()
    total = sum(p.view(torch.float32) for p in memory.peers())
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import random
import shutil

import torch

from ..errors import CommunicationError, InvalidConfigError
from .base import Communicator

logger = logging.getLogger(__name__)

ROOT = "/dev/shm"
SLOTS = 2
MIN_BYTES = 1 << 20
WINDOW = 8  # operations per slot over which a slot's size may shrink


def capacity(nbytes: int) -> int:
    """The segment size for an operation of ``nbytes``: the next power of two, at least 1 MiB.

    >>> capacity(10), capacity(3 << 20)
    (1048576, 4194304)
    """
    return max(MIN_BYTES, 1 << max(0, nbytes - 1).bit_length())


class _Segment:
    """One mapped file: a header of one "mapped" flag per rank, then ``data`` (a ``uint8`` tensor).

    Opening it sets this rank's flag; the rank that finds every flag set removes the file.
    """

    def __init__(self, path: str, nbytes: int, create: bool, rank: int, ranks: int):
        header = _header(ranks)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                _allocate(fd, path, header + nbytes)
            self.map = mmap.mmap(fd, header + nbytes)
        finally:
            os.close(fd)
        self.path = path
        everything = torch.frombuffer(self.map, dtype=torch.uint8)
        self.mapped, self.data = everything[:ranks], everything[header:]
        self.mapped[rank] = 1
        self.remove_if_mapped()

    def remove_if_mapped(self) -> bool:
        """Remove the file once every rank has mapped it; whether it is gone (by this call or another's)."""
        if self.path is not None and bool(self.mapped.all()):
            _remove(self.path)
            self.path = None
        return self.path is None


def _allocate(fd: int, path: str, nbytes: int) -> None:
    """Give the new file ``nbytes`` of pages now: a full ``/dev/shm`` is a typed error here, not a SIGBUS
    at the first write (Docker's default ``/dev/shm`` holds 64 MB)."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate: a sparse file
            os.ftruncate(fd, nbytes)
            return
        _remove(path)
        root = os.path.dirname(path)
        free = shutil.disk_usage(root).free
        raise InvalidConfigError(
            f"gradsparse: no room for {nbytes:,} bytes of shared memory in {root} ({free:,} free; {err.strerror}): "
            f"the hierarchical reduction keeps two of the largest buckets plus 1/local_size of the model's "
            f"gradients (and a list of positions a sixteenth of that) per bucket layout there, per rank "
            f"(docs/ddp.md). Give {root} more room (docker run "
            "--shm-size=2g, or a larger tmpfs), or pass Hierarchy(shared_memory=False) to send them through the "
            "node's collectives") from err


def _header(ranks: int) -> int:
    return 64 * -(-ranks // 64)


class NodeMemory:
    """Two slots of shared memory per rank of ``comm`` (one node), used one operation at a time.

    Args:
        comm: the node's communicator (its barrier; every rank on one machine).
        prefix: a name unique to this job and node (:meth:`attach` agrees on one).
        root: the directory of shared memory files.

    Call :meth:`start`, write this rank's part, :meth:`barrier` and wait for it, then
    :meth:`peers`; every rank of ``comm`` in the same order.
    """

    def __init__(self, comm: Communicator, prefix: str, root: str = ROOT):
        self.comm = comm
        self.rank, self.size = comm.rank, comm.world_size
        self.prefix, self.root = prefix, root
        self.ops = 0
        self._slot = 0
        self._nbytes = 0
        self._gen = [0] * SLOTS                       # generation of each slot's segments (grows with the size)
        self._cap = [0] * SLOTS
        self._recent: list[list[int]] = [[] for _ in range(SLOTS)]  # each slot's last needs (capacities)
        self._mine: list[_Segment | None] = [None] * SLOTS
        self._theirs: dict[tuple[int, int, int], _Segment] = {}
        self._regions: dict[tuple[int, int, int], _Segment] = {}  # (rank, region, bytes): this rank's and peers'

    def _path(self, rank: int, slot: int, gen: int) -> str:
        return os.path.join(self.root, f"{self.prefix}-r{rank}-s{slot}-g{gen}")

    @classmethod
    def attach(cls, comm: Communicator, purpose: str, root: str | None = None) -> NodeMemory | None:
        """A :class:`NodeMemory` over ``comm``, or None (logged) where its ranks do not share ``root``.

        Collective over ``comm``: rank 0 draws a name, every rank writes a probe file and reads
        every peer's, and all must succeed on every rank. ``root`` (None: :data:`ROOT`) is the
        directory of the files.
        """
        root = ROOT if root is None else root
        device = torch.device("cpu")
        token = comm.broadcast_ints([random.SystemRandom().getrandbits(62)], device)[0]
        prefix = f"gradsparse-{token:016x}-{purpose}"
        probe = os.path.join(root, f"{prefix}-probe-r{comm.rank}")
        wrote, size = 0, comm.world_size
        try:
            mine = _Segment(probe, 8, True, comm.rank, size)
            mine.data.view(torch.int64)[0] = token ^ comm.rank
            wrote = 1
        except (OSError, InvalidConfigError) as err:
            logger.info("gradsparse: no shared memory in %s (%s); the node's collectives go through %s", root, err,
                        type(comm).__name__)
        read = 0
        if all(v[0] for v in comm.allgather_ints([wrote], device)):
            try:
                read = int(all(int(_Segment(os.path.join(root, f"{prefix}-probe-r{r}"), 8, False, comm.rank, size)
                                   .data.view(torch.int64)[0]) == token ^ r for r in range(size) if r != comm.rank))
            except OSError:
                read = 0
        shared = all(v[0] for v in comm.allgather_ints([read], device))
        if wrote:
            _remove(probe)  # the peers that mapped it may have removed it already
        if not shared:
            logger.info("gradsparse: the ranks of this node do not share %s; its collectives go through %s", root,
                        type(comm).__name__)
            return None
        return cls(comm, prefix, root)

    def start(self, nbytes: int) -> torch.Tensor:
        """Begin the next operation: this rank's segment (``nbytes`` of it) to write before the barrier.

        A slot grows to what the operation needs, and shrinks to the largest need of its last
        :data:`WINDOW` operations once that is a quarter of its size or less (DDP's first
        iteration reduces the whole model as one bucket; later buckets are far smaller).
        """
        slot = self.ops % SLOTS
        self.ops += 1
        recent, need = self._recent[slot], capacity(nbytes)
        recent.append(need)
        del recent[:-WINDOW]
        if need > self._cap[slot]:
            size = need
        elif len(recent) == WINDOW and 4 * max(recent) <= self._cap[slot]:
            size = max(recent)
        else:
            size = None
        if size is not None:
            if self._mine[slot] is not None:
                self._gen[slot] += 1
            self._cap[slot] = size
            self._mine[slot] = _Segment(self._path(self.rank, slot, self._gen[slot]), self._cap[slot], True,
                                        self.rank, self.size)
            for key in [k for k in self._theirs if k[1] == slot]:  # peers' older generations of this slot
                del self._theirs[key]
        self._slot, self._nbytes = slot, nbytes
        return self._mine[slot].data[:nbytes]

    def barrier(self) -> torch.futures.Future:
        """Start the barrier of this operation (a one-element allreduce over the node)."""
        return self.comm.allreduce_sum(torch.zeros(1))

    def peers(self) -> list[torch.Tensor]:
        """After the barrier: every rank's segment of this operation (``nbytes`` each), by node rank."""
        slot, gen = self._slot, self._gen[self._slot]
        out = []
        for r in range(self.size):
            if r == self.rank:
                out.append(self._mine[slot].data[:self._nbytes])
                continue
            seg = self._theirs.get((r, slot, gen))
            if seg is None:
                seg = self._theirs[(r, slot, gen)] = self._map_peer(self._path(r, slot, gen), self._cap[slot], r)
            out.append(seg.data[:self._nbytes])
        return out

    def region(self, ident: int, nbytes: int, rank: int | None = None) -> torch.Tensor:
        """Region ``ident`` of ``rank`` (None: this rank; created at its first use) of ``nbytes``.

        Unlike the slots a region lives as long as this object (or until :meth:`drop`): the
        caller says when its contents may change. A peer's region exists once that peer has
        passed a barrier after creating it. The same ``ident`` at another size is another region.
        """
        mine = rank is None or rank == self.rank
        key = (self.rank if mine else rank, ident, nbytes)
        seg = self._regions.get(key)
        if seg is None:
            path = os.path.join(self.root, f"{self.prefix}-r{key[0]}-b{ident}-n{nbytes}")
            if mine:  # a dropped region of this name that some rank never mapped: this one replaces it
                _remove(path)
                seg = _Segment(path, max(1, nbytes), True, self.rank, self.size)
            else:
                seg = self._map_peer(path, max(1, nbytes), rank)
            self._regions[key] = seg
        return seg.data[:nbytes]

    def _map_peer(self, path: str, nbytes: int, rank: int) -> _Segment:
        """Map peer ``rank``'s segment at ``path``; a missing one is a :class:`CommunicationError`."""
        try:
            return _Segment(path, nbytes, False, self.rank, self.size)
        except OSError as err:
            raise CommunicationError(f"gradsparse: rank {rank} of this node has no shared segment {path} ({err}): "
                                     "it may have exited") from err

    def drop(self, ident: int) -> None:
        """Forget region ``ident`` of every rank (this rank's mapping of them; the memory goes with the last
        mapping). Call it on every rank alike, once no rank reads or writes that region any more."""
        for key in [k for k in self._regions if k[1] == ident]:
            self._regions.pop(key).remove_if_mapped()

    def close(self) -> None:
        """Remove this rank's files that every rank has mapped (the others are left for the last peer to map)."""
        for seg in [*self._mine, *(seg for (r, _, _), seg in self._regions.items() if r == self.rank)]:
            if seg is not None:
                seg.remove_if_mapped()

    def __del__(self):
        self.close()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["NodeMemory", "capacity"]
