"""The configurations compared: dense and seven sparse ones at 0.1 % density.

=============================  ==========================================================  =================
method                         gradient exchange (gradsparse DDP hook)                      optimizer momentum
=============================  ==========================================================  =================
``dense``                      DDP's own allreduce, no hook                                0.9 (SGD)
``gradient_dropping``          ``TopK(0.001)`` with residual (error feedback), no warm-up  0.9 (SGD)
``dgc``                        ``DGC(0.001, momentum=0.9)`` with sparsity warm-up           0 (in DGC)
``dgc_no_warmup``              ``DGC(0.001, momentum=0.9, warmup=None)``                   0 (in DGC)
``dgc_no_momentum_correction`` ``DGC(0.001, momentum=0)`` with warm-up                     0.9 (SGD)
``per_sign``                   ``PerSignTopK(0.001)``: 0.1 % of each sign, sent as means   0.9 (SGD)
                               (Dryden et al. 2016), residual
``per_sign_values``            ``PerSignTopK(0.001, quantize=False)``: the same selection,  0.9 (SGD)
                               the values themselves (ablation of the means)
``aji_heafield``               ``GradientDropping(drop_ratio=0.999)``: sampled threshold    0.9 (SGD)
                               per tensor (Aji and Heafield 2017), residual
=============================  ==========================================================  =================

DGC's local gradient clipping (``clip_norm``) is used where the task clips
gradients; the other methods clip the averaged gradient instead.

Example::

    >>> from benchmarks.convergence.methods import METHODS, make_method
    >>> m = make_method("dgc", ratio=0.001, momentum=0.9, warmup=None, clip=None)
    >>> m.compressor.momentum, m.optimizer_momentum, m.local_clip
    (0.9, 0.0, False)
"""

from __future__ import annotations

import dataclasses

from gradsparse import DGC, Compressor, GradientDropping, PerSignTopK, TopK, Warmup

METHODS = ("dense", "gradient_dropping", "dgc", "dgc_no_warmup", "dgc_no_momentum_correction", "per_sign",
           "per_sign_values", "aji_heafield")


@dataclasses.dataclass
class Method:
    name: str
    compressor: Compressor | None   # None: plain DDP allreduce
    optimizer_momentum: float
    local_clip: bool                # DGC clips each rank's gradient itself (clip_norm)


def make_method(name: str, *, ratio: float, momentum: float, warmup: Warmup | None, clip: float | None,
                seed: int = 0) -> Method:
    """Build one of :data:`METHODS` for a task's ratio, momentum, warm-up schedule and clipping norm."""
    if name == "dense":
        return Method(name, None, momentum, False)
    if name == "gradient_dropping":
        return Method(name, TopK(ratio), momentum, False)
    if name == "per_sign":
        return Method(name, PerSignTopK(ratio), momentum, False)
    if name == "per_sign_values":
        return Method(name, PerSignTopK(ratio, quantize=False), momentum, False)
    if name == "aji_heafield":
        return Method(name, GradientDropping(drop_ratio=1.0 - ratio), momentum, False)
    dgc = dict(ratio=ratio, clip_norm=clip, seed=seed)
    if name == "dgc":
        return Method(name, DGC(momentum=momentum, warmup=warmup, **dgc), 0.0, clip is not None)
    if name == "dgc_no_warmup":
        return Method(name, DGC(momentum=momentum, warmup=None, **dgc), 0.0, clip is not None)
    if name == "dgc_no_momentum_correction":
        return Method(name, DGC(momentum=0.0, warmup=warmup, **dgc), momentum, clip is not None)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
