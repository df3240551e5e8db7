"""Communication statistics per bucket and per step.

``bytes_sent`` is what this rank hands to the collective (its payload as the
communicator moves it: padded to the largest rank's under torch.distributed when
sizes differ, as it is under Horovod and MPI; or its dense buffer on the dense
path), plus the small control exchanges; ``bytes_received`` is what the
collectives hand back (every rank's payload, or the reduced dense buffer). The
compression ratio compares ``bytes_sent`` with the dense fp32 gradient.

Words used once each: ``whole`` counts the elements of *whole tensors* (too
small to compress, sent as they are); ``transport`` is how a bucket travelled,
:data:`ALLGATHER` (index/value pairs), :data:`ALLREDUCE` (the same selection
moved densely, when pairs would cost more bytes) or :data:`SPLIT` (pairs summed by
the owner of their region, the regions allgathered: :mod:`gradsparse.split`); a *dense iteration* (every
coordinate selected, the adapters' first iterations) is neither. A bucket reduced
by :mod:`gradsparse.hierarchical` reports :data:`HIERARCHICAL` (or
:data:`HIERARCHICAL_ALLREDUCE`); its ``numel``, ``selected``, ``whole`` and bytes
are this rank's shard and what crossed between nodes, and ``intra_bytes`` what it
moved densely inside its node (handed to the node's two allreduces, or written into shared
memory for the node's other ranks to read).

Example::

    >>> from gradsparse.stats import ALLGATHER, BucketStats, StepStats
    >>> s = StepStats(step=3)
    >>> s.add(BucketStats(numel=1000, selected=10, whole=0, bytes_sent=120,
    ...                   bytes_received=240, transport=ALLGATHER, compress_s=0.001))
    >>> round(s.compression_ratio, 1), s.density
    (33.3, 0.01)
"""

from __future__ import annotations

import dataclasses

ALLGATHER = "allgather"  # index/value pairs (and whole tensors) allgathered
ALLREDUCE = "allreduce"  # the same selection scattered into the bucket and allreduced
SPARSE_ALLREDUCE = "sparse_allreduce"  # a sparse gradient (nn.Embedding(sparse=True)) averaged as DDP does
HIERARCHICAL = "hierarchical"  # dense inside the node, this rank's shard allgathered between nodes
HIERARCHICAL_ALLREDUCE = "hierarchical_allreduce"  # the same, the shard's selection allreduced between nodes
SPLIT = "split"  # pairs reduce-scattered to the regions' owners, the reduced regions allgathered (gradsparse.split)
TRANSPORTS = (ALLGATHER, ALLREDUCE, SPARSE_ALLREDUCE, HIERARCHICAL, HIERARCHICAL_ALLREDUCE, SPLIT)


@dataclasses.dataclass
class BucketStats:
    """What one bucket cost on one rank."""

    numel: int
    selected: int
    whole: int
    bytes_sent: int
    bytes_received: int
    transport: str      # one of TRANSPORTS
    compress_s: float   # this rank's work on the bucket: before the collective and after it
    blocking_s: float = 0.0  # the part before the collective, inside the hook: it stalls backward
    intra_bytes: int = 0  # sent inside the node (hierarchical transports)


@dataclasses.dataclass
class StepStats:
    """Sums over the buckets of one step on one rank."""

    step: int
    numel: int = 0
    selected: int = 0
    whole: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    buckets: int = 0
    allreduce_buckets: int = 0  # buckets whose selection went by the dense transport
    split_buckets: int = 0  # buckets that went by the split transport
    hierarchical_buckets: int = 0  # buckets reduced by gradsparse.hierarchical (allreduce_buckets counts some too)
    compress_s: float = 0.0
    blocking_s: float = 0.0
    intra_bytes: int = 0

    def add(self, b: BucketStats) -> None:
        self.numel += b.numel
        self.selected += b.selected
        self.whole += b.whole
        self.bytes_sent += b.bytes_sent
        self.bytes_received += b.bytes_received
        self.buckets += 1
        self.allreduce_buckets += int(b.transport in (ALLREDUCE, HIERARCHICAL_ALLREDUCE))
        self.split_buckets += int(b.transport == SPLIT)
        self.hierarchical_buckets += int(b.transport in (HIERARCHICAL, HIERARCHICAL_ALLREDUCE))
        self.compress_s += b.compress_s
        self.blocking_s += b.blocking_s
        self.intra_bytes += b.intra_bytes

    @property
    def density(self) -> float:
        """Fraction of coordinates sent (pairs plus whole tensors)."""
        return (self.selected + self.whole) / self.numel if self.numel else 0.0

    @property
    def compression_ratio(self) -> float:
        """Dense fp32 bytes over bytes this rank sent."""
        return 4 * self.numel / self.bytes_sent if self.bytes_sent else 0.0

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "density": self.density, "compression_ratio": self.compression_ratio}

    def __str__(self) -> str:
        return (f"step {self.step}: sent {self.bytes_sent} B, received {self.bytes_received} B, "
                f"density {self.density:.5f}, ratio {self.compression_ratio:.1f}x, "
                f"allreduce buckets {self.allreduce_buckets}/{self.buckets}, compress {1e3 * self.compress_s:.2f} ms")
