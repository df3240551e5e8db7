"""Deep Gradient Compression (Lin et al., 2017).

Per parameter, every step:

1. Local gradient clipping (optional, per tensor): each rank's share of the
   combined gradient is clipped at ``clip_norm / sqrt(world_size)`` (the paper's
   rule: N independent shares of that norm add up to about ``clip_norm``). The
   share is ``g / world_size`` when the ranks average, so ``g`` itself is clipped
   at ``clip_norm * sqrt(world_size)``; when they sum, at ``clip_norm / sqrt(world_size)``.
2. Momentum correction and local accumulation: ``u = m*u + g; v = v + u``
   (Nesterov: ``u = m*(u + g); v = v + u + g``).
3. Select the top-k of ``|v|`` by sampled threshold estimation; the result is
   corrected to exactly ``k`` and equals the exact top-k set.
4. Momentum factor masking: zero ``u`` and ``v`` where sent.
5. Sparsity warm-up: the density follows :class:`~gradsparse.schedule.Warmup`
   (default 25 %, 6.25 %, 1.5625 %, 0.4 % for 250 optimizer steps each, then
   ``ratio`` from step 1,000 on).

Tensors sent whole (small ones) get plain momentum on the averaged gradient, and
a tensor whose every coordinate is sent keeps its momentum (no masking), so with
nothing dropped DGC is dense momentum SGD. The optimizer must not add momentum
again: use :class:`gradsparse.DGCSGD` (weight decay with its own momentum) or SGD
with ``momentum=0`` and no weight decay; :meth:`DGC.check_optimizer` refuses the rest.

Example::

    >>> from gradsparse import DGC
    >>> DGC(0.001).ratio(step=0, epoch=0), DGC(0.001).ratio(step=1000, epoch=0)
    (0.25, 0.001)
"""

from __future__ import annotations

import math
import sys

import torch

from .._validate import boolean, instance, integer, real
from ..errors import IncompatibleOptimizerError, InvalidConfigError
from ..memory import DGCMemory
from ..optim import DGCSGD
from ..schedule import Warmup
from .base import ExactTopK, check_ratio

_DEFAULT = object()


class DGC(ExactTopK):
    """Deep Gradient Compression.

    Args:
        ratio: final density (0.001 = 99.9 % sparsity), in (0, 1].
        momentum: momentum ``m`` used for momentum correction, in [0, 1).
        nesterov: Nesterov momentum correction.
        clip_norm: the norm you would clip the combined gradient to in dense
            training (None: off); each rank clips its local gradient before
            accumulation at :meth:`clip_limit`.
        sample_ratio: fraction of each tensor sampled to estimate the threshold.
        warmup: a :class:`Warmup`, or None for no warm-up. Default: DGC's
            exponential schedule, 250 optimizer steps per stage (1,000 in all).
        seed: seed of the sampling generator (the selected set does not depend on it).
    """

    name = "dgc"
    fixed_count = True

    def __init__(
        self,
        ratio: float = 0.001,
        momentum: float = 0.9,
        nesterov: bool = False,
        clip_norm: float | None = None,
        sample_ratio: float = 0.01,
        warmup: Warmup | None = _DEFAULT,  # type: ignore[assignment]
        seed: int = 0,
    ):
        super().__init__(error_feedback=True)
        self.target_ratio = check_ratio(ratio)
        self.momentum = real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        self.nesterov = boolean(nesterov, "nesterov")
        self.clip_norm = real(clip_norm, "clip_norm", low=0.0, low_open=True, allow_none=True)
        self.sample_ratio = check_ratio(sample_ratio, "sample_ratio")
        if warmup is _DEFAULT:
            warmup = Warmup()
        self.warmup = instance(warmup, "warmup", Warmup, "Warmup()", allow_none=True)
        self.seed = integer(seed, "seed", minimum=-(2**63), maximum=2**64 - 1)  # what manual_seed accepts
        self._generator = torch.Generator().manual_seed(self.seed)

    @property
    def momentum_correction(self) -> bool:
        return self.momentum > 0

    @property
    def supports_sparse_gradients(self) -> bool:
        return not self.momentum_correction  # sparse rows would get no momentum

    def make_memory(self):
        return DGCMemory(self.momentum, self.nesterov)

    def preprocess(self, grad, world_size, loss_scale=1.0, average=True):
        if self.clip_norm is None:
            return grad
        limit = loss_scale * self.clip_limit(world_size, average)
        norm = float(torch.linalg.vector_norm(grad, dtype=torch.float32))
        if norm > limit:
            return grad * (limit / (norm + 1e-6 * loss_scale))  # the same factor at any power-of-two scale
        return grad

    def clip_limit(self, world_size: int, average: bool = True) -> float:
        """Norm a rank's local gradient is clipped to (before any loss scale).

        >>> DGC(clip_norm=1.0).clip_limit(4), DGC(clip_norm=1.0).clip_limit(4, average=False)
        (2.0, 0.5)
        """
        if self.clip_norm is None:
            raise InvalidConfigError("this DGC has no clip_norm")
        root = math.sqrt(world_size)
        return self.clip_norm * root if average else self.clip_norm / root

    def optimizer_rule(self):
        if not self.momentum_correction:
            return None
        return (f"DGC(momentum={self.momentum}) applies momentum itself: the optimizer must add none (use "
                "gradsparse.DGCSGD, or SGD(momentum=0) without weight decay)")

    def check_optimizer(self, optimizer):
        """Refuse an optimizer that would apply momentum again, or weight decay without it.

        With momentum correction on (``momentum > 0``) this accepts ``gradsparse.DGCSGD``
        with this DGC's ``momentum`` and ``nesterov``, and optimizers without momentum,
        moment estimates (Adam's ``betas``) or, for ``torch.optim.SGD``, weight decay.

        >>> import torch, gradsparse
        >>> w = [torch.nn.Parameter(torch.zeros(1))]
        >>> DGC(0.01).check_optimizer(gradsparse.DGCSGD(w, lr=0.1, momentum=0.9, weight_decay=1e-4))
        >>> try:
        ...     DGC(0.01).check_optimizer(torch.optim.SGD(w, lr=0.1, weight_decay=1e-4))
        ... except gradsparse.errors.IncompatibleOptimizerError as err:
        ...     print(str(err)[:82])
        param group 0: SGD(momentum=0, weight_decay=0.0001) gives weight decay no momentum
        """
        if not self.momentum_correction:
            return
        for i, group in enumerate(optimizer.param_groups):
            problem = _optimizer_problem(optimizer, group, self.momentum, self.nesterov)
            if problem:
                raise IncompatibleOptimizerError(f"param group {i}: {problem}")

    def ratio(self, step, epoch):
        if self.warmup is None:
            return self.target_ratio
        return self.warmup.ratio(self.target_ratio, step, epoch)

    def config(self):
        warmup = None if self.warmup is None else {
            "ratios": list(self.warmup.ratios), "length": self.warmup.length, "unit": self.warmup.unit}
        return {"name": self.name, "ratio": self.target_ratio, "momentum": self.momentum,
                "nesterov": self.nesterov, "clip_norm": self.clip_norm,
                "sample_ratio": self.sample_ratio, "warmup": warmup}


def _scheduler_hint(group: dict) -> str:
    if "base_momentum" in group:  # left by OneCycleLR / CyclicLR with cycle_momentum=True
        return " (set by a scheduler with cycle_momentum=True, e.g. OneCycleLR or CyclicLR: pass cycle_momentum=False)"
    return ""


def _zero_inner(optimizer):
    """The local optimizer a ``torch.distributed.optim.ZeroRedundancyOptimizer`` steps (``.optim``), else None.

    ZeRO's own class says nothing about the update: it builds ``optimizer_class(shard, **kwargs)`` on
    each rank and copies its param groups' settings (only the keywords it was given) into it.
    """
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None or not isinstance(optimizer, zero.ZeroRedundancyOptimizer):
        return None
    return getattr(optimizer, "optim", None)


def _optimizer_problem(optimizer, group: dict, m: float, nesterov: bool) -> str | None:
    """Why ``group`` of ``optimizer`` cannot apply gradients DGC corrected with momentum ``m``."""
    inner = _zero_inner(optimizer)
    if isinstance(inner, torch.optim.Optimizer):  # judge the optimizer ZeRO steps, with the settings ZeRO gives it
        group = {**inner.defaults, **group}
        name = f"ZeroRedundancyOptimizer(optimizer_class={type(inner).__name__})"
        make = "ZeroRedundancyOptimizer(params, optimizer_class=gradsparse.DGCSGD, lr=lr, "
        optimizer = inner
    else:
        name = type(optimizer).__name__
        make = "gradsparse.DGCSGD(params, lr, "
    wd = group.get("weight_decay") or 0
    fix = f"{make}momentum={m}, {'nesterov=True, ' if nesterov else ''}weight_decay={wd})"
    if isinstance(optimizer, DGCSGD):
        if group["momentum"] == m and group["nesterov"] == nesterov:
            return None
        return (f"DGCSGD has momentum={group['momentum']}, nesterov={group['nesterov']} but DGC has momentum={m}, "
                f"nesterov={nesterov}{_scheduler_hint(group)}; they must be equal (weight decay would follow "
                f"another momentum than the gradient): use {fix}")
    if "betas" in group:
        return (f"{name} keeps its own moment estimates (betas={group['betas']}) while DGC's momentum correction "
                f"(momentum={m}) already put momentum into the gradient: the two would compound. Use "
                f"DGC(momentum=0) (top-k with error feedback and warm-up) or TopK with {name}")
    if group.get("momentum") or 0:
        return (f"DGC applies momentum {m} itself (momentum correction); {name} has momentum={group['momentum']}"
                f"{_scheduler_hint(group)} and would apply it a second time. Use {fix} (weight decay with DGC's "
                f"momentum) or torch.optim.SGD(params, lr, momentum=0) without weight decay; or DGC(momentum=0) "
                f"to keep {name}'s momentum")
    if wd and isinstance(optimizer, torch.optim.SGD):
        return (f"SGD(momentum=0, weight_decay={wd}) gives weight decay no momentum while DGC gives the gradient "
                f"momentum {m}: weight decay would be 1/(1-m) = {1 / (1 - m):.3g}x weaker than in dense momentum "
                f"SGD. Use {fix}")
    return None
