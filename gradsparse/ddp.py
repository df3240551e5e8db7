"""DDP communication hook for sparse gradient reduction.

Use it like any PyTorch comm hook::

    model = DDP(net)
    state = GradSparseState(DGC(0.001), model=net)
    model.register_comm_hook(state, sparse_hook)

or in one line, which also checks the optimizer (now and before every step)::

    state = gradsparse.ddp.register(model, DGC(0.001), optimizer=opt)

Algorithm, per bucket (see :class:`gradsparse.reducer.SparseReducer`):

1. For the first ``start_iter`` iterations every coordinate is sent by dense
   allreduce through the same pipeline (so DGC's momentum is already right and
   DDP's bucket rebuild after iteration 0 meets no sparse state).
2. Afterwards each parameter's gradient is compensated (residual or DGC
   momentum), its top-k / threshold selection is packed and allgathered, and
   every rank scatter-adds all payloads in rank order and divides by the world size.

State is keyed by parameter name (``model`` given) so it survives bucket rebuilds
and can be checkpointed with :meth:`GradSparseState.state_dict`.

DGC's momentum correction replaces optimizer momentum: use
:class:`gradsparse.DGCSGD` (weight decay with DGC's momentum), or
``torch.optim.SGD(params, lr, momentum=0)`` without weight decay;
:func:`register` refuses the rest (see :meth:`gradsparse.DGC.check_optimizer`).
"""

# No "from __future__ import annotations": DDP compares the hook's annotations
# with dist.GradBucket and Future[Tensor] as objects, not strings.

import logging
import sys
import threading
import weakref

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import hierarchical, watchdog
from ._validate import instance
from .adapter import SparseAdapter, all_slots, check_state_dict, upgrade_checkpoint
from .comm.torch_dist import TorchDistCommunicator
from .compressors.base import Compressor
from .errors import (ConfigTypeError, HookAlreadyRegisteredError, InvalidConfigError, StateMismatchError,
                     UnsupportedGradientError)
from .optim import guard, unwrap
from .options import ReducerOptions
from .reducer import Segment
from .stats import SPARSE_ALLREDUCE, BucketStats, StepStats

logger = logging.getLogger(__name__)


class GradSparseState(SparseAdapter):
    """State of the sparse DDP hook; picklable without its process group.

    Args:
        compressor: a ``TopK``, ``Threshold``, ``PerSignTopK``, ``GradientDropping`` or ``DGC`` instance.
        process_group: group to reduce over (None: the default group).
        model: the module whose parameters are reduced (the DDP-wrapped module or
            the DDP model); used to key state by parameter name. Without it,
            parameters are named ``param{i}`` in the order the hook first sees them.
        start_iter, steps_per_epoch, log_every, history_size: see
            :class:`~gradsparse.adapter.SparseAdapter` (``totals`` sums every step).
        options, **knobs: the reducer's :class:`~gradsparse.options.ReducerOptions`
            (``granularity``, ``min_compress_numel``, ``value_dtype``, ``nonfinite``,
            ``op``, ``verify_every``), as an object or as keywords.
        hierarchy: None (flat: every rank exchanges with every other), or ``"auto"`` /
            ranks per node / a :class:`gradsparse.hierarchical.Hierarchy`: dense inside each
            node, sparse between nodes, chosen per bucket by cost (see
            :mod:`gradsparse.hierarchical`; reduces over the default group).
        grad_scaler: the ``torch.amp.GradScaler`` scaling this model's loss, if any:
            residuals and momentum are then kept in one scale (rescaled when the
            scaler's scale changes). Not pickled; pass it again after unpickling.

    ``hook_calls`` counts the buckets :func:`sparse_hook` was called for (not checkpointed);
    :mod:`gradsparse.watchdog` warns when optimizer steps happen and it stays 0.

    Example::

        state = GradSparseState(TopK(0.01), model=net)
        ddp_model.register_comm_hook(state, sparse_hook)
        loss.backward(); print(state.last_stats)
    """

    __slots__ = [  # beside SparseAdapter's
        # rarely tuned
        "process_group",
        "grad_scaler",
        # internal
        "iter",
        "_names",
        "_numels",
        "_segments",
        "_layouts",
        "_predicted",
        "_lock",
        "_pending",
        "_closing",
        "_current",
        "_bound",
        "_usage",
        "_watch",
        "_error",
        "_callback_step",
        "_bound_ids",
        "_sealed",
        # stats
        "totals",
        "hook_calls",
        "__weakref__",  # gradsparse.watchdog keeps states by weak reference
    ]

    def __init__(
        self,
        compressor: Compressor,
        process_group: dist.ProcessGroup | None = None,
        *,
        model: torch.nn.Module | None = None,
        start_iter: int = 1,
        steps_per_epoch: int | None = None,
        log_every: int = 100,
        history_size: int = 10_000,
        grad_scaler: "torch.amp.GradScaler | None" = None,
        hierarchy=None,
        options: ReducerOptions | None = None,
        **knobs,
    ):
        instance(compressor, "compressor", Compressor, "TopK(0.01)")
        instance(grad_scaler, "grad_scaler", torch.amp.GradScaler, 'torch.amp.GradScaler("cuda")', allow_none=True)
        given_group = process_group
        model = None if model is None else _uncompiled(model)
        self.process_group = process_group = _group_of(model, process_group)
        super().__init__(compressor, TorchDistCommunicator(process_group), start_iter=start_iter,
                         steps_per_epoch=steps_per_epoch, log_every=log_every, history_size=history_size,
                         options=options, **knobs)
        if hierarchy is not None:  # the same surface, over node and cross-node groups
            if process_group not in (None, dist.group.WORLD):
                source = ("process_group=" if given_group is not None else
                          "the DDP model's own group (DDP(..., process_group=...))")
                raise InvalidConfigError(f"hierarchy= reduces over the default (world) group, but this state reduces "
                                         f"over a subgroup, {source}: build DDP without process_group= and leave "
                                         f"process_group unset, or use hierarchy=None")
            self.reducer = hierarchical.create(compressor, hierarchy, self.reducer.options)
        self.reducer.defer_error = self._defer
        self._usage: _UsageTracker | None = None
        self._watch: _AccumulationWatch | None = None
        self._error: Exception | None = None
        self._callback_step: int | None = None  # the step whose end-of-backward callback is queued
        self.grad_scaler = grad_scaler
        self.iter = 0
        self._names: dict[int, str] = {}
        self._numels: dict[str, int] = {}
        # the memory layout of each key's state where it is not row-major (a channels_last conv's gradient sits in
        # DDP's bucket in memory order): name -> (shape, strides); _predicted: what DDP will use, from the model
        self._layouts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._predicted: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._bound = False
        self._bound_ids: frozenset[int] | None = None
        self._sealed = False
        if model is not None:
            self.bind(model)
        self._segments: dict[tuple, list[Segment]] = {}
        self._lock = threading.Lock()
        self._pending = 0
        self._closing = False
        self._current = StepStats(step=0)
        self.totals = StepStats(step=0)
        self.hook_calls = 0
        watchdog.watch(self)  # warns if optimizer steps happen and this state's hook never runs

    # ------------------------------------------------------------------ setup
    def bind(self, model: torch.nn.Module) -> None:
        """Key state by the parameter names of ``model`` (DDP or plain module).

        Binding again to the same model is allowed; another model raises
        :class:`InvalidConfigError` (residuals and momentum belong to one model).
        """
        instance(model, "model", torch.nn.Module, "the module DDP wraps")
        model = _uncompiled(model)
        _refuse_fsdp(model)
        if getattr(model, "_use_python_reducer", False):
            raise InvalidConfigError(_PYTHON_REDUCER)
        module = model.module if isinstance(model, DistributedDataParallel) else model
        ids = frozenset(id(p) for p in module.parameters())
        if self._bound_ids is not None and ids != self._bound_ids:
            raise InvalidConfigError("this GradSparseState already serves another model; create one per DDP model "
                                     + _REWRAPPED)
        _check_sparse_gradients(module, self.compressor)
        self._names = {id(p): name for name, p in module.named_parameters()}
        self._numels = {name: p.numel() for name, p in module.named_parameters()}
        self._predicted = {name: (tuple(p.shape), _bucket_strides(p)) for name, p in module.named_parameters()}
        self._bound = True
        self._bound_ids = ids
        tracks = isinstance(model, DistributedDataParallel) and (model.find_unused_parameters or model.static_graph)
        if tracks and self._usage is None:  # binding the same model again keeps its tracker (and hooks)
            self._usage = _UsageTracker(module)
        if isinstance(model, DistributedDataParallel) and self._watch is None:
            self._watch = _AccumulationWatch(module)

    @property
    def step(self) -> int:
        """Iterations (optimizer steps) the hook has reduced: ``iter``."""
        return self.iter

    def _key(self, param: torch.Tensor) -> str:
        name = self._names.get(id(param))
        if name is None:
            if self._bound and self._bound_ids is None:
                raise StateMismatchError("this GradSparseState was unpickled: its memory is keyed by the parameter "
                                         "names of the model it was bound to, which the pickle does not carry. Call "
                                         "state.bind(model) with the DDP model before its first backward")
            if self._bound:
                raise StateMismatchError("the DDP bucket holds a parameter that is not in the bound model: is this "
                                         "GradSparseState shared by two DDP models? Create one per DDP model "
                                         + _REWRAPPED)
            if self._sealed:
                raise StateMismatchError(
                    "the DDP bucket holds a parameter this GradSparseState did not see in its first step: it is "
                    "likely shared by two DDP models (each would also count every step twice). Create one "
                    "GradSparseState per DDP model, e.g. GradSparseState(compressor, model=model)")
            name = f"param{len(self._names)}"
            self._names[id(param)] = name
        return name

    def segments(self, bucket: dist.GradBucket) -> list[Segment]:
        """The (name, offset, numel) of each parameter in a DDP bucket that has elements (one of zero elements has
        nothing to reduce, and its gradient view has no place in the bucket)."""
        buffer = bucket.buffer()
        params = _with_elements(bucket)
        # a parameter's strides are part of it: a memory format changed after DDP(...) is looked at again
        signature = (bucket.index(), buffer.numel(), tuple((id(p), p.stride()) for p in params))
        cached = self._segments.get(signature)
        if cached is None:
            base = buffer.data_ptr()
            size = buffer.element_size()
            grads = [g for g in bucket.gradients() if g.numel()]  # the same order as the parameters
            cached = [Segment(self._key(p), (g.data_ptr() - base) // size, g.numel())
                      for p, g in zip(params, grads, strict=True)]
            for segment, p in zip(cached, params, strict=True):  # bucket.gradients() are row-major views
                shape, strides = tuple(p.shape), _bucket_strides(p)
                seen = _observed_strides(p, buffer[segment.offset:segment.offset + segment.numel])
                if seen is not None and not _same_layout(shape, seen, strides):
                    raise InvalidConfigError(
                        f"the memory format of {segment.key} changed after DDP(...) was built: DDP's bucket holds its "
                        f"gradient with strides {seen}, the parameter has strides {tuple(p.stride())} (DDP warns "
                        "'Grad strides do not match bucket view strides'; its own first step then averaged wrongly "
                        "in our tests, and gradsparse's memory would change order when DDP rebuilds its buckets): "
                        "call model.to(memory_format=...) before DDP(model, ...)")
                self._note_layout(segment.key, shape, strides, buffer)
            self._segments[signature] = cached
        return cached

    def _note_layout(self, key: str, shape: tuple[int, ...], strides: tuple[int, ...], buffer: torch.Tensor) -> None:
        """Record the layout of ``key``'s gradient in the bucket (so its memory's). Memory held in another layout
        (a checkpoint of the other memory format loaded into a state made without ``model=``, which cannot know
        the layout before the first bucket) is re-laid out in place; a hierarchical reducer's pieces are refused,
        on every rank alike: the ranks first sum how many pieces of ``key`` each holds (one small allreduce, on
        the bucket's device; every rank meets the same new layout at the same bucket)."""
        had = self._layouts.get(key, (shape, _row_major(shape)))
        if not _same_layout(shape, had[1], strides):
            held = [k for k in _memory_keys(self.reducer) if k == key or k.startswith(key + "@")]
            split = isinstance(self.reducer, hierarchical.HierarchicalReducer)
            pieces = len(held)
            if split:
                count = torch.tensor([pieces], dtype=torch.int64, device=buffer.device)
                pieces = int(self.reducer.collective(lambda: self.communicator.allreduce_sum(count).wait(), buffer,
                                                     self.iter)[0])
            if pieces and (split or held != [key]):
                raise StateMismatchError(
                    f"the gradient of {key} lies in DDP's bucket with strides {strides}, its gradsparse memory was "
                    f"laid out with strides {had[1]} (a checkpoint of a model of another memory format, e.g. "
                    "channels_last), and a hierarchical reducer's memory is split across the node's ranks: convert "
                    "the model to the checkpoint's memory format before wrapping it in DDP, then register the state "
                    "and load the checkpoint")
            if held:
                for t in self.reducer.memory.state[key].values():  # settles deferred updates first
                    t.copy_(_permute(t.clone(), shape, had[1], strides))
                logger.info("gradsparse: the memory of %s re-laid out for DDP's bucket (strides %s, were %s)", key,
                            strides, had[1])
        if _same_layout(shape, strides, _row_major(shape)):
            self._layouts.pop(key, None)
        else:
            self._layouts[key] = (shape, strides)

    def _used_segments(self, bucket: dist.GradBucket, segments: list[Segment], step: int) -> list[Segment]:
        """The segments of parameters some rank used this step (DDP with find_unused_parameters/static_graph).

        DDP leaves the gradient of a parameter no rank used untouched: whatever the hook
        sent for it would never reach it. Such parameters are left out of the reduction
        (nothing compensated, selected or removed from their memory); one small
        allreduce of the usage per bucket tells every rank the same.
        """
        used = self._usage.used
        mask = torch.tensor([int(id(p) in used) for p in _with_elements(bucket)], dtype=torch.int32,
                            device=bucket.buffer().device)
        counts = self.reducer.collective(lambda: self.communicator.allreduce_sum(mask).wait(), bucket.buffer(),
                                         step).tolist()
        return [s for s, c in zip(segments, counts, strict=True) if c]

    def _begin_bucket(self, step: int, last: bool) -> None:
        """Per-bucket bookkeeping before the reduction: stats, warnings, the deferred-error callback."""
        self._issue(last)
        if self.options.nonfinite == "raise" and self._callback_step != step:
            # once per step; a step whose backward failed before its callback ran leaves nothing behind
            self._error = None
            self._callback_step = step if _queue_after_backward(self._raise_deferred) else None
        self._warn_epoch_once(step)

    def _defer(self, error: Exception) -> None:
        """Keep a NonFiniteGradientError for the end of backward (raised there), or raise it now."""
        if self._callback_step is None:
            raise error
        self._error = self._error or error

    def _raise_deferred(self) -> None:
        self._callback_step = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _end_step(self) -> None:
        self._sealed = True  # every parameter of the model has been in a bucket by now
        self.iter += 1
        if self.iter == self.start_iter:
            logger.info("gradsparse: dense warm-up done, compressing from iteration %d", self.iter)
        if self._usage is not None:
            self._usage.next_step()

    # ------------------------------------------------------------------ stats
    def _issue(self, last: bool) -> None:
        """Count a bucket in flight; the step closes when its last bucket's stats arrive."""
        with self._lock:
            self._pending += 1
            self._closing = self._closing or last

    def _record(self, step: int, stats: BucketStats) -> None:
        with self._lock:
            self._current.add(stats)
            self.totals.add(stats)
            self._pending -= 1
            if self._pending or not self._closing:
                return
            done, self._current, self._closing = self._current, StepStats(step=step + 1), False
        self.totals.step = done.step
        self._publish(done)

    # ------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Per-rank state: plain tensors and numbers (``torch.load(weights_only=True)`` loads it).

        Each parameter's memory is flat, in the order of the parameter's gradient in DDP's bucket:
        its memory order (a ``channels_last`` convolution's is not its logical order). ``"layouts"``
        names the strides of every key whose order is not row-major, so :meth:`load_state_dict` can
        lay the memory out for a model of another memory format.
        """
        return {**super().state_dict(),
                "layouts": {k: {"shape": list(shape), "strides": list(strides)}
                            for k, (shape, strides) in sorted(self._layouts.items())}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict` output of the same rank of a job of the same world size.

        Raises :class:`StateMismatchError` (and changes nothing) when the world size,
        rank or compressor differ, or when, with a bound model, the checkpoint holds
        state for a parameter the model lacks or of another size. Parameters of the
        model that the checkpoint has no state for start from zero state (e.g. a
        tensor sent whole, or a newly added layer).
        """
        check_state_dict(state_dict)
        state_dict = upgrade_checkpoint(state_dict)
        self._check_checkpoint(state_dict, self._numels if self._bound else None)
        state_dict, layouts = self._relayout(state_dict)
        self._restore(state_dict)
        self._layouts = layouts
        self.iter = int(state_dict["step"])
        self._current = StepStats(step=self.iter)
        self._pending, self._closing = 0, False

    def _relayout(self, state_dict: dict) -> tuple[dict, dict]:
        """The checkpoint's memory laid out as this model's gradients lie in DDP's buckets, and those layouts.

        A checkpoint without ``"layouts"`` (written before they were recorded) is taken as laid out like
        this model. Where the layouts differ (a ``channels_last`` run's checkpoint loaded into a contiguous
        model, or the reverse) each buffer is permuted through its logical order; a hierarchical
        checkpoint (memory split into pieces of the memory order across the node's ranks) is refused.
        """
        saved = state_dict.get("layouts")
        memory = state_dict["memory"]["state"]
        if saved is None:
            return state_dict, {k: v for k, v in self._layouts.items() if k in memory}
        saved = {k: (tuple(v["shape"]), tuple(v["strides"])) for k, v in saved.items()}
        if not self._bound:  # DDP's layout is known at the first bucket: taken as the checkpoint's, checked there
            return state_dict, saved
        target = {**{k: v for k, v in self._predicted.items() if not _same_layout(v[0], v[1], _row_major(v[0]))},
                  **self._layouts}
        hier = state_dict.get("hierarchical")
        names = set(memory) | {k.split("@")[0] for k in ((hier or {}).get("memory") or {}).get("state", {})}
        if hier is not None:  # refused below on every rank alike, whichever pieces of a parameter this one holds
            names |= set(saved) | set(target)
        moved = {}
        for name in sorted(names):
            shape = (saved.get(name) or target.get(name) or self._predicted[name])[0]
            src = saved[name][1] if name in saved else _row_major(shape)
            dst = target[name][1] if name in target else _row_major(shape)
            if not _same_layout(shape, src, dst):
                moved[name] = (shape, src, dst)
        if not moved:
            return state_dict, {k: v for k, v in target.items() if k in names}
        if hier is not None:
            name, (shape, src, dst) = next(iter(sorted(moved.items())))
            raise StateMismatchError(
                f"checkpoint memory of {name} is laid out with strides {src}, this model's gradient with strides "
                f"{dst} (another memory format, e.g. channels_last): a hierarchical checkpoint's pieces cannot be "
                "re-laid out; convert the model to the checkpoint's memory format "
                "(model.to(memory_format=...)) before wrapping it in DDP")
        state = {k: ({b: _permute(t, *moved[k]) for b, t in slot.items()} if k in moved else slot)
                 for k, slot in memory.items()}
        out = {**state_dict, "memory": {**state_dict["memory"], "state": state}}
        logger.info("gradsparse: checkpoint memory of %d parameters re-laid out for this model's memory format "
                    "(%s)", len(moved), ", ".join(sorted(moved)[:5]))
        return out, {k: v for k, v in target.items() if k in names}

    def __getstate__(self):
        # parameter identities (_bound_ids, _sealed) mean nothing in another process
        return {slot: getattr(self, slot) for slot in all_slots(type(self))
                if slot not in ("process_group", "_lock", "grad_scaler", "_usage", "_watch", "_error", "_bound_ids",
                                "_sealed", "__weakref__")}

    def __setstate__(self, state):
        for slot, value in state.items():
            setattr(self, slot, value)
        self.process_group = None
        self.grad_scaler = None
        self._usage = None  # tensor hooks belong to the original model's parameters: bind() again
        self._watch = None
        self._error = None
        self._lock = threading.Lock()
        self.reducer.defer_error = self._defer
        self._bound_ids = None
        self._sealed = False
        self._segments = {}  # keyed by parameter identities of the old process
        # the names were keyed by the old parameters' identities, which a new parameter may happen to reuse: a
        # bound state is bound again (bind(); until then the hook refuses, saying so); an unbound one names the
        # parameters again in the order the hook meets them: param0, param1, ...
        self._names = {}
        watchdog.watch(self)

    def __repr__(self) -> str:
        world = self.communicator.world_size if dist.is_available() and dist.is_initialized() else None
        return f"GradSparseState(compressor={self.compressor!r}, step={self.iter}, {self._stats_repr()}, " \
               f"world_size={world})"


def _memory_keys(reducer) -> list[str]:
    """The keys the reducer holds memory for (without settling deferred updates); pieces are ``name@start:end``."""
    memories = [reducer.flat.memory, reducer.inner.memory] if isinstance(reducer, hierarchical.HierarchicalReducer) \
        else [reducer.memory]
    return [k for m in memories for k in m._state]


def _row_major(shape) -> tuple[int, ...]:
    """The strides of a contiguous (row-major) tensor of ``shape``."""
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= max(size, 1)
    return tuple(reversed(strides))


def _same_layout(shape, a, b) -> bool:
    """Whether strides ``a`` and ``b`` place every element of ``shape`` at the same offset (size-1 dims aside)."""
    return all(x == y for n, x, y in zip(shape, a, b) if n > 1)


def _bucket_strides(p: torch.Tensor) -> tuple[int, ...]:
    """The strides of ``p``'s gradient view in DDP's bucket: ``p``'s own when it is dense and non-overlapping (as
    torch's Reducer does, anticipating AccumulateGrad), else row-major."""
    dims = sorted((d for d in range(p.dim()) if p.shape[d] > 1), key=lambda d: p.stride(d))
    expected = 1
    for d in dims:
        if p.stride(d) != expected:
            return _row_major(tuple(p.shape))
        expected *= p.shape[d]
    return tuple(p.stride())


def _observed_strides(p: torch.Tensor, seen: torch.Tensor) -> tuple[int, ...] | None:
    """The strides of ``p``'s gradient in DDP's bucket, whose flat elements ``seen`` are, read from the values;
    None when they cannot tell.

    DDP lays a bucket out with the strides its parameters had when the bucket was built (at construction,
    and at its one rebuild after the first step), which Python cannot read: they differ from ``p``'s now
    when the memory format changed after ``DDP(...)``. Where ``p`` could be laid out two ways (4-D and 5-D
    tensors: row-major or channels_last), up to 256 elements of the local gradient in ``p.grad`` are looked
    up in ``seen`` at their offset under each. ``gradient_as_bucket_view``: ``p.grad``'s own strides.
    """
    grad = p.grad
    if p.dim() not in (4, 5) or grad is None or grad.shape != p.shape or grad.layout != torch.strided:
        return None
    if grad.untyped_storage().data_ptr() == seen.untyped_storage().data_ptr():  # gradient_as_bucket_view
        return tuple(grad.stride())
    fmt = torch.channels_last if p.dim() == 4 else torch.channels_last_3d
    orders = {_row_major(tuple(p.shape)), tuple(torch.empty(p.shape, memory_format=fmt, device="meta").stride())}
    n = grad.numel()
    m = min(n, 256)
    lin = torch.arange(m, device=grad.device) * (n - 1) // max(m - 1, 1)  # spread over the tensor
    at = torch.stack(torch.unravel_index(lin, p.shape), dim=1)  # logical multi-indices
    values = grad.detach()[tuple(at.t())]
    matching = [o for o in orders if torch.equal(seen[(at * torch.tensor(o, device=at.device)).sum(1)], values)]
    return matching[0] if len(matching) == 1 else None


def _permute(flat: torch.Tensor, shape, src, dst) -> torch.Tensor:
    """``flat`` (the elements of a ``shape`` tensor in the memory order of strides ``src``) in that of ``dst``."""
    out = torch.empty_strided(shape, dst, dtype=flat.dtype, device=flat.device)
    out.copy_(flat.contiguous().as_strided(shape, src))
    return out.as_strided((flat.numel(),), (1,))


_REWRAPPED = ("(a model wrapped again after layers were added: register a new state on the new DDP model and "
               "new_state.load_state_dict(old_state.state_dict()); the new layers start from zero state)")

_PYTHON_REDUCER = (
    "this DDP model was built while torch._dynamo.config.optimize_ddp was 'python_reducer': DDP then calls "
    "communication hooks once per parameter with (grad, param) and discards what they return, so gradsparse's hook "
    "cannot reduce anything there. Build DDP with the default optimize_ddp ('ddp_optimizer'); torch.compile("
    "ddp_model) works with the hook then (docs/ddp.md, 'torch.compile')")


def sparse_hook(state: "GradSparseState", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: sparse allgather of each bucket (dense for the first iterations).

    Sparse gradients (``nn.Embedding(sparse=True)``) already are index/value pairs:
    their bucket is averaged by a sparse allreduce, as DDP does without a hook.

    Example::

        ddp_model.register_comm_hook(GradSparseState(TopK(0.01), model=net), sparse_hook)
    """
    if not isinstance(bucket, dist.GradBucket):  # DDP's python reducer passes (grad, param) and drops the result
        raise InvalidConfigError(_PYTHON_REDUCER)
    state.hook_calls += 1
    step = state.iter
    last = bucket.is_last()
    if state._watch is not None:  # before any bookkeeping: a refusal leaves the state as it was
        state._watch.check(bucket, state.compressor, last)
    state._begin_bucket(step, last)
    try:
        if bucket.buffer().is_sparse:
            return _sparse_allreduce(state, bucket.buffer(), step)
        segments = state.segments(bucket)
        if state._usage is not None:
            segments = state._used_segments(bucket, segments, step)
        return state.reducer.reduce(
            bucket.buffer(), segments, step, state.current_epoch(),
            select_all=state.dense_iteration(step),
            on_stats=lambda s: state._record(step, s),
            loss_scale=_loss_scale(state.grad_scaler),
        )
    finally:
        if last:
            state._end_step()


def _with_elements(bucket: dist.GradBucket) -> list[torch.Tensor]:
    """The bucket's parameters that have elements, in the bucket's order (a gradient view has its parameter's
    numel)."""
    return [p for p in bucket.parameters() if p.numel()]


def _sparse_allreduce(state: "GradSparseState", grad: torch.Tensor, step: int) -> torch.futures.Future:
    """Average a sparse gradient bucket as DDP does (divide, then a sparse allreduce); no memory involved."""
    if not state.compressor.supports_sparse_gradients:
        raise UnsupportedGradientError(_SPARSE_REFUSAL.format(state.compressor))
    world = state.communicator.world_size
    grad.div_(world)
    nbytes = grad._indices().numel() * 8 + grad._values().numel() * grad.element_size()
    fut = dist.all_reduce(grad, group=state.process_group, async_op=True).get_future()

    def finish(done: torch.futures.Future) -> torch.Tensor:
        state._record(step, BucketStats(numel=grad.numel(), selected=grad._values().numel(), whole=0, bytes_sent=nbytes,
                                        bytes_received=nbytes * world, transport=SPARSE_ALLREDUCE, compress_s=0.0))
        return done.value()[0]

    return fut.then(finish)


_SPARSE_REFUSAL = ("{} keeps dense momentum per parameter (momentum correction), which sparse gradients "
                   "(nn.Embedding/EmbeddingBag with sparse=True) cannot carry: their rows would get no momentum. "
                   "Use sparse=False (the embedding's gradient is then compressed like any other), or DGC(momentum=0) "
                   "or TopK, which exchange sparse gradients as they are.")


def _check_sparse_gradients(module: torch.nn.Module, compressor: Compressor) -> None:
    """Refuse a model with sparse-gradient modules when the compressor cannot handle them."""
    sparse = [name for name, m in module.named_modules()
              if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.sparse]
    if sparse and not compressor.supports_sparse_gradients:
        raise UnsupportedGradientError(_SPARSE_REFUSAL.format(compressor) + f" Sparse modules: {sparse[:5]}")


def _group_of(model: torch.nn.Module | None, process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group to reduce over: the DDP model's own, unless another one is given (then they must agree)."""
    if isinstance(process_group, int) and process_group == dist.GroupMember.NON_GROUP_MEMBER:
        raise InvalidConfigError("process_group is a group this rank is not in (torch.distributed.new_group returns "
                                 "GroupMember.NON_GROUP_MEMBER outside it): pass this rank's own process group, the "
                                 "one its DDP model reduces over, or leave process_group=None")
    instance(process_group, "process_group", dist.ProcessGroup, "torch.distributed.new_group([0, 1])", allow_none=True)
    if not isinstance(model, DistributedDataParallel):
        return process_group
    if process_group is None:
        return model.process_group
    if process_group is not model.process_group:
        raise InvalidConfigError("process_group differs from the DDP model's own process group: the hook must reduce "
                                 "over the group DDP replicates the model on; leave process_group=None to use it")
    return process_group


def _queue_after_backward(callback) -> bool:
    """Run ``callback`` when the current backward pass ends, after DDP's own end-of-backward work.

    DDP queues its finalisation after the hook of its last bucket returns; a callback
    queued from a hook runs before it, so ours queues ``callback`` again from there.
    Returns False outside a backward pass.
    """
    engine = torch.autograd.Variable._execution_engine
    try:
        engine.queue_callback(lambda: engine.queue_callback(callback))
    except RuntimeError:
        return False
    return True


class _UsageTracker:
    """Which parameters received a gradient since the last synchronised step (tensor hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.used: set[int] = set()
        self._params = list(module.parameters())
        self._hooked: set[int] = set()
        self.next_step()

    def _mark(self, pid: int):
        def mark(grad):
            self.used.add(pid)
        return mark

    def next_step(self) -> None:
        """Forget this step's usage; hook parameters that require a gradient again (unfrozen)."""
        self.used = set()
        for p in self._params:
            if p.requires_grad and id(p) not in self._hooked:
                p.register_hook(self._mark(id(p)))
                self._hooked.add(id(p))


_ACCUMULATED = (
    "this synchronised backward pass adds its gradients to the averaged gradients the hook delivered in the previous "
    "one (no zero_grad() between, and no no_sync()): the hook would compress the already averaged gradient again{}. "
    "Run every backward of an optimizer step but the last under `with model.no_sync():` (or backpropagate the sum "
    "of the losses once); in a GAN, backpropagate the generator's loss through the discriminator under "
    "`with discriminator.no_sync():` (its gradients are discarded anyway) (docs/ddp.md, 'Several backward passes "
    "per step')")


class _AccumulationWatch:
    """Tells a synchronised backward pass that accumulates onto the gradients the hook delivered last time.

    DDP then hands the hook ``delivered average + this rank's new gradient``: DGC would put the average
    through its momentum a second time. A tensor hook on each parameter looks at ``p.grad`` before the new
    gradient is added: if it is still the tensor DDP wrote the hook's result into, unmodified since (its
    version counter; zero_grad, GradScaler.unscale_ and clipping all change it, set_to_none drops it), the
    parameter is marked. ``p.grad`` then holds the average, the same on every rank, so every rank decides alike.
    """

    def __init__(self, module: torch.nn.Module):
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._delivered: dict[int, tuple] = {}
        self.marked: set[int] = set()
        self._warned = False
        for p in self._params:
            p.register_hook(self._look(weakref.ref(p)))

    def _look(self, ref):
        def look(grad):
            p = ref()
            if p is None:
                return
            old, seen = p.grad, self._delivered.get(id(p))
            if old is not None and seen is not None and seen[0]() is old and seen[1] == old._version:
                self.marked.add(id(p))
            else:
                self.marked.discard(id(p))
        return look

    def _record(self) -> None:
        """After DDP wrote this backward's results into the gradients: remember each gradient tensor and version."""
        self.marked = set()
        self._delivered = {id(p): (weakref.ref(p.grad), p.grad._version) for p in self._params if p.grad is not None}

    def check(self, bucket: dist.GradBucket, compressor: Compressor, last: bool) -> None:
        """Refuse (DGC with momentum correction) or warn once (the rest) if this bucket's gradients accumulate."""
        if self.marked and any(id(p) in self.marked for p in bucket.parameters()):
            self.marked = set()
            if getattr(compressor, "momentum_correction", False):
                raise InvalidConfigError(_ACCUMULATED.format(
                    f" and {compressor!r} would put it through its momentum a second time"))
            if not self._warned:
                self._warned = True
                logger.warning("gradsparse: %s", _ACCUMULATED.format(
                    " (nothing is lost: its residual keeps what is not sent, but a gradient you discard later, "
                    "such as the generator's loss through a discriminator, still reaches the parameters through it)"))
        if last:
            _queue_after_backward(self._record)


def _loss_scale(scaler) -> float | None:
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler.get_scale()


_FSDP = ("gradsparse's hook is a DistributedDataParallel communication hook; this model is sharded by FSDP "
         "({}), which reduce-scatters each rank's shard of the gradients and has no DDP bucket to compress: use "
         "DistributedDataParallel(net) with gradsparse.ddp.register(ddp_model, compressor, optimizer=opt), or FSDP "
         "without gradsparse (docs/ddp.md, 'Errors')")


def _refuse_fsdp(model) -> None:
    """Raise ConfigTypeError naming the fix for an FSDP model (``FullyShardedDataParallel`` or ``fully_shard``)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:  # never imported: no module can be an FSDP one
        return
    kinds = {getattr(fsdp, name, None): api for name, api in (("FullyShardedDataParallel", "FullyShardedDataParallel"),
                                                              ("FSDPModule", "fully_shard"))}
    kinds.pop(None, None)
    for module in model.modules() if isinstance(model, torch.nn.Module) else ():
        for kind, api in kinds.items():
            if isinstance(module, kind):
                raise ConfigTypeError(_FSDP.format(api))


def _uncompiled(model):
    """The module inside ``torch.compile(model)`` (an ``OptimizedModule`` keeps it in ``_orig_mod``), else ``model``.

    Registering on, or binding to, the compiled wrapper then acts on the DDP model itself: the same
    hook, and parameter names without the wrapper's ``_orig_mod.`` prefix (checkpoints load either way).
    """
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(model, torch.nn.Module) and isinstance(inner, torch.nn.Module) else model


def _has_comm_hook(model: DistributedDataParallel) -> bool:
    return bool(getattr(model, "_comm_hooks", None))


def check_optimizer(optimizer: torch.optim.Optimizer, compressor: Compressor) -> None:
    """Raise IncompatibleOptimizerError if ``optimizer`` cannot apply what ``compressor`` sends.

    Delegates to ``compressor.check_optimizer(optimizer)`` (checks once; to check
    before every step too, use :func:`gradsparse.optim.guard`).

    Example::

        gradsparse.ddp.check_optimizer(opt, gradsparse.DGC(0.001))
    """
    compressor.check_optimizer(optimizer)


_warned_unchecked = False


def _warn_unchecked(compressor: Compressor) -> None:
    """Log once per process that DGC's optimizer rule could not be checked."""
    global _warned_unchecked
    rule = compressor.optimizer_rule()
    if _warned_unchecked or rule is None:
        return
    _warned_unchecked = True
    logger.warning("gradsparse: %s; register() got no optimizer= and cannot check it: pass register(..., "
                   "optimizer=opt)", rule)


def register(
    model: DistributedDataParallel,
    compressor: Compressor,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    process_group: dist.ProcessGroup | None = None,
    **state_kwargs,
) -> GradSparseState:
    """Register the sparse hook on a DDP model in one line; returns its state.

    With ``optimizer=`` the optimizer is checked against the compressor now and
    before every ``optimizer.step()`` (:func:`gradsparse.optim.guard`); a DGC with
    momentum correction registered without it logs a warning once. A framework's
    wrapper (Accelerate's ``AcceleratedOptimizer``) is checked and guarded through the
    optimizer inside it (:func:`gradsparse.optim.unwrap`).

    Example::

        state = gradsparse.ddp.register(ddp_model, DGC(0.001), optimizer=opt)
    """
    model = _uncompiled(model)  # torch.compile(ddp_model): the hook belongs on the DDP model inside
    _refuse_fsdp(model)
    instance(model, "model", DistributedDataParallel, "DistributedDataParallel(net) (Accelerate's prepare() and "
             "Lightning wrap the model in DDP only when more than one process runs)")
    instance(compressor, "compressor", Compressor, "TopK(0.01)")
    optimizer = unwrap(optimizer)  # an AcceleratedOptimizer / LightningOptimizer: the optimizer inside
    instance(optimizer, "optimizer", torch.optim.Optimizer, "torch.optim.SGD(params, lr=0.1)", allow_none=True)
    if _has_comm_hook(model):
        raise HookAlreadyRegisteredError("this DDP model already has a communication hook; DDP allows only one")
    if optimizer is None:
        _warn_unchecked(compressor)
    else:
        compressor.check_optimizer(optimizer)  # before any side effect
    state = GradSparseState(compressor, process_group, model=model, **state_kwargs)
    try:
        model.register_comm_hook(state, sparse_hook)
    except RuntimeError as err:
        raise HookAlreadyRegisteredError(str(err)) from err
    if optimizer is not None:
        guard(optimizer, compressor)
    logger.info("gradsparse: registered %r on a DDP model of world size %d", compressor,
                state.communicator.world_size)
    return state


__all__ = ["GradSparseState", "check_optimizer", "register", "sparse_hook"]
