"""The optimizer side of DGC: :class:`DGCSGD`, and :func:`guard`, which keeps checking it.

DGC's momentum correction (``u = m*u + g; v += u``, sent sparsely) already puts
momentum into the gradient the optimizer receives, so the optimizer must not add
momentum again. Weight decay is the one term DGC does not see: :class:`DGCSGD`
gives it its own momentum buffer, so that with nothing dropped the update equals
dense ``torch.optim.SGD(momentum=m, weight_decay=wd)``.

:func:`guard` checks an optimizer against a compressor now and again before every
``optimizer.step()``, so momentum set later (a scheduler with ``cycle_momentum``,
``add_param_group``) raises instead of being applied twice silently.

Example::

    >>> import torch, gradsparse
    >>> w = torch.nn.Parameter(torch.ones(1))
    >>> opt = gradsparse.DGCSGD([w], lr=0.1, momentum=0.9, weight_decay=0.1)
    >>> handle = gradsparse.optim.guard(opt, gradsparse.DGC(0.01, momentum=0.9))
    >>> for _ in range(2):
    ...     w.grad = torch.zeros(1)  # what DGC delivered: nothing this time
    ...     opt.step()
    >>> round(w.item(), 6)  # the same as dense SGD(momentum=0.9, weight_decay=0.1)
    0.9711
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import required

from ._validate import boolean, real
from .errors import IncompatibleOptimizerError, InvalidConfigError


def _check_hyper(lr, momentum, weight_decay, nesterov) -> None:
    if lr is not required:
        real(lr, "lr", low=0.0)
    real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
    real(weight_decay, "weight_decay", low=0.0)
    boolean(nesterov, "nesterov")
    if nesterov and momentum == 0:
        raise InvalidConfigError("nesterov=True needs momentum > 0 (as in torch.optim.SGD)")


class DGCSGD(torch.optim.Optimizer):
    """SGD for gradients that carry DGC's momentum already: momentum only on weight decay.

    Per parameter and step, with ``g = p.grad`` (DGC's averaged, momentum-corrected
    gradient), ``m = momentum`` and ``wd = weight_decay``::

        w = m * w + wd * p               # own buffer, only when wd != 0
        p -= lr * (g + w)                # nesterov: p -= lr * (g + wd * p + m * w)

    ``g`` is added without momentum. With nothing dropped by DGC this is exactly
    ``torch.optim.SGD(params, lr, momentum=m, weight_decay=wd, nesterov=...)`` on the
    raw gradients; plain ``SGD(momentum=0, weight_decay=wd)`` would give weight decay
    no momentum (``1/(1-m)`` = 10x weaker at m = 0.9). Use the same ``momentum`` and
    ``nesterov`` as the DGC compressor (checked by ``gradsparse.ddp.register`` and
    ``gradsparse.horovod.DistributedOptimizer``). The buffer is saved by
    ``state_dict()`` as ``weight_decay_buffer``.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr: learning rate (>= 0); LR schedulers change it as usual. Required unless
            every param group has its own (Horovod rebuilds the optimizer that way).
        momentum: DGC's momentum, in [0, 1).
        weight_decay: L2 penalty coefficient (>= 0).
        nesterov: DGC's ``nesterov`` (needs ``momentum > 0``).

    Example::

        compressor = gradsparse.DGC(0.001, momentum=0.9)
        opt = gradsparse.DGCSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        gradsparse.ddp.register(ddp_model, compressor, optimizer=opt)
    """

    def __init__(self, params, lr: float = required, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False):
        _check_hyper(lr, momentum, weight_decay, nesterov)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov))

    def add_param_group(self, param_group: dict) -> None:
        """Add a group (its own ``lr``, ``momentum``, ... allowed), validated first."""
        merged = {**self.defaults, **param_group}
        if merged["lr"] is required:
            raise InvalidConfigError("DGCSGD needs lr: DGCSGD(params, lr, ...), or an lr in every param group")
        _check_hyper(merged["lr"], merged["momentum"], merged["weight_decay"], merged["nesterov"])
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(self._direction(p, group), alpha=-group["lr"])
        return loss

    def _direction(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """DGC's gradient plus weight decay carried by its own momentum buffer."""
        grad, wd = p.grad, group["weight_decay"]
        if wd == 0:
            return grad
        m = group["momentum"]
        decay = p.mul(wd)
        state = self.state[p]
        buf = state.get("weight_decay_buffer")
        if buf is None:
            buf = state["weight_decay_buffer"] = decay.clone()  # m * 0 + wd * p
        else:
            buf.mul_(m).add_(decay)
        if group["nesterov"]:
            return decay.add_(grad).add_(buf, alpha=m)
        return buf.add(grad)


# ------------------------------------------------------------------------------------------ guard
_WATCHED = ("momentum", "nesterov", "weight_decay", "betas")
_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> {id(compressor): handle}


def _watched(groups) -> list[dict]:
    return [{k: group[k] for k in _WATCHED if k in group} for group in groups]


def _changes(before: list[dict], groups) -> str:
    """What changed in the optimizer's groups since :func:`guard` looked at them."""
    notes = []
    for i, now in enumerate(_watched(groups)):
        if i >= len(before):
            settings = ", ".join(f"{k}={v!r}" for k, v in now.items())
            notes.append(f"param group {i} was added after registration (add_param_group) with {settings}")
            continue
        for key, value in now.items():
            if value != before[i].get(key):
                notes.append(f"param group {i} now has {key}={value!r} (was {before[i].get(key)!r} at registration)")
    return "; ".join(notes) or "the optimizer changed after registration"


class _StepCheck:
    """Step pre-hook: re-run ``compressor.check_optimizer`` before every step."""

    def __init__(self, compressor, optimizer):
        self.compressor = compressor
        self.before = _watched(optimizer.param_groups)

    def __call__(self, optimizer, args, kwargs):
        try:
            self.compressor.check_optimizer(optimizer)
        except IncompatibleOptimizerError as err:
            raise IncompatibleOptimizerError(
                f"{_changes(self.before, optimizer.param_groups)}. Step not applied: {err}") from None


def _installed(handle) -> bool:
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks


def unwrap(optimizer):
    """The torch optimizer inside a framework's wrapper, or ``optimizer`` itself.

    Accelerate's ``AcceleratedOptimizer`` keeps it in ``.optimizer``, Lightning's
    ``LightningOptimizer`` in ``._optimizer``; the wrapper's own ``step`` calls it,
    so checks and step hooks belong on the inner one.

    Example::

        >>> import torch, gradsparse
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> gradsparse.optim.unwrap(opt) is opt
        True
    """
    for attribute in ("optimizer", "_optimizer"):
        inner = getattr(optimizer, attribute, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return unwrap(inner)
    return optimizer


def guard(optimizer: torch.optim.Optimizer, compressor) -> torch.utils.hooks.RemovableHandle:
    """Check ``optimizer`` against ``compressor`` now and before every ``optimizer.step()``.

    Raises :class:`~gradsparse.errors.IncompatibleOptimizerError` now, or at the
    step (before anything is applied) once the optimizer has changed into something
    the compressor refuses, naming what changed. Returns the step pre-hook's handle
    (``handle.remove()`` stops the checks); calling it again for the same optimizer
    and compressor returns the same handle. ``gradsparse.ddp.register(...,
    optimizer=opt)`` and ``gradsparse.horovod.DistributedOptimizer`` call it.

    Example::

        >>> import torch, gradsparse
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = torch.optim.SGD([w], lr=0.1)
        >>> handle = gradsparse.optim.guard(opt, gradsparse.DGC(0.01))
        >>> opt.param_groups[0]["momentum"] = 0.9  # as a scheduler with cycle_momentum=True would
        >>> w.grad = torch.ones(2)
        >>> try:
        ...     opt.step()
        ... except gradsparse.errors.IncompatibleOptimizerError as err:
        ...     print(str(err)[:58])
        param group 0 now has momentum=0.9 (was 0 at registration)
    """
    optimizer = unwrap(optimizer)  # Accelerate's / Lightning's wrapper: hook the optimizer that steps
    compressor.check_optimizer(optimizer)
    installed = _GUARDS.setdefault(optimizer, {})
    handle = installed.get(id(compressor))
    if handle is None or not _installed(handle):
        handle = installed[id(compressor)] = optimizer.register_step_pre_hook(_StepCheck(compressor, optimizer))
    return handle


__all__ = ["DGCSGD", "guard", "unwrap"]
