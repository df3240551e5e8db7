"""Communication statistics per bucket and per step.

``bytes_sent`` is what this rank hands to the collective (its payload as the
communicator moves it: padded to the largest rank's under torch.distributed when
sizes differ, as it is under Horovod and MPI; or its dense buffer on the dense
path), plus the small control exchanges; ``bytes_received`` is what the
collectives hand back (every rank's payload, or the reduced dense buffer). The
compression ratio compares ``bytes_sent`` with the dense fp32 gradient.

Example::

    >>> from gradsparse.stats import BucketStats, StepStats
    >>> s = StepStats(step=3)
    >>> s.add(BucketStats(numel=1000, selected=10, whole=0, bytes_sent=120,
    ...                   bytes_received=240, dense=False, compress_s=0.001))
    >>> round(s.compression_ratio, 1), s.density
    (33.3, 0.01)
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class BucketStats:
    """What one bucket cost on one rank."""

    numel: int
    selected: int
    whole: int
    bytes_sent: int
    bytes_received: int
    dense: bool
    compress_s: float


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
    dense_buckets: int = 0
    compress_s: float = 0.0

    def add(self, b: BucketStats) -> None:
        self.numel += b.numel
        self.selected += b.selected
        self.whole += b.whole
        self.bytes_sent += b.bytes_sent
        self.bytes_received += b.bytes_received
        self.buckets += 1
        self.dense_buckets += int(b.dense)
        self.compress_s += b.compress_s

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
                f"dense buckets {self.dense_buckets}/{self.buckets}, compress {1e3 * self.compress_s:.2f} ms")
