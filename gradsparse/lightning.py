"""PyTorch Lightning: gradsparse's DDP hook on CPU and GPU alike, every rank's state in Lightning's checkpoints.

``import gradsparse.lightning`` imports ``lightning`` (never imported by ``import gradsparse``).

Why a strategy: Lightning 2.6's ``DDPStrategy`` registers communication hooks only when
its root device is CUDA (``_register_ddp_hooks``), so ``DDPStrategy(ddp_comm_hook=...)`` on
CPU trains densely without a word. The strategy is what wraps the model in DDP, creates
the optimizers from ``configure_optimizers`` and moves checkpoints in and out, so a
``DDPStrategy`` subclass can do all three steps gradsparse needs in one object passed as
``strategy=``: register the hook right after ``setup`` (DDP model and optimizers both exist,
so :func:`gradsparse.ddp.register` checks every optimizer), gather every rank's state into
rank 0's checkpoint (``save_checkpoint`` runs on every rank), and give each rank its own
back on ``trainer.fit(ckpt_path=...)`` (``load_optimizer_state_dict`` runs after ``setup``).
A Callback would need a strategy beside it anyway and sees neither step as directly.

DGC and ``configure_optimizers``: DGC's momentum correction puts momentum into the
gradient, so ``configure_optimizers`` must return ``gradsparse.DGCSGD(self.parameters(), lr,
momentum=m, weight_decay=wd)`` with ``m`` = DGC's momentum (or ``torch.optim.SGD(momentum=0)``
without weight decay). Anything else raises ``IncompatibleOptimizerError`` in ``trainer.fit``
before the first step, and every ``optimizer.step()`` re-checks (a scheduler cycling
momentum raises: pass ``cycle_momentum=False``). The epoch is passed to the state each
batch, so ``Warmup(unit="epoch")`` follows ``trainer.current_epoch``; a GradScaler of
``precision="16-mixed"`` is passed as ``grad_scaler``. With ``accumulate_grad_batches``,
Lightning skips DDP's synchronisation on the other micro-batches (``no_sync``): the hook
runs once per optimizer step.

Example::

    import lightning as L
    from gradsparse.lightning import GradSparseStrategy

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=GradSparseStrategy(gradsparse.DGC(0.001)))
    trainer.fit(module)                       # module.configure_optimizers returns gradsparse.DGCSGD(...)
    trainer.strategy.state.last_stats         # bytes sent, density, ratio of the last step
"""

from __future__ import annotations

import logging

from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import gather_state_dicts, own_state_dict
from .compressors.base import Compressor
from .ddp import GradSparseState, register
from .errors import InvalidConfigError
from .optim import guard

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "gradsparse"
"""Key of every rank's gradsparse state in a Lightning checkpoint: ``{"world_size": W, "ranks": [...]}``."""

_REFUSED = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class GradSparseStrategy(DDPStrategy):
    """``DDPStrategy`` with gradsparse's hook registered on CPU and GPU, its state in every checkpoint.

    Args:
        compressor: ``TopK``, ``Threshold``, ``PerSignTopK``, ``GradientDropping`` or ``DGC``.
        state_kwargs: options of :class:`gradsparse.ddp.GradSparseState` (``start_iter``,
            ``min_compress_numel``, ``value_dtype``, ``nonfinite``, ...).
        **kwargs: ``DDPStrategy``'s own (``find_unused_parameters``, ``static_graph``,
            ``process_group_backend``, ``timeout``, ...); its ``ddp_comm_*`` hook arguments
            and ``model_averaging_period`` are refused.

    After ``setup``, ``state`` is the :class:`~gradsparse.ddp.GradSparseState` (statistics
    in ``state.last_stats``). Each ``fit`` starts a new state, as Lightning builds new
    optimizers; ``fit(ckpt_path=...)`` restores it.

    Example::

        strategy = GradSparseStrategy(gradsparse.DGC(0.001), state_kwargs={"min_compress_numel": 1024})
        L.Trainer(accelerator="cpu", devices=2, strategy=strategy).fit(module)
    """

    def __init__(self, compressor: Compressor, *, state_kwargs: dict | None = None, **kwargs):
        refused = sorted(set(kwargs) & set(_REFUSED))
        if refused:
            raise InvalidConfigError(f"GradSparseStrategy registers gradsparse's hook itself; {refused} cannot be "
                                     f"combined with it (DDP takes one communication hook)")
        super().__init__(**kwargs)
        self.compressor = compressor
        self.state_kwargs = dict(state_kwargs or {})
        self.state: GradSparseState | None = None

    def setup(self, trainer) -> None:
        """Lightning's setup (DDP wrapping, optimizers), then the hook on the DDP model."""
        super().setup(trainer)
        if isinstance(self.model, DistributedDataParallel):
            self.state = self._register(self.model)

    def _register(self, model: DistributedDataParallel) -> GradSparseState:
        """Check every optimizer, then register the hook (guarding the first optimizer) and guard the rest."""
        optimizers = list(self.optimizers)
        for optimizer in optimizers:
            self.compressor.check_optimizer(optimizer)
        kwargs = {"grad_scaler": getattr(self.precision_plugin, "scaler", None), **self.state_kwargs}
        state = register(model, self.compressor, optimizer=optimizers[0] if optimizers else None, **kwargs)
        for optimizer in optimizers[1:]:
            guard(optimizer, self.compressor)
        return state

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.state is not None:
            self.state.set_epoch(self.lightning_module.current_epoch)

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Gather every rank's state into rank 0's checkpoint (a collective: Lightning calls this on every rank)."""
        if self.state is not None and "optimizer_states" in checkpoint:  # not for weights-only checkpoints
            saved = gather_state_dicts(self.state.state_dict(), self.state.process_group)
            if saved is not None:
                checkpoint[CHECKPOINT_KEY] = saved
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        """Lightning's optimizer restore, then this rank's gradsparse state (residuals, momentum, step)."""
        super().load_optimizer_state_dict(checkpoint)
        if self.state is None:
            return
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            logger.warning("gradsparse: the checkpoint holds no gradsparse state (not written by GradSparseStrategy): "
                           "residuals and momentum start from zero")
            return
        self.state.load_state_dict(own_state_dict(saved, self.state.process_group, self.root_device))


__all__ = ["CHECKPOINT_KEY", "GradSparseStrategy"]
