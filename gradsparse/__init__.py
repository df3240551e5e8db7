"""gradsparse: sparse gradient communication for data-parallel training.

Example::

    >>> import gradsparse
    >>> gradsparse.DGC(0.001)
    DGC(ratio=0.001, momentum=0.9, nesterov=False, clip_norm=None, sample_ratio=0.01, warmup={'ratios': [0.25, 0.0625, 0.015625, 0.004], 'length': 250, 'unit': 'step'})

The DDP hook lives in :mod:`gradsparse.ddp` (``gradsparse.ddp.register(model, DGC(0.001))``);
:class:`DGCSGD` (in :mod:`gradsparse.optim`) is the optimizer to pair with DGC's momentum correction.
PyTorch Lightning: :mod:`gradsparse.lightning` (imported on request only); every rank's state in a
rank-0 checkpoint: :mod:`gradsparse.checkpoint`.
"""

from . import checkpoint, ddp, errors, optim, watchdog
from .compressors import DGC, REGISTRY, Compressor, GradientDropping, PerSignTopK, Threshold, TopK
from .optim import DGCSGD
from .options import ReducerOptions
from .reducer import Segment, SparseReducer
from .schedule import Warmup
from .stats import BucketStats, StepStats

__version__ = "0.1.0"

__all__ = [
    "DGC",
    "DGCSGD",
    "REGISTRY",
    "ReducerOptions",
    "BucketStats",
    "Compressor",
    "GradientDropping",
    "PerSignTopK",
    "Segment",
    "SparseReducer",
    "StepStats",
    "Threshold",
    "TopK",
    "Warmup",
    "checkpoint",
    "ddp",
    "errors",
    "optim",
    "watchdog",
]
