"""The ``"split"`` transport: a sparse reduce-scatter, then an allgather of the reduced regions.

SparCML's split allgather (Renggli et al. 2019). The bucket is cut into ``p`` equal
*regions*, region ``j`` owned by rank ``j``:

1. each rank cuts its selection (and its whole tensors) at the region bounds and
   sends region ``j``'s pairs to rank ``j`` (one alltoall, its sizes exchanged first);
2. rank ``j`` sums what it received into its region, rank by rank, scaled as the
   allgather transport scales (the same additions in the same order: the same bits);
3. every rank allgathers the reduced regions, each as (index, value) pairs or as
   plain fp32 values, whichever is smaller (:func:`encode_region`).

Bytes a rank receives: about one payload in step 1, then ``p - 1`` regions, each at most
``4 n / p`` bytes; the allgather transport receives ``p`` payloads, a ring allreduce about
``8 n``. The bytes drop where ``p`` x density nears or passes 1 (DGC's 25 % warm-up stage
at 4 ranks: 115 against 154 MB a step). Steps 1-2 run in the calling thread (the hook
waits for the alltoall), step 3 is the bucket's asynchronous collective.

Only ``transport="split"`` takes it. On 4 emulated nodes in DGC's 25 % stage it was 8-9 %
faster than the allreduce at 100 Mbit/s, 2-4 % slower at 1 Gbit/s and 6 % at 10 Gbit/s (gloo's
alltoall ran at 57 % of the link here, its allgather at 82 %, its allreduce at 100 %), and
``"auto"``'s per-bucket link model, tried with it, preferred it at every rate (docs/scale.md).
What is selected and what the memory keeps do not depend on it.

Example::

    >>> import torch
    >>> from gradsparse.split import region_bounds, encode_region, decode_region
    >>> region_bounds(10, 3)
    [0, 3, 6, 10]
    >>> msg = encode_region(torch.tensor([0.0, 2.5, 0.0, 0.0]), flags=0)
    >>> out = torch.full((4,), 9.0); decode_region(msg, out)
    0
    >>> out.tolist()
    [0.0, 2.5, 0.0, 0.0]
"""

from __future__ import annotations

import torch

from . import ops
from .errors import PayloadError
from .payload import PayloadLayout

#: first int64 of a region message: what follows is a payload of pairs, or the region's fp32 values
PAIRS, VALUES = 0, 1
HEADER_BYTES = 16  # int64 kind, int64 flags


def region_bounds(numel: int, world: int) -> list[int]:
    """``world + 1`` bounds cutting ``[0, numel)`` into equal regions (the last ones one larger)."""
    return [(j * numel) // world for j in range(world + 1)]


def encode_region(region: torch.Tensor, flags: int, upper: int | None = None) -> torch.Tensor:
    """A reduced fp32 region as one ``uint8`` message: its nonzero (index, value) pairs, or its values.

    ``upper`` bounds its nonzero count (the pairs it received): when pairs could not be smaller, the
    values go without counting. Zeros are never sent as pairs: the sums hold no -0.0 (0.0 + x is
    never -0.0 unless x is), so a receiver zeroing the region first gets the same bits.
    """
    n = region.numel()
    dense = HEADER_BYTES + 4 * n
    nonzero = None
    if upper is None or PayloadLayout(upper, 0, torch.float32).nbytes + HEADER_BYTES < dense:
        nonzero = region.nonzero().view(-1)
        if PayloadLayout(nonzero.numel(), 0, torch.float32).nbytes + HEADER_BYTES >= dense:
            nonzero = None
    if nonzero is None:
        msg = torch.empty(dense, dtype=torch.uint8, device=region.device)
        msg[HEADER_BYTES:].view(torch.float32).copy_(region)
        kind = VALUES
    else:
        payload = ops.pack(nonzero, region.index_select(0, nonzero), region.new_empty(0), n, torch.float32)
        msg = torch.empty(HEADER_BYTES + payload.numel(), dtype=torch.uint8, device=region.device)
        msg[HEADER_BYTES:].copy_(payload)
        kind = PAIRS
    msg[:HEADER_BYTES].view(torch.int64).copy_(torch.tensor([kind, flags], dtype=torch.int64))
    return msg


def decode_region(msg: torch.Tensor, out: torch.Tensor) -> int:
    """Write a message of :func:`encode_region` into ``out`` (the region, fp32); returns its flags."""
    if msg.numel() < HEADER_BYTES:
        raise PayloadError(f"a split region's message has {msg.numel()} bytes, fewer than its {HEADER_BYTES}-byte "
                           "header")
    kind, flags = msg[:HEADER_BYTES].clone().view(torch.int64).tolist()
    body = msg[HEADER_BYTES:]
    if kind == VALUES:
        if body.numel() != 4 * out.numel():
            raise PayloadError(f"a split region of {out.numel()} elements came as {body.numel()} bytes of values")
        out.copy_(body.view(torch.float32))
        return int(flags)
    if kind != PAIRS:
        raise PayloadError(f"a split region's message has kind {kind}, neither pairs ({PAIRS}) nor values ({VALUES})")
    return int(flags) | ops.unpack_add([body], out, torch.float32, None, alpha=1.0, overwrite=True)
