"""The wire format of one rank's contribution to one bucket: its layout and its entry points.

Everything the rest of the package knows about the bytes on the wire is here: the
layout (:class:`PayloadLayout`, the header constants, the value dtype codes),
:func:`pack` (one rank's pairs and whole tensors into one payload), :func:`parse`
(validate a payload and view its sections) and :func:`unpack_add` (validate every
rank's payload, then scatter-add them into a dense output). :func:`pack` and
:func:`unpack_add` run the compiled kernels through :mod:`gradsparse.ops` (which
falls back to :mod:`gradsparse._reference`); :func:`parse` is plain PyTorch.

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
    >>> payload = pack(torch.tensor([1, 4]), torch.tensor([0.5, -2.0]), torch.empty(0), 6, torch.float32)
    >>> flags, indices, values, dense = parse(payload, 6, torch.float32, 0)
    >>> indices.tolist(), values.tolist()
    ([1, 4], [0.5, -2.0])
    >>> out = torch.zeros(6)
    >>> unpack_add([payload, payload], out, torch.float32, alpha=0.5)
    0
    >>> out.tolist()
    [0.0, 0.5, 0.0, 0.0, -2.0, 0.0]
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import PayloadError

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


class PayloadBuffers:
    """``uint8`` buffers for payloads, one kept per key (a bucket's plan) between steps.

    A large allocation is fresh pages to fault in every step: at DGC's 25 % warm-up density,
    packing ResNet-50's buckets into new tensors took 13.3 ms a step against 7.1 ms with reuse
    (``torch.profiler`` of ``benchmarks.bucket_bench``'s step while this was built; the version
    without reuse is not kept). A buffer is handed out by :meth:`take` and kept again by :meth:`give`
    once its payload was unpacked, so one in flight is never written twice; one at least twice
    the size asked for (a warm-up's payload after it) is replaced.

    >>> buffers = PayloadBuffers()
    >>> a = buffers.take("bucket0", 64, torch.device("cpu"))
    >>> buffers.give("bucket0", a)
    >>> buffers.take("bucket0", 48, torch.device("cpu")).data_ptr() == a.data_ptr()
    True
    """

    def __init__(self):
        self._kept: dict = {}

    def take(self, key, nbytes: int, device: torch.device) -> torch.Tensor:
        """A contiguous ``uint8`` tensor of ``nbytes`` on ``device``: the kept one when it fits, else a new one."""
        buffer = self._kept.pop(key, None)
        if buffer is None or buffer.device != device or not nbytes <= buffer.numel() < 2 * nbytes + 4096:
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buffer[:nbytes]

    def give(self, key, payload: torch.Tensor) -> None:
        """Keep ``payload``'s memory for the key's next :meth:`take` (its contents are no longer needed)."""
        self._kept[key] = payload


def pack(
    indices: torch.Tensor,
    values: torch.Tensor,
    dense: torch.Tensor,
    numel: int,
    value_dtype: torch.dtype,
    flags: int = 0,
) -> torch.Tensor:
    """One rank's payload: ``indices`` (strictly ascending, in ``[0, numel)``), their ``values`` and the
    ``dense`` section (tensors sent whole), cast to ``value_dtype``; ``flags`` go into the header."""
    from . import ops  # ops reads this module's layout: imported on first use

    return ops.pack(indices, values, dense, numel, value_dtype, flags)


def parse(payload: torch.Tensor, numel: int, value_dtype: torch.dtype, n_dense: int):
    """Validate one payload and return ``(flags, indices, values, dense)`` views of it.

    Raises :class:`~gradsparse.errors.PayloadError` naming the first problem found.
    """
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise PayloadError(f"payload must be a 1-D uint8 tensor, got {payload.dtype} of shape {tuple(payload.shape)}")
    if payload.numel() < HEADER_BYTES:
        raise PayloadError(f"payload of {payload.numel()} bytes is shorter than the {HEADER_BYTES}-byte header")
    magic, flags, count, got_dense, got_numel, code, _, _ = payload[:HEADER_BYTES].view(torch.int32).tolist()
    if magic != MAGIC:
        raise PayloadError(f"bad magic 0x{magic & 0xFFFFFFFF:08x}: not a gradsparse payload")
    if DTYPE_OF_CODE.get(code) != value_dtype:
        raise PayloadError(f"value dtype code {code} does not match the expected {value_dtype}")
    if got_numel != numel:
        raise PayloadError(f"payload is for a bucket of {got_numel} elements, expected {numel}")
    if got_dense != n_dense:
        raise PayloadError(f"payload carries {got_dense} dense values, expected {n_dense}")
    if count < 0 or count > numel:
        raise PayloadError(f"payload count {count} is outside [0, {numel}]")
    layout = PayloadLayout(count, n_dense, value_dtype)
    if payload.numel() < layout.nbytes:
        raise PayloadError(f"payload truncated: {payload.numel()} bytes, its header needs {layout.nbytes}")
    indices = indices_of(payload)  # header and size checked above
    if count:
        if int(indices[0]) < 0 or int(indices[-1]) >= numel:
            raise PayloadError(f"index out of range [0, {numel}): first {int(indices[0])}, last {int(indices[-1])}")
        if count > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise PayloadError("indices are not strictly ascending (duplicate or unordered index)")
    values = payload[layout.values_offset : layout.dense_offset].view(value_dtype)
    end = layout.dense_offset + layout.value_size * n_dense
    dense = payload[layout.dense_offset : end].view(value_dtype)
    return flags, indices, values, dense


def indices_of(payload: torch.Tensor) -> torch.Tensor:
    """The int32 indices of a payload already validated (by ``ops.unpack_add`` or :func:`parse`), as a view;
    its count is the header's third int.

    >>> indices_of(pack(torch.tensor([2, 5]), torch.ones(2), torch.empty(0), 8, torch.float32)).tolist()
    [2, 5]
    """
    count = int(payload[8:12].view(torch.int32))
    return payload[HEADER_BYTES:HEADER_BYTES + 4 * count].view(torch.int32)


def unpack_add(
    payloads: list[torch.Tensor],
    out: torch.Tensor,
    value_dtype: torch.dtype,
    dense_index: torch.Tensor | None = None,
    alpha: float = 1.0,
    overwrite: bool = False,
) -> int:
    """Validate every payload, then scatter-add ``alpha * values`` into ``out`` in rank order.

    ``dense_index`` (int64) gives the positions in ``out`` of each payload's dense
    section. With ``overwrite`` the destination is zeroed first (after
    validation). Returns the OR of all payloads' flags. On any malformed payload
    a :class:`~gradsparse.errors.PayloadError` is raised before ``out`` is touched.
    """
    from . import ops  # ops reads this module's layout: imported on first use

    return ops.unpack_add(payloads, out, value_dtype, dense_index, alpha, overwrite)


__all__ = [
    "DTYPE_OF_CODE",
    "FLAG_NONFINITE",
    "HEADER_BYTES",
    "HEADER_INTS",
    "INT32_MAX",
    "MAGIC",
    "VALUE_DTYPES",
    "PayloadBuffers",
    "PayloadLayout",
    "indices_of",
    "pack",
    "parse",
    "unpack_add",
]
