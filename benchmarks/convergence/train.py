"""One training run on one rank of a DDP job: the gradsparse hook on real data.

Call :func:`train` on every rank of an initialised (gloo) process group. Every
rank builds the same model from ``seed``, takes its own slice of each global
batch (the batch order depends only on ``seed``, so world sizes 2 and 4 see the
same data per step), and the hook or DDP's allreduce averages the gradients.
Rank 0 evaluates after every epoch. The result is a plain dict: the curve,
the final metric and the bytes this rank handed to the collectives.

Example (inside a process group; see :mod:`benchmarks.convergence.run`)::

    result = train(rank, world, TASKS["digits"], "dgc", seed=0)
    result["final"], result["ratio_after_warmup"]
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGCSGD, Warmup
from gradsparse import ddp as gddp

from .data import corpus, digits
from .methods import make_method
from .models import DigitsCNN, WordLSTM, n_params

logger = logging.getLogger("convergence")


@dataclasses.dataclass(frozen=True)
class Task:
    """Model, data and schedule of one task (identical for every method)."""

    name: str
    epochs: int
    global_batch: int             # images, or token streams for the language model
    lr: float
    momentum: float = 0.9
    ratio: float = 0.001          # density of the sparse methods (99.9 % sparsity)
    warmup_stages_per_epoch: int = 1   # DGC warm-up: 4 stages of 1/this epoch each
    min_compress_numel: int = 512      # smaller tensors are sent whole
    clip: float | None = None
    bptt: int = 35
    vocab_size: int = 2000
    max_steps_per_epoch: int | None = None   # for the short CI runs
    weight_decay: float = 0.0     # dense: SGD's; DGC: gradsparse.DGCSGD's (through its momentum)
    schedule: str = "cosine"      # learning rate: "cosine" (per step) or "onecycle" (torch's OneCycleLR)
    warmup_stage_steps: int | None = None   # DGC warm-up stage length in steps (None: from warmup_stages_per_epoch)
    # where DGC (momentum correction) takes weight decay: "optimizer" (DGCSGD's own buffer) or "gradient"
    # (an L2 term in the loss, so wd * p goes through DGC's momentum and memory and is compressed with the gradient)
    dgc_weight_decay: str = "optimizer"
    # ablation: DGC (momentum correction) accumulates lr_t / lr * gradient and the optimizer steps at the constant lr,
    # so velocity kept back while the rate rises is not applied at a higher rate than it was computed at
    # (needs dgc_weight_decay="gradient" when weight_decay is set)
    dgc_lr_in_gradient: bool = False

    def replace(self, **changes) -> "Task":
        return dataclasses.replace(self, **changes)


TASKS = {
    "digits": Task("digits", epochs=30, global_batch=32, lr=0.05),
    "lm": Task("lm", epochs=20, global_batch=8, lr=1.0, clip=0.5, warmup_stages_per_epoch=8),
    # the recipe of a real job: momentum SGD with weight decay and a one-cycle learning rate
    "digits_wd": Task("digits_wd", epochs=30, global_batch=32, lr=0.1, weight_decay=5e-4, schedule="onecycle"),
}


def _cosine(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


class _DigitsJob:
    metric = "accuracy"

    def __init__(self, task: Task, rank: int, world: int, seed: int):
        self.data = digits()
        self.task, self.rank, self.world, self.seed = task, rank, world, seed
        self.local = task.global_batch // world
        self.steps_per_epoch = len(self.data.y_train) // task.global_batch
        if task.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, task.max_steps_per_epoch)

    def model(self) -> nn.Module:
        return DigitsCNN(self.data.n_classes)

    def epoch(self, epoch: int):
        order = torch.randperm(len(self.data.y_train), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        for step in range(self.steps_per_epoch):
            start = step * self.task.global_batch + self.rank * self.local
            yield order[start:start + self.local]

    def loss(self, model, idx) -> torch.Tensor:
        return nn.functional.cross_entropy(model(self.data.x_train[idx]), self.data.y_train[idx])

    @torch.no_grad()
    def evaluate(self, model) -> float:
        model.eval()
        pred = model(self.data.x_val).argmax(1)
        model.train()
        return float((pred == self.data.y_val).float().mean())


class _LMJob:
    metric = "perplexity"

    def __init__(self, task: Task, rank: int, world: int, seed: int):
        c = corpus(task.vocab_size)
        self.task, self.rank, self.world = task, rank, world
        streams = task.global_batch
        length = len(c.train) // streams
        self.train = c.train[:streams * length].view(streams, length)
        self.val = c.val[:len(c.val) // 8 * 8].view(8, -1)
        self.local = slice(rank * streams // world, (rank + 1) * streams // world)
        self.steps_per_epoch = (length - 1) // task.bptt
        if task.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, task.max_steps_per_epoch)
        self.hidden = None

    def model(self) -> nn.Module:
        return WordLSTM(self.task.vocab_size)

    def epoch(self, epoch: int):
        self.hidden = None
        for step in range(self.steps_per_epoch):
            yield step * self.task.bptt

    def loss(self, model, start) -> torch.Tensor:
        rows = self.train[self.local]
        x, y = rows[:, start:start + self.task.bptt], rows[:, start + 1:start + 1 + self.task.bptt]
        if self.hidden is not None:
            self.hidden = tuple(h.detach() for h in self.hidden)
        out, self.hidden = model(x, self.hidden)
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model) -> float:
        model.eval()
        out, _ = model(self.val[:, :-1])
        model.train()
        loss = nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), self.val[:, 1:].reshape(-1))
        return float(torch.exp(loss))


JOBS = {"digits": _DigitsJob, "lm": _LMJob, "digits_wd": _DigitsJob}


def _momentum_corrected(m) -> bool:
    """Whether the method's compressor applies the momentum itself (DGC's momentum correction)."""
    return m.compressor is not None and getattr(m.compressor, "momentum_correction", False)


def _decay_in_loss(task: Task, m) -> bool:
    """Weight decay as an L2 term of the loss (``dgc_weight_decay="gradient"``, DGC with momentum correction only)."""
    if task.dgc_weight_decay not in ("optimizer", "gradient"):
        raise ValueError(f"dgc_weight_decay must be 'optimizer' or 'gradient', got {task.dgc_weight_decay!r}")
    return bool(task.weight_decay) and task.dgc_weight_decay == "gradient" and _momentum_corrected(m)


def dgc_warmup(task: Task, steps_per_epoch: int) -> Warmup:
    """The task's DGC warm-up: stages of ``warmup_stage_steps``, or a fraction of an epoch each."""
    return Warmup(length=task.warmup_stage_steps or max(1, steps_per_epoch // task.warmup_stages_per_epoch),
                  unit="step")


def one_cycle(task: Task, opt: torch.optim.Optimizer, total: int):
    """torch's OneCycleLR over ``total`` steps for a ``"onecycle"`` task, else None (cosine, set per step)."""
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=task.lr, total_steps=total, cycle_momentum=False) \
        if task.schedule == "onecycle" else None


def make_optimizer(params, task: Task, m) -> torch.optim.Optimizer:
    """SGD as the task asks; with weight decay under DGC's momentum correction, DGCSGD (decay through momentum)."""
    if _decay_in_loss(task, m):
        return torch.optim.SGD(params, lr=task.lr, momentum=0.0)
    if task.weight_decay and _momentum_corrected(m):
        return DGCSGD(params, lr=task.lr, momentum=m.compressor.momentum, weight_decay=task.weight_decay,
                      nesterov=m.compressor.nesterov)
    return torch.optim.SGD(params, lr=task.lr, momentum=m.optimizer_momentum, weight_decay=task.weight_decay)


def train(rank: int, world: int, task: Task, method: str, seed: int) -> dict:
    """Train ``task`` with ``method`` from ``seed``; returns the run's curve and communication totals."""
    job = JOBS[task.name](task, rank, world, seed)
    spe = job.steps_per_epoch
    warmup = dgc_warmup(task, spe)
    m = make_method(method, ratio=task.ratio, momentum=task.momentum, warmup=warmup, clip=task.clip, seed=seed)
    torch.manual_seed(seed)
    net = job.model()
    torch.manual_seed(seed * 7919 + rank)  # dropout differs between ranks, not between runs
    model = DDP(net)
    opt = make_optimizer(model.parameters(), task, m)
    decay_in_loss = _decay_in_loss(task, m)
    lr_in_gradient = task.dgc_lr_in_gradient and _momentum_corrected(m)
    if lr_in_gradient and task.weight_decay and not decay_in_loss:
        raise ValueError("dgc_lr_in_gradient with weight decay needs dgc_weight_decay='gradient'")
    # the optimizer whose lr the schedule sets: with lr_in_gradient a stand-in, read as lr_t each step
    scheduled = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=task.lr) if lr_in_gradient else opt
    state = None
    if m.compressor is not None:
        state = gddp.register(model, m.compressor, optimizer=opt, min_compress_numel=task.min_compress_numel,
                              log_every=0)
    total = task.epochs * spe
    scheduler = one_cycle(task, scheduled, total)
    n = n_params(net)
    curve, step, started = [], 0, time.perf_counter()
    for epoch in range(task.epochs):
        losses = []
        for batch in job.epoch(epoch):
            if scheduler is None:
                for group in scheduled.param_groups:
                    group["lr"] = _cosine(task.lr, step, total)
            opt.zero_grad(set_to_none=True)
            loss = job.loss(model, batch)
            objective = loss
            if decay_in_loss:  # d/dp (wd/2 |p|^2) = wd * p, added before DDP's hook compresses the gradient
                objective = objective + 0.5 * task.weight_decay * sum(p.pow(2).sum() for p in model.parameters())
            if lr_in_gradient:
                objective = objective * (scheduled.param_groups[0]["lr"] / task.lr)
            objective.backward()
            if task.clip is not None and not m.local_clip:
                nn.utils.clip_grad_norm_(model.parameters(), task.clip)
            opt.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
            step += 1
        value = job.evaluate(net) if rank == 0 else float("nan")
        curve.append({"epoch": epoch + 1, "step": step, "train_loss": sum(losses) / len(losses), job.metric: value})
        if rank == 0:
            logger.info("%s %s seed %d world %d: epoch %d/%d  train loss %.4f  val %s %.4f  (%.0f s)", task.name,
                        method, seed, world, epoch + 1, task.epochs, curve[-1]["train_loss"], job.metric, value,
                        time.perf_counter() - started)
    history = state.history if state is not None else [
        {"step": s, "numel": n, "bytes_sent": 4 * n} for s in range(step)]  # DDP's allreduce hands over every fp32
    after = warmup.total if method in ("dgc", "dgc_no_momentum_correction") else 1
    tail = [h for h in history if h["step"] >= after]

    def ratio(rows):
        sent = sum(h["bytes_sent"] for h in rows)
        return 4 * sum(h["numel"] for h in rows) / sent if sent else float("nan")

    return {"task": task.name, "method": method, "seed": seed, "world": world, "metric": job.metric,
            "final": curve[-1][job.metric], "curve": curve, "params": n, "steps": step, "steps_per_epoch": spe,
            "warmup_steps": warmup.total, "bytes_sent_per_step": sum(h["bytes_sent"] for h in history) / len(history),
            "ratio_all_steps": ratio(history), "ratio_after_warmup": ratio(tail),
            "seconds": time.perf_counter() - started, "config": dataclasses.asdict(task),
            "compressor": None if m.compressor is None else m.compressor.config()}
