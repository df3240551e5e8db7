"""Horovod: sparse gradients through an unmodified ``hvd.DistributedOptimizer``.

Horovod calls ``compression.compress(grad)``, allreduces what it returns, then
calls ``compression.decompress(reduced, ctx)`` and writes the result into
``p.grad``. Sums of index/value pairs from different ranks mean nothing, so
:class:`SparseCompression` does the real work around that contract:

1. ``compress(grad)`` finds the parameter whose ``.grad`` this is (by identity;
   hence the parameters it is bound to), runs the gradsparse pipeline
   (:class:`~gradsparse.reducer.SparseReducer`: compensate, select, pack) and
   starts a variable-length ``hvd.allgather_async`` of the payload named after the
   parameter. It returns a one-element marker tensor for Horovod to allreduce.
2. ``decompress(marker, ctx)`` waits for the allgather, unpacks every rank's pairs
   into the gradient (averaged), updates the residual/momentum kept under the
   parameter's name, and checks the marker: it reads exactly 1 after an average
   (``world_size`` after a sum), so an optimizer reducing with another op is caught.

Use :func:`DistributedOptimizer` (same signature as ``hvd.DistributedOptimizer``):
it binds the compression to the parameters and refuses what cannot work before
anything runs. Passing a :class:`SparseCompression` built with
``named_parameters=`` straight to ``hvd.DistributedOptimizer`` works too, for
``op=hvd.Average`` (see docs/horovod.md for what that path cannot check).

Several ranks per node: ``SparseCompression(..., hierarchy=Hierarchy(local_size=...))`` reduces
each gradient densely inside the node and sends only the node's compressed pieces between
nodes (:mod:`gradsparse.hierarchical`), over Horovod process sets
(:func:`hierarchy_groups`; needs ``hvd.init(process_sets="dynamic")``).

Example (under ``horovodrun -np 2 -H localhost:2 --gloo python train.py``)::

    import horovod.torch as hvd, gradsparse, gradsparse.horovod
    hvd.init()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = gradsparse.horovod.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(),
        compression=gradsparse.horovod.SparseCompression(gradsparse.DGC(0.001)))
"""

from __future__ import annotations

import copy
import hashlib
import logging

import torch

from . import hierarchical
from ._validate import instance
from .adapter import SparseAdapter, check_state_dict, upgrade_checkpoint
from .compressors.base import Compressor
from .ddp import _loss_scale
from .errors import ConfigTypeError, InvalidConfigError, StateMismatchError
from .optim import guard
from .options import ReducerOptions
from .reducer import Segment, SparseReducer
from .stats import BucketStats, StepStats

logger = logging.getLogger(__name__)


def _hvd():
    try:
        import horovod.torch as hvd
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("gradsparse.horovod needs Horovod built with PyTorch support; see docs/horovod.md") from err
    return hvd


class SparseCompression(SparseAdapter):
    """A Horovod ``compression=`` object that moves only index/value pairs.

    Args:
        compressor: a gradsparse ``TopK``, ``Threshold``, ``PerSignTopK``, ``GradientDropping`` or ``DGC``
            instance (one per optimizer).
        named_parameters: ``model.named_parameters()``; needed when passing this
            object to ``hvd.DistributedOptimizer`` directly (``DistributedOptimizer``
            of this module binds it itself). Checked to be the same on every rank.
        start_iter, steps_per_epoch, log_every, history_size: see
            :class:`~gradsparse.adapter.SparseAdapter`.
        process_set: Horovod process set (None: global).
        hierarchy: None (flat: every rank exchanges with every other), or ranks per node (a number,
            ``"auto"``: Horovod's ``local_size()``) / a :class:`~gradsparse.hierarchical.Hierarchy`:
            dense inside each node, only the node's compressed pieces between nodes (see
            :mod:`gradsparse.hierarchical`). Needs Horovod's dynamic process sets
            (``hvd.init(process_sets="dynamic")``) and the global process set; collective: every rank
            builds its ``SparseCompression`` in the same order.
        grad_scaler: the ``torch.amp.GradScaler`` scaling the loss (Horovod's AMP recipe), if any:
            residuals and momentum are then kept in one scale (rescaled when the scale changes)
            and thresholds compared with the unscaled gradient. Without it they mix scales.
        options, **knobs: the reducer's :class:`~gradsparse.options.ReducerOptions`
            (``min_compress_numel``, ``value_dtype``, ``nonfinite``, ``op``, ``verify_every``).
            Each parameter is its own bucket here. ``op`` (``"average"`` or ``"sum"``) must
            match the optimizer's op (checked every step); ``verify_every`` compares the
            ranks' descriptors on every this many ``compress()`` calls: one blocking 120-byte
            allgather each; every call by default, 0 never (see docs/reliability.md).

    Example::

        compression = gradsparse.horovod.SparseCompression(gradsparse.TopK(0.01))
    """

    def __init__(
        self,
        compressor: Compressor,
        *,
        named_parameters=None,
        start_iter: int = 1,
        steps_per_epoch: int | None = None,
        process_set=None,
        log_every: int = 100,
        history_size: int = 10_000,
        options: ReducerOptions | None = None,
        hierarchy=None,
        grad_scaler: "torch.amp.GradScaler | None" = None,
        **knobs,
    ):
        from .comm.horovod import HorovodCommunicator

        instance(grad_scaler, "grad_scaler", torch.amp.GradScaler, 'torch.amp.GradScaler("cuda")', allow_none=True)

        super().__init__(compressor, HorovodCommunicator(process_set), start_iter=start_iter,
                         steps_per_epoch=steps_per_epoch, log_every=log_every, history_size=history_size,
                         options=options, **knobs)
        if hierarchy is not None:  # the same surface, over node and column process sets
            if process_set is not None and process_set is not _hvd().global_process_set:
                raise InvalidConfigError("hierarchy= reduces over Horovod's global process set; leave process_set "
                                         "unset or use hierarchy=None")
            self.reducer = hierarchical.create(compressor, hierarchy, self.reducer.options, groups=hierarchy_groups)
        self.grad_scaler = grad_scaler
        #: compress() calls so far, per parameter name (the step each parameter is at)
        self.steps: dict[str, int] = {}
        self._params: dict[str, torch.Tensor] | None = None
        self._owner = None
        self._next: dict[str | None, str] = {}  # name compressed after each name, last time
        self._previous: str | None = None
        self._inflight: dict[str, int] = {}
        self._open: dict[int, StepStats] = {}
        if named_parameters is not None:
            self.bind(named_parameters)

    # ------------------------------------------------------------------ setup
    def bind(self, named_parameters, *, owner=None) -> None:
        """Key state by these ``(name, parameter)`` pairs; collective: every rank must call it.

        Raises ``StateMismatchError`` on every rank when the ranks' parameter sets
        (names, shapes, dtypes) differ, ``InvalidConfigError`` when this object is
        already used by another optimizer.
        """
        named = list(named_parameters)
        if any(not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor)) for x in named):
            raise InvalidConfigError("named_parameters must be (name, tensor) pairs, e.g. model.named_parameters()")
        params = dict(named)
        if len(params) != len(named):
            raise InvalidConfigError("parameter names in named_parameters must be unique")
        if self._owner is not None and owner is not None and owner is not self._owner:
            raise InvalidConfigError(
                "this SparseCompression already serves another optimizer: its residuals and momentum belong to "
                "that optimizer's parameters. Create one SparseCompression per optimizer.")
        if self._params is not None and {n: id(p) for n, p in self._params.items()} != \
                {n: id(p) for n, p in params.items()}:
            raise InvalidConfigError("this SparseCompression is already bound to other parameters; "
                                     "create one SparseCompression per optimizer")
        self._check_same_on_every_rank(params)
        self._params = params
        self._next, self._previous = {}, None
        if owner is not None:
            self._owner = owner

    def _check_same_on_every_rank(self, params: dict[str, torch.Tensor]) -> None:
        text = ";".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in sorted(params.items()))
        digest = hashlib.sha256(text.encode()).digest()
        mine = [len(params), *[int.from_bytes(digest[i:i + 7], "little") for i in range(0, 28, 7)]]
        with self.communicator.tagged("gradsparse.bind.parameters"):
            every = self.communicator.allgather_ints(mine, torch.device("cpu"))
        differ = [r for r, row in enumerate(every) if row != mine]
        if differ:
            counts = [row[0] for row in every]
            raise StateMismatchError(
                f"the ranks' parameter sets differ (names, shapes or dtypes): rank {self.communicator.rank} has "
                f"{len(params)} parameters and differs from rank(s) {differ}; parameter counts by rank: {counts}. "
                "Every rank must build the same model.")

    @property
    def step(self) -> int:
        """The furthest step any parameter has reached (``max(steps.values())``)."""
        return max(self.steps.values(), default=0)

    def param_steps(self) -> dict[str, int]:
        return dict(self.steps)

    def _reconfigure(self, op: str, process_set) -> None:
        """Reduce with ``op`` over ``process_set`` (what the optimizer uses); only before training starts."""
        from .comm.horovod import HorovodCommunicator

        if op == self.options.op and process_set is self.communicator.process_set:
            return
        if self.steps:
            raise InvalidConfigError("the reduction op or process set cannot change after training started")
        old = self.reducer
        if isinstance(old, hierarchical.HierarchicalReducer):
            if process_set is not self.communicator.process_set:
                raise InvalidConfigError("a SparseCompression with hierarchy= reduces over Horovod's global "
                                         "process set; leave the optimizer's process_set unset")
            self.reducer = hierarchical.HierarchicalReducer(
                self.compressor, old.groups, old.options.replace(op=op), transport=old.transport,
                topology=old.topology, kernel=old.kernel)
            return
        communicator = self.communicator
        if process_set is not communicator.process_set:
            communicator = HorovodCommunicator(process_set)
        self.reducer = SparseReducer(self.compressor, communicator, self.options.replace(op=op))

    # --------------------------------------------------- Horovod's contract
    def _name_of(self, tensor: torch.Tensor) -> str:
        """The bound parameter whose ``.grad`` is ``tensor``: O(1) when hooks fire in last step's order."""
        if self._params is None:
            raise InvalidConfigError(
                "SparseCompression does not know the parameters: pass named_parameters=model.named_parameters() "
                "to it, or use gradsparse.horovod.DistributedOptimizer, which binds it")
        name = self._next.get(self._previous)
        if name is None or self._params[name].grad is not tensor:
            name = next((n for n, p in self._params.items() if p.grad is tensor), None)
            if name is None:
                self._refuse(tensor)
        self._next[self._previous] = name
        self._previous = name
        return name

    def _refuse(self, tensor: torch.Tensor) -> None:
        if any(p is tensor for p in self._params.values()):
            raise InvalidConfigError("compress() received a parameter instead of its gradient: the optimizer was "
                                     "built with op=hvd.Adasum, which cannot combine index/value pairs; "
                                     "use op=hvd.Average")
        if any(p.grad is not None and p.grad.is_sparse for p in self._params.values()):
            raise InvalidConfigError("compress() received a densified sparse gradient: sparse_as_dense=True is "
                                     "refused with gradsparse (it would sparsify an already sparse gradient "
                                     "densely); leave sparse_as_dense=False or use dense embeddings")
        raise StateMismatchError("compress() received a tensor that is not the gradient of any parameter this "
                                 "SparseCompression is bound to: is it shared with another optimizer or model? "
                                 "Create one SparseCompression per optimizer")

    def compress(self, tensor: torch.Tensor):
        """Start the sparse reduction of one parameter's gradient; returns (marker, ctx)."""
        name = self._name_of(tensor)
        if name in self._inflight:
            raise InvalidConfigError(f"compress() was called for {name!r} again before its decompress(): this "
                                     "SparseCompression is shared by two optimizers; create one per optimizer")
        step = self.steps.get(name, 0)
        self._warn_epoch_once(step)
        grad = tensor if tensor.is_contiguous() else tensor.contiguous()
        flat = grad.view(-1)
        tag = f"gradsparse.{name}"
        with self._collectives.tagged(tag):
            fut = self.reducer.reduce(flat, [Segment(name, 0, flat.numel())], step, self.current_epoch(step),
                                      select_all=self.dense_iteration(step), on_stats=lambda s: self._record(step, s),
                                      loss_scale=_loss_scale(self.grad_scaler))
        self.steps[name] = step + 1
        self._inflight[name] = step
        return torch.ones(1, dtype=torch.float32, device=tensor.device), (name, tag, fut, grad)

    def decompress(self, tensor: torch.Tensor, ctx) -> torch.Tensor:
        """Finish the reduction started by :meth:`compress`; returns the averaged gradient.

        A sparse gradient (``nn.Embedding(sparse=True)``) never reached :meth:`compress`: Horovod reduced it with its
        own sparse allgather and hands it here with no context (``None``); it is returned as Horovod reduced it."""
        if ctx is None:
            return tensor
        name, tag, fut, grad = ctx
        try:
            if isinstance(self.reducer, hierarchical.HierarchicalReducer):
                self.reducer.complete(tag)  # completes what is in flight under the tag
            elif tag in self.communicator.in_flight():  # nothing is when the descriptors said to skip the step
                self.communicator.complete(tag)
            self._check_marker(tensor)
            out = fut.wait()
        finally:
            step = self._inflight.pop(name, None)
            if step is not None and step not in self._inflight.values():
                self._close(step)
        return out.view(grad.shape)

    @property
    def _collectives(self):
        """What names and completes this object's collectives: the communicator, or the hierarchical reducer
        (which names those of its node and column process sets after the same tag)."""
        return self.reducer if isinstance(self.reducer, hierarchical.HierarchicalReducer) else self.communicator

    def _check_marker(self, marker: torch.Tensor) -> None:
        world = self.communicator.world_size
        expected = 1.0 if self.options.op == "average" else float(world)
        got = float(marker.reshape(-1)[0])
        if abs(got - expected) > 1e-3 * expected:
            ops = {1.0: "an average", float(world): "a sum"}
            raise InvalidConfigError(
                f"the optimizer reduced with {ops.get(got, f'an op giving {got}')}, this compression expects "
                f"op={self.options.op!r}; pass op='sum' for hvd.Sum (or use gradsparse.horovod.DistributedOptimizer)")

    # ------------------------------------------------------------------ stats
    def _record(self, step: int, stats: BucketStats) -> None:
        self._open.setdefault(step, StepStats(step=step)).add(stats)

    def _close(self, step: int) -> None:
        done = self._open.pop(step, None)
        if done is not None:
            self._publish(done)

    # ------------------------------------------------------------ checkpoint
    def load_state_dict(self, state_dict: dict, *, check_world: bool = True) -> None:
        """Restore :meth:`state_dict` output of this rank (with ``check_world``: the same world size and rank).

        With bound parameters, state for a parameter the model lacks or of another
        size is refused; nothing changes on any error.
        """
        check_state_dict(state_dict)
        state_dict = upgrade_checkpoint(state_dict)
        numels = None if self._params is None else {n: p.numel() for n, p in self._params.items()}
        self._check_checkpoint(state_dict, numels, check_world=check_world)
        self._restore(state_dict)
        self.steps = {str(k): int(v) for k, v in state_dict["param_steps"].items()}

    def __repr__(self) -> str:
        try:
            world = self.communicator.world_size
        except ValueError:  # Horovod not initialised yet
            world = None
        return (f"SparseCompression(compressor={self.compressor!r}, op={self.options.op!r}, "
                f"step={self.step}, {self._stats_repr()}, world_size={world})")


_UNSET = object()

#: process sets gradsparse added, by their ranks (Horovod refuses a second set of the same ranks)
_PROCESS_SETS: dict[tuple[int, ...], object] = {}


def _process_set(hvd, ranks: tuple[int, ...]):
    """The Horovod process set of these ``ranks``: the global one, one gradsparse added before, or a new one
    (collective: every rank adds every set, in one order)."""
    if ranks == tuple(range(hvd.size())):
        return hvd.global_process_set
    known = _PROCESS_SETS.get(ranks)
    if known is not None and known.process_set_id is not None:
        return known
    try:
        added = hvd.add_process_set(list(ranks))
    except ValueError as err:
        if "DYNAMIC" in str(err):
            raise InvalidConfigError('hierarchy= adds Horovod process sets for the nodes and the columns: call '
                                     'hvd.init(process_sets="dynamic") (or set HOROVOD_DYNAMIC_PROCESS_SETS=1 '
                                     'before hvd.init())') from err
        raise InvalidConfigError(f"a Horovod process set of ranks {list(ranks)} exists already and was not added "
                                 "by gradsparse; remove it (hvd.remove_process_set) or use hierarchy=None") from err
    _PROCESS_SETS[ranks] = added
    return added


def hierarchy_groups(local_size: int | str = "auto") -> hierarchical.Groups:
    """The :class:`~gradsparse.hierarchical.Groups` of ``local_size`` ranks per node over Horovod process sets.

    Ranks ``r`` with the same ``r // local_size`` share a node (horovodrun numbers ranks host
    by host); ``"auto"`` takes Horovod's ``local_size()`` and checks that numbering. Collective:
    every rank calls it; every rank must give the same ``local_size`` (else
    ``StateMismatchError`` on every rank), which must divide the world size (else
    ``InvalidConfigError``). Process sets of the same ranks are reused.

    Example (after ``hvd.init(process_sets="dynamic")``)::

        groups = gradsparse.horovod.hierarchy_groups(2)
    """
    from .comm.horovod import HorovodCommunicator

    hvd = _hvd()
    world, rank = hvd.size(), hvd.rank()
    local = hierarchical.local_size_of(local_size, world, auto=hvd.local_size())
    hierarchical.agree_local_size(local, HorovodCommunicator())
    if local_size == "auto" and (hvd.local_rank(), hvd.cross_rank()) != (rank % local, rank // local):
        raise InvalidConfigError(f"Horovod placed rank {rank} as local rank {hvd.local_rank()} of node "
                                 f"{hvd.cross_rank()}, not host by host: pass Hierarchy(local_size=...) for ranks "
                                 "r sharing a node when r // local_size is equal")
    nodes = world // local
    node_sets = [_process_set(hvd, tuple(range(n * local, (n + 1) * local))) for n in range(nodes)]
    column_sets = [_process_set(hvd, tuple(range(l, world, local))) for l in range(local)]
    node, column = node_sets[rank // local], column_sets[rank % local]
    return hierarchical.Groups(HorovodCommunicator(), HorovodCommunicator(node), HorovodCommunicator(node),
                               HorovodCommunicator(column), nodes, local, rank // local, rank % local, ordered=False)


def DistributedOptimizer(optimizer, named_parameters=None, compression=_UNSET, backward_passes_per_step=1,
                         op=_UNSET, gradient_predivide_factor=1.0, num_groups=0, groups=None,
                         sparse_as_dense=False, process_set=_UNSET):
    """``hvd.DistributedOptimizer`` with the same signature, binding and checking a :class:`SparseCompression`.

    With any other ``compression`` it simply returns ``hvd.DistributedOptimizer(...)``.
    With a :class:`SparseCompression` it refuses ``op=hvd.Adasum`` (and ops other than
    Average / Sum), ``sparse_as_dense=True``, a compression already serving another
    optimizer, parameter sets that differ between ranks, and an optimizer the compressor
    refuses (``compressor.check_optimizer``: for DGC with momentum correction, one with its
    own momentum, Adam's moments or SGD weight decay); then binds the compression to the
    parameters by name and builds Horovod's optimizer unchanged, with a step pre-hook
    (:func:`gradsparse.optim.guard`) that repeats the optimizer check before every step.

    Example::

        opt = gradsparse.horovod.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
            compression=gradsparse.horovod.SparseCompression(gradsparse.TopK(0.01)))
    """
    hvd = _hvd()
    compression = hvd.Compression.none if compression is _UNSET else compression
    op = hvd.Average if op is _UNSET else op
    process_set = hvd.global_process_set if process_set is _UNSET else process_set
    if isinstance(compression, Compressor) or (isinstance(compression, type) and
                                               issubclass(compression, (Compressor, SparseCompression))):
        # Horovod would call compress() on it at the first step: an AttributeError, or a missing argument
        raise ConfigTypeError(f"compression must be a SparseCompression instance wrapping the compressor, such as "
                              f"compression=gradsparse.horovod.SparseCompression(gradsparse.DGC(0.001)), got "
                              f"{compression!r}" if not isinstance(compression, type) else
                              f"compression must be an instance such as gradsparse.horovod.SparseCompression("
                              f"gradsparse.DGC(0.001)), got the class {compression.__name__}")
    if isinstance(compression, SparseCompression):
        if op == hvd.Adasum:
            raise InvalidConfigError("op=hvd.Adasum cannot combine index/value pairs from different ranks; "
                                     "use op=hvd.Average (or hvd.Sum) with gradsparse")
        if op not in (hvd.Average, hvd.Sum):
            raise InvalidConfigError(f"gradsparse reduces with op=hvd.Average or hvd.Sum, got op={op!r}")
        if sparse_as_dense:
            raise InvalidConfigError("sparse_as_dense=True is refused with gradsparse: it densifies sparse "
                                     "gradients only for gradsparse to sparsify them again, and hands compress() a "
                                     "copy that is no parameter's gradient. Leave it False: sparse gradients then "
                                     "go through Horovod's own sparse allgather, uncompressed")
        if named_parameters is None:  # Horovod's own default names
            named_parameters = [(f"allreduce.noname.{i}.{j}", p) for i, group in enumerate(optimizer.param_groups)
                                for j, p in enumerate(group["params"])]
        named_parameters = list(named_parameters)
        compression.compressor.check_optimizer(optimizer)
        compression._reconfigure("average" if op == hvd.Average else "sum", process_set)
        compression.bind(named_parameters, owner=optimizer)
    distributed = hvd.DistributedOptimizer(optimizer, named_parameters=named_parameters, compression=compression,
                                           backward_passes_per_step=backward_passes_per_step, op=op,
                                           gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups,
                                           groups=groups, sparse_as_dense=sparse_as_dense, process_set=process_set)
    if isinstance(compression, SparseCompression):  # Horovod's optimizer is a new object sharing param_groups
        guard(distributed, compression.compressor)
    return distributed


# ---------------------------------------------------------------------------------------- elastic
def register_elastic() -> None:
    """Let ``hvd.elastic.TorchState(..., compression=compression)`` save, restore and sync the state.

    Per rank: ``commit()`` keeps a copy of this rank's residuals/momentum and steps,
    ``restore()`` puts that copy back. ``sync()`` (after a membership change)
    takes steps and epoch from rank 0; residuals are kept when the world size is
    unchanged and dropped (with a warning) when it changed, because per-rank
    residuals cannot be redistributed. Idempotent.

    Example::

        gradsparse.horovod.register_elastic()
        state = hvd.elastic.TorchState(model=model, optimizer=opt, compression=compression)
    """
    from horovod.torch.elastic import state as elastic_state

    registry = elastic_state.get_handler_registry()
    if any(cls is SparseCompression for cls, _ in registry):
        return
    handler = _elastic_handler_class(elastic_state.StateHandler)
    elastic_state.set_handler_registry([(SparseCompression, handler), *registry])


def _elastic_handler_class(base):
    class SparseCompressionHandler(base):
        """Horovod elastic state handler for a :class:`SparseCompression` (per-rank state)."""

        def __init__(self, compression: SparseCompression):
            super().__init__(compression)
            self.save()

        def save(self):
            self._saved = copy.deepcopy(self.value.state_dict())

        def restore(self):
            self.value.load_state_dict(copy.deepcopy(self._saved), check_world=False)

        def sync(self):
            # rank 0's counters as one int64 tensor (never a pickled object: peers are not trusted with
            # deserialisation); the parameter names are bound and checked to be equal on every rank
            comm, names = self.value.communicator, sorted(self.value._params or {})
            counters = [self.value.epoch] + [self.value.steps.get(n, 0) for n in names]
            with comm.tagged("gradsparse.elastic.sync"):
                counters = comm.broadcast_ints(counters, torch.device("cpu"), root=0)
            self.value.epoch = int(counters[0])
            self.value.steps = {n: int(c) for n, c in zip(names, counters[1:], strict=True) if c}
            if self._saved["world_size"] != self.value.communicator.world_size:
                logger.warning("gradsparse: world size changed from %d to %d; residuals and momentum reset",
                               self._saved["world_size"], self.value.communicator.world_size)
                self.value.reducer.reset_memory()
            self.save()

    return SparseCompressionHandler


__all__ = ["DistributedOptimizer", "SparseCompression", "hierarchy_groups", "register_elastic"]
