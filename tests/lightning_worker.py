"""Real Lightning Trainer runs on CPU with 2 processes, for tests/multiprocess/test_lightning.py.

``python -m tests.lightning_worker SCENARIO FOLDER``: Lightning starts rank 1 itself (it
re-runs this module with LOCAL_RANK=1). Every rank saves what each fit left behind to
FOLDER/<tag>-rank<r>.pt. Scenarios:

- ``train``: a DGC fit (and one whose optimizer DGC refuses), TopK(1.0) and plain Lightning
  DDP with gradient accumulation, DDPStrategy(ddp_comm_hook=sparse_hook) on CPU (dropped by
  Lightning: the watchdog must say so), and an uninterrupted DGC run checkpointing every epoch;
- ``resume``: new processes resume that run from its epoch-2 checkpoint.
"""

import logging
import os
import sys

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

import gradsparse
from gradsparse.lightning import GradSparseStrategy

from .logs import LogLines

EPOCHS = 4
DGC_CFG = {"ratio": 0.05, "momentum": 0.9, "warmup": None}
STATE_KWARGS = {"min_compress_numel": 64}


class Net(L.LightningModule):
    def __init__(self, optimizer: str = "dgcsgd"):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        self.optimizer = optimizer
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        if self.optimizer == "dgcsgd":
            return gradsparse.DGCSGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9 if self.optimizer == "momentum" else 0.0)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(128, 16, generator=g)
        return DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=8)


WARNINGS = LogLines(logging.WARNING)
TRAINERS = []


def fit(tag, folder, strategy, module=None, ckpt_path=None, **trainer_kwargs):
    """One Trainer.fit; saves parameters, gradsparse state and warnings of this rank."""
    module = module or Net()
    WARNINGS.messages.clear()
    kwargs = {"enable_checkpointing": False, **trainer_kwargs}
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=EPOCHS, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, **kwargs)
    TRAINERS.append(trainer)
    out = {}
    try:
        trainer.fit(module, ckpt_path=ckpt_path)
    except Exception as err:  # noqa: BLE001  (a refused optimizer is one scenario)
        out["error"] = f"{type(err).__name__}: {err}"
    state = getattr(trainer.strategy, "state", None)
    out.update(params={k: v.detach().clone() for k, v in module.state_dict().items()}, losses=module.losses,
               warnings=list(WARNINGS.messages), global_step=trainer.global_step,
               state=state.state_dict() if state is not None else None,
               history=list(state.history) if state is not None else None)
    torch.save(out, os.path.join(folder, f"{tag}-rank{trainer.global_rank}.pt"))


def sparse(**state_kwargs):
    return GradSparseStrategy(gradsparse.DGC(**DGC_CFG), state_kwargs={**STATE_KWARGS, **state_kwargs})


def checkpointing(folder):
    return ModelCheckpoint(dirpath=os.path.join(folder, "ckpt"), filename="{epoch}", every_n_epochs=1, save_top_k=-1)


def main(scenario, folder):
    torch.set_num_threads(1)
    logging.getLogger("gradsparse").addHandler(WARNINGS)
    if scenario == "train":
        fit("refused", folder, sparse(), Net("momentum"))
        fit("dgc", folder, sparse())
        fit("topk1", folder, GradSparseStrategy(gradsparse.TopK(1.0)), Net("sgd"), accumulate_grad_batches=2)
        fit("dense", folder, DDPStrategy(), Net("sgd"), accumulate_grad_batches=2)
        dropped = DDPStrategy(ddp_comm_state=gradsparse.ddp.GradSparseState(gradsparse.TopK(0.01)),
                              ddp_comm_hook=gradsparse.ddp.sparse_hook)
        fit("dropped", folder, dropped, Net("sgd"))
        fit("uninterrupted", folder, sparse(), callbacks=[checkpointing(folder)], enable_checkpointing=True)
    elif scenario == "resume":
        fit("resumed", folder, sparse(), ckpt_path=os.path.join(folder, "ckpt", "epoch=1.ckpt"))
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    trainer = TRAINERS[0]
    trainer.strategy.barrier()
    for proc in getattr(trainer.strategy.launcher, "procs", []):  # rank 0 waits for the ranks Lightning started
        proc.wait()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown (torch 2.13 + gloo aborts there now and then; docs/ddp.md)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
