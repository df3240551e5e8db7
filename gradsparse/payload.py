"""The wire format of one rank's contribution to one bucket.

A payload is a flat ``uint8`` tensor::

    header   int32[8]   magic, flags, count, n_dense, numel, value dtype code, 0, 0
    indices  int32[count]          strictly ascending, each in [0, numel)
    (pad)    to a multiple of 8 bytes
    values   value_dtype[count]    the selected values, same order as indices
    dense    value_dtype[n_dense]  small tensors sent whole, in segment order
    (pad)    to a multiple of 8 bytes

The header lets the receiver validate every payload before it writes anything;
strictly ascending indices make duplicates detectable in O(count).

Example::

    >>> import torch
    >>> from gradsparse.payload import PayloadLayout
    >>> PayloadLayout(count=3, n_dense=2, value_dtype=torch.float32).nbytes
    72
"""

from __future__ import annotations

import dataclasses

import torch

MAGIC = 0x47535031  # "GSP1"
HEADER_INTS = 8
HEADER_BYTES = HEADER_INTS * 4
FLAG_NONFINITE = 1

INT32_MAX = 2**31 - 1

VALUE_DTYPES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
}
DTYPE_OF_CODE = {code: dtype for dtype, code in VALUE_DTYPES.items()}


def _align8(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8


@dataclasses.dataclass(frozen=True)
class PayloadLayout:
    """Byte offsets of each section for a given count, dense size and value dtype."""

    count: int
    n_dense: int
    value_dtype: torch.dtype

    @property
    def value_size(self) -> int:
        return torch.empty((), dtype=self.value_dtype).element_size()

    @property
    def values_offset(self) -> int:
        return _align8(HEADER_BYTES + 4 * self.count)

    @property
    def dense_offset(self) -> int:
        return self.values_offset + self.value_size * self.count

    @property
    def nbytes(self) -> int:
        return _align8(self.dense_offset + self.value_size * self.n_dense)
