"""What every adapter of the one pipeline shares: options, steps and epochs, stats, checkpoints.

The DDP hook state (:class:`gradsparse.ddp.GradSparseState`) and the Horovod
compression (:class:`gradsparse.horovod.SparseCompression`) differ in where
gradients come from and where results go; everything else lives here, once:

- the options: the adapter's own (``start_iter``, ``steps_per_epoch``,
  ``log_every``, ``history_size``) and the reducer's
  (:class:`~gradsparse.options.ReducerOptions`, as ``options=`` or keywords),
  validated and passed to one :class:`~gradsparse.reducer.SparseReducer`;
- steps and epochs: :attr:`SparseAdapter.step`, :meth:`~SparseAdapter.set_epoch`,
  :meth:`~SparseAdapter.current_epoch`, the dense iterations before ``start_iter``
  and the warning for an epoch-based warm-up that is never told the epoch;
- statistics: ``last_stats``, ``history`` and the periodic log line;
- the checkpoint format, one key set for every adapter (``step``, ``param_steps``,
  ``epoch``, ``world_size``, ``rank`` and the reducer's ``compressor``, ``memory``,
  ``loss_scale``), and the checks made before anything is restored.

Example::

    >>> from gradsparse import TopK
    >>> from gradsparse.adapter import SparseAdapter
    >>> from gradsparse.comm import LocalCommunicator
    >>> class AtStep12(SparseAdapter):  # an adapter says how it counts steps
    ...     step = 12
    >>> a = AtStep12(TopK(0.01), LocalCommunicator(), steps_per_epoch=5, min_compress_numel=1)
    >>> a.options.min_compress_numel, a.current_epoch(), a.dense_iteration(0), sorted(a.state_dict())
    (1, 2, True, ['compressor', 'epoch', 'loss_scale', 'memory', 'param_steps', 'rank', 'step', 'world_size'])
"""

from __future__ import annotations

import collections
import logging
import operator

from ._validate import instance, integer
from .comm.base import Communicator
from .compressors.base import Compressor
from .errors import ConfigTypeError, StateMismatchError
from .options import ReducerOptions
from .reducer import SparseReducer
from .schedule import untold_epoch_message
from .stats import StepStats

logger = logging.getLogger(__name__)


def check_state_dict(state_dict) -> None:
    """Refuse, with a typed error saying what to pass, anything but a state's ``state_dict()`` (a whole training
    checkpoint, ``None``) before :func:`upgrade_checkpoint` and the checks of what it holds.

    >>> check_state_dict({"model": {}, "gradsparse": {"memory": {}, "world_size": 2, "rank": 0, "step": 3}})
    Traceback (most recent call last):
    ...
    gradsparse.errors.StateMismatchError: load_state_dict() takes what the state's state_dict() returned, got a dict with keys ['gradsparse', 'model']: this looks like a whole checkpoint; pass its ['gradsparse'] entry
    """
    if not isinstance(state_dict, dict):
        raise ConfigTypeError(f"load_state_dict() takes what state_dict() returned (a dict), got "
                              f"{type(state_dict).__name__}")
    if "memory" not in state_dict or not {"step", "iter", "steps"} & state_dict.keys():
        inside = [k for k, v in state_dict.items() if isinstance(v, dict) and "memory" in v]
        hint = f": this looks like a whole checkpoint; pass its [{inside[0]!r}] entry" if inside else \
            " (its keys: step, epoch, world_size, rank, compressor, memory, ...)"
        raise StateMismatchError(f"load_state_dict() takes what the state's state_dict() returned, got a dict with "
                                 f"keys {sorted(map(str, state_dict))[:6]}{hint}")


def upgrade_checkpoint(state_dict: dict) -> dict:
    """A checkpoint of an earlier release in today's key set (DDP wrote ``iter``, Horovod ``steps``).

    >>> upgrade_checkpoint({"iter": 7, "epoch": 0})["step"], upgrade_checkpoint({"steps": {"w": 3}})["param_steps"]
    (7, {'w': 3})
    """
    if "step" in state_dict:
        return state_dict
    old = dict(state_dict)
    if "iter" in old:
        old["step"], old["param_steps"] = int(old.pop("iter")), {}
    elif "steps" in old:
        old["param_steps"] = dict(old.pop("steps"))
        old["step"] = max(old["param_steps"].values(), default=0)
    return old


_SAME_MODEL = ("load it into the model it was saved from (the same parameter names and sizes), or do not load it "
               "and start this state from zero")


def all_slots(cls: type) -> list[str]:
    """Every ``__slots__`` name of ``cls`` and its bases (for ``__getstate__``)."""
    return [name for klass in reversed(cls.__mro__) for name in getattr(klass, "__slots__", ())]


class SparseAdapter:
    """The part of an adapter that does not depend on the framework.

    Args:
        compressor: a :class:`~gradsparse.compressors.Compressor` instance.
        communicator: the :class:`~gradsparse.comm.Communicator` the reducer uses.
        start_iter: dense iterations (every coordinate selected) before compression starts (>= 1).
        steps_per_epoch: lets epoch-based warm-up advance by itself; otherwise
            call :meth:`set_epoch` each epoch.
        log_every: log the step statistics at INFO level every this many steps (0: never).
        history_size: steps kept in ``history`` (the oldest are dropped).
        options, **knobs: the reducer's :class:`~gradsparse.options.ReducerOptions`.
    """

    __slots__ = ("compressor", "start_iter", "steps_per_epoch", "log_every", "reducer", "epoch", "last_stats",
                 "history", "_epoch_told", "_warned_epoch")

    def __init__(self, compressor: Compressor, communicator: Communicator, *, start_iter: int = 1,
                 steps_per_epoch: int | None = None, log_every: int = 100, history_size: int = 10_000,
                 options: ReducerOptions | None = None, **knobs):
        self.compressor = instance(compressor, "compressor", Compressor, "TopK(0.01)")
        self.start_iter = integer(start_iter, "start_iter", minimum=1)
        self.steps_per_epoch = integer(steps_per_epoch, "steps_per_epoch", minimum=1, allow_none=True)
        self.log_every = integer(log_every, "log_every", minimum=0)
        history_size = integer(history_size, "history_size", minimum=0)
        self.reducer = SparseReducer(compressor, communicator, options, **knobs)
        self.epoch = 0
        self.last_stats: StepStats | None = None
        self.history: collections.deque[dict] = collections.deque(maxlen=history_size)
        self._epoch_told = False
        self._warned_epoch = False

    @property
    def options(self) -> ReducerOptions:
        """The reducer's options."""
        return self.reducer.options

    @property
    def communicator(self) -> Communicator:
        return self.reducer.communicator

    # ------------------------------------------------------------ steps and epochs
    @property
    def step(self) -> int:
        """Optimizer steps this adapter has reduced (the next step's index); each adapter defines it."""
        raise NotImplementedError(f"{type(self).__name__} must define step")

    def param_steps(self) -> dict[str, int]:
        """Per-parameter steps where they can differ from :attr:`step` (Horovod); empty otherwise."""
        return {}

    def set_epoch(self, epoch: int) -> None:
        """Tell the adapter the current epoch (for epoch-based warm-up): an integer >= 0, checked here (the hook
        would meet a wrong one inside DDP's backward)."""
        try:
            epoch = operator.index(epoch)  # numpy integers, a 0-d integer tensor
        except TypeError:
            pass  # integer() names what it got
        self.epoch = integer(epoch, "epoch", minimum=0)
        self._epoch_told = True

    def current_epoch(self, step: int | None = None) -> int:
        """The epoch at ``step`` (default: the current step): counted with ``steps_per_epoch``, else as told."""
        step = self.step if step is None else step
        return step // self.steps_per_epoch if self.steps_per_epoch else self.epoch

    def dense_iteration(self, step: int) -> bool:
        """Whether ``step`` selects every coordinate (before ``start_iter``)."""
        return step < self.start_iter

    def _warn_epoch_once(self, step: int) -> None:
        """Once compressing, warn (once) if an epoch-based warm-up is never told the epoch."""
        if self.dense_iteration(step) or self._warned_epoch:
            return
        self._warned_epoch = True
        message = untold_epoch_message(self.compressor, self.steps_per_epoch, self._epoch_told)
        if message:
            logger.warning("gradsparse: %s", message)

    # ------------------------------------------------------------------ stats
    def _publish(self, done: StepStats) -> None:
        """A step's statistics are complete: keep them and log them every ``log_every`` steps."""
        self.last_stats = done
        self.history.append(done.as_dict())
        logger.debug("%s", done)
        if self.log_every and done.step % self.log_every == 0:
            logger.info("gradsparse %s", done)

    def _stats_repr(self) -> str:
        last = self.last_stats
        if last is None:
            return "density=None, ratio=None"
        return f"density={last.density:.4g}, ratio={last.compression_ratio:.1f}x"

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Per-rank state: plain tensors and numbers (``torch.load(weights_only=True)`` loads it)."""
        return {"step": self.step, "param_steps": self.param_steps(), "epoch": self.epoch,
                "world_size": self.communicator.world_size, "rank": self.communicator.rank,
                **self.reducer.state_dict()}

    def _check_checkpoint(self, state_dict: dict, numels: dict[str, int] | None, *, check_world: bool = True) -> None:
        """Raise :class:`StateMismatchError` (before anything changes) unless ``state_dict`` fits this rank.

        With ``check_world``: the same world size and rank. With ``numels`` (the bound
        parameters' sizes): no state for a parameter the model lacks, none of another size.
        """
        comm = self.communicator
        if "hierarchical" in state_dict and isinstance(self.reducer, SparseReducer):
            raise StateMismatchError("checkpoint was written by a hierarchical reduction (its per-piece residuals "
                                     "would be lost here): create the state with the same hierarchy= to load it")
        if check_world and state_dict["world_size"] != comm.world_size:
            raise StateMismatchError(f"checkpoint was written with world size {state_dict['world_size']}, "
                                     f"this job has {comm.world_size}; per-rank residuals cannot be redistributed")
        if check_world and state_dict["rank"] != comm.rank:
            raise StateMismatchError(f"checkpoint holds the state of rank {state_dict['rank']}, this is rank "
                                     f"{comm.rank}: each rank must load its own file")
        if numels is None:
            return
        memory = state_dict["memory"]["state"]
        unknown = set(memory) - set(numels)
        if unknown:
            raise StateMismatchError(f"checkpoint holds state for parameters this model lacks: {sorted(unknown)[:5]}; "
                                     f"{_SAME_MODEL}")
        for name, slot in memory.items():
            for buf_name, buf in slot.items():
                if buf.numel() != numels[name]:
                    raise StateMismatchError(f"checkpoint state {name}.{buf_name} has {buf.numel()} elements, "
                                             f"the model's {name} has {numels[name]}; {_SAME_MODEL}")

    def _restore(self, state_dict: dict) -> None:
        """Restore the reducer's state and the epoch (after :meth:`_check_checkpoint`)."""
        self.reducer.load_state_dict(state_dict)
        self.epoch = int(state_dict["epoch"])
        self._epoch_told = self._epoch_told or self.epoch > 0
