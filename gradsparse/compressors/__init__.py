"""Compressors: one module per method, all following :class:`Compressor`.

``REGISTRY`` maps a method name to its class, for command-line tools::

    >>> from gradsparse.compressors import REGISTRY
    >>> REGISTRY["topk"](0.01)
    TopK(error_feedback=True, ratio=0.01)
"""

from .base import Compressor
from .dgc import DGC
from .gradient_dropping import GradientDropping
from .per_sign import PerSignTopK
from .threshold import Threshold
from .topk import TopK

REGISTRY: dict[str, type[Compressor]] = {
    cls.name: cls for cls in (TopK, Threshold, PerSignTopK, GradientDropping, DGC)}

__all__ = ["DGC", "REGISTRY", "Compressor", "GradientDropping", "PerSignTopK", "Threshold", "TopK"]
