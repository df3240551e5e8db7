"""Notice a gradsparse hook that never runs: the state exists, training steps, DDP reduces densely.

Frameworks can drop a communication hook without a word (PyTorch Lightning 2.6's
``DDPStrategy(ddp_comm_hook=...)`` registers it only on CUDA), and a state built
but never passed to ``register_comm_hook`` looks the same: training runs, dense.
Every :class:`~gradsparse.ddp.GradSparseState` is watched from its creation: a
global optimizer step pre-hook counts optimizer steps, while a process group is
initialised, that apply gradients to the state's parameters (any parameters when
the state knows no model). After :data:`WATCH_STEPS` such steps with its hook never
called, a WARNING names the state. A state whose hook ran is no longer watched,
and once nothing is watched the global hook removes itself: no cost afterwards.

Example::

    state = gradsparse.ddp.GradSparseState(gradsparse.TopK(0.01), model=ddp_model)
    # ... never registered: after 3 optimizer steps the log says
    # WARNING gradsparse: optimizer stepped 3 times, but the hook of GradSparseState(TopK(...)) never ran ...
"""

from __future__ import annotations

import gc
import logging
import weakref

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

logger = logging.getLogger(__name__)

WATCH_STEPS = 3
"""Optimizer steps without a hook call after which the warning is logged."""

_watched: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # state -> steps seen without its hook
_handle = None  # the global optimizer step pre-hook, while something is watched


def watch(state) -> None:
    """Start watching ``state`` (``GradSparseState.__init__`` calls this).

    Example::

        gradsparse.watchdog.watch(state)
    """
    global _handle
    _watched[state] = 0
    if _handle is None:
        _handle = register_optimizer_step_pre_hook(_on_step)


def watched(state) -> bool:
    """Whether ``state`` is still watched (its hook has not run and no warning was logged yet)."""
    return state in _watched


def _applies_to(state, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is about to apply gradients to parameters ``state`` reduces."""
    names = state._names if state._bound else None
    return any(p.grad is not None and (names is None or id(p) in names)
               for group in optimizer.param_groups for p in group["params"])


def _message(state, steps: int) -> str:
    return (f"gradsparse: optimizer stepped {steps} times, but the hook of GradSparseState({state.compressor!r}) "
            f"never ran: gradients are being reduced without it (dense) or not at all. Register it on the DDP model "
            f"(gradsparse.ddp.register(ddp_model, compressor) or ddp_model.register_comm_hook(state, "
            f"gradsparse.ddp.sparse_hook)). PyTorch Lightning's DDPStrategy(ddp_comm_hook=...) registers hooks on "
            f"CUDA only: use gradsparse.lightning.GradSparseStrategy.")


def _count(optimizer) -> list:
    """Count this step for the states it concerns; return (weak reference, steps) of those now due."""
    due = []
    for state, steps in list(_watched.items()):
        if state.hook_calls:
            del _watched[state]
        elif _applies_to(state, optimizer):
            _watched[state] = steps + 1
            if steps + 1 >= WATCH_STEPS:
                due.append((weakref.ref(state), steps + 1))
                del _watched[state]
    return due


def _on_step(optimizer, args, kwargs) -> None:
    global _handle
    due = _count(optimizer) if dist.is_available() and dist.is_initialized() else []
    if due:
        gc.collect()  # a state the user dropped, kept only by a reference cycle, is not reported
        for ref, steps in due:
            if ref() is not None:
                logger.warning("%s", _message(ref(), steps))
    if not _watched and _handle is not None:
        _handle.remove()
        _handle = None


__all__ = ["WATCH_STEPS", "watch", "watched"]
