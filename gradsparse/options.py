"""The reducer's knobs, in one validated object shared by every adapter.

:class:`ReducerOptions` is what :class:`~gradsparse.reducer.SparseReducer` takes;
the DDP hook state, the Horovod compression and the Lightning strategy accept
either an ``options=`` object or the same names as keywords and pass them through
unchanged, so each knob is declared and checked once, here.

Example::

    >>> import torch
    >>> from gradsparse.options import ReducerOptions
    >>> o = ReducerOptions(min_compress_numel=100.0, value_dtype=torch.float16)
    >>> o.min_compress_numel, o.replace(op="sum").op
    (100, 'sum')
    >>> ReducerOptions(granularity="layer")
    Traceback (most recent call last):
    ...
    gradsparse.errors.InvalidConfigError: granularity must be one of 'parameter', 'bucket', got 'layer'
"""

from __future__ import annotations

import dataclasses

import torch

from ._validate import choice, instance, integer
from .errors import ConfigTypeError, InvalidConfigError
from .payload import VALUE_DTYPES

OPS = ("average", "sum")
GRANULARITIES = ("parameter", "bucket")
NONFINITE_POLICIES = ("raise", "skip")
TRANSPORT_POLICIES = ("auto", "bytes", "allgather", "allreduce", "split")


@dataclasses.dataclass(frozen=True)
class ReducerOptions:
    """How a :class:`~gradsparse.reducer.SparseReducer` reduces a bucket.

    Args:
        granularity: ``"parameter"`` (each tensor its own top-k, as in DGC) or
            ``"bucket"`` (one top-k over the bucket's compressed tensors).
        min_compress_numel: tensors with fewer elements are sent whole.
        value_dtype: dtype of the values on the wire (None: the gradient's dtype).
        nonfinite: ``"skip"`` (a NaN bucket, which AMP's GradScaler skips) or
            ``"raise"`` (:class:`~gradsparse.errors.NonFiniteGradientError`) when a
            rank's gradient is not finite or could overflow.
        op: ``"average"`` (divide by the world size) or ``"sum"``.
        verify_every: compare the ranks' bucket descriptors on every this many
            calls (counted per reducer, so the same on every rank); 0 never does
            for fixed-count methods (one small collective per bucket saved).
        transport: how a bucket's selection travels. ``"bytes"`` (default): pairs
            by allgather unless they cost more bytes than the allreduce of the
            selection scattered densely; ``"auto"``: the transport the link model
            predicts faster, from timings every rank has seen (by bytes until the
            link is measured) — the same choice on every rank, but it may differ
            from run to run, and the two transports sum in different orders, so
            a rerun matches only to float rounding; ``"allgather"`` or
            ``"allreduce"``: always that one; ``"split"``: each region's pairs summed by
            its owner, the regions allgathered (:mod:`gradsparse.split`; only when asked
            for). What is selected and what the memory keeps never depend on it.
    """

    granularity: str = "parameter"
    min_compress_numel: int = 4096
    value_dtype: torch.dtype | None = None
    nonfinite: str = "skip"
    op: str = "average"
    verify_every: int = 1
    transport: str = "bytes"

    def __post_init__(self):
        op = self.op
        if isinstance(op, str) and op.lower() == "adasum" or getattr(op, "__name__", "") == "Adasum":
            raise InvalidConfigError("Adasum cannot be applied to sparse index/value pairs; use op='average' or 'sum'")
        instance(self.value_dtype, "value_dtype", torch.dtype, "torch.float16", allow_none=True)
        if self.value_dtype is not None and self.value_dtype not in VALUE_DTYPES:
            raise InvalidConfigError(f"value_dtype must be one of {list(VALUE_DTYPES)} or None, got {self.value_dtype}")
        checked = {"granularity": choice(self.granularity, "granularity", GRANULARITIES),
                   "min_compress_numel": integer(self.min_compress_numel, "min_compress_numel", minimum=1),
                   "nonfinite": choice(self.nonfinite, "nonfinite", NONFINITE_POLICIES),
                   "op": choice(op, "op", OPS),
                   "verify_every": integer(self.verify_every, "verify_every", minimum=0),
                   "transport": choice(self.transport, "transport", TRANSPORT_POLICIES)}
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, options: ReducerOptions | None = None, **knobs) -> ReducerOptions:
        """``options`` with ``knobs`` applied (the defaults when None); unknown names are refused.

        >>> ReducerOptions.of(None, op="sum").op
        'sum'
        """
        instance(options, "options", cls, "gradsparse.ReducerOptions(min_compress_numel=1024)", allow_none=True)
        unknown = sorted(set(knobs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigTypeError(f"unknown reducer option(s) {unknown}; the options are "
                                  f"{[f.name for f in dataclasses.fields(cls)]}")
        return dataclasses.replace(options or cls(), **knobs)

    def replace(self, **changes) -> ReducerOptions:
        """A copy with ``changes`` applied (validated again)."""
        return ReducerOptions.of(self, **changes)

    def signature(self) -> tuple:
        """What the ranks must agree on (compared through the bucket descriptor); ``value_dtype`` and
        ``verify_every`` are compared separately (the wire dtype) or need not agree."""
        return (self.granularity, self.min_compress_numel, self.nonfinite, self.op, self.transport)
