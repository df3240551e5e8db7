"""Entry points for the selection and payload kernels.

Every caller in the package goes through these functions. They use the compiled
``torch.ops.gradsparse`` operators when the C++/CUDA extension is built and fall
back to :mod:`gradsparse._reference` otherwise, with identical results. Which
path is in use is logged once at INFO level and readable as :data:`BACKEND`.

Example::

    >>> import torch
    >>> from gradsparse import ops
    >>> ops.threshold_indices(torch.tensor([0.5, -2.0, 1.0]), 1.0).tolist()
    [1, 2]
"""

from __future__ import annotations

import logging

from . import _reference

logger = logging.getLogger(__name__)


def _load_backend() -> str:
    try:
        from . import _C  # noqa: F401  (compiled extension; registers torch.ops.gradsparse)
    except ImportError:
        logger.info("gradsparse: C++ extension not built, using the pure-PyTorch reference kernels")
        return "reference"
    logger.info("gradsparse: using the compiled C++ extension kernels")
    return "extension"


BACKEND = _load_backend()

# The extension (a separate piece of work) will rebind these names to its operators;
# until then the reference implementation is the only one.
all_finite = _reference.all_finite
topk_indices = _reference.topk_indices
threshold_indices = _reference.threshold_indices
sampled_topk_indices = _reference.sampled_topk_indices
pack = _reference.pack
parse = _reference.parse
unpack_add = _reference.unpack_add

__all__ = [
    "BACKEND",
    "all_finite",
    "pack",
    "parse",
    "sampled_topk_indices",
    "threshold_indices",
    "topk_indices",
    "unpack_add",
]
