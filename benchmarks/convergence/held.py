"""How old, and how much rescaled by the learning rate, is the velocity DGC sends? (One world-2 DGC run.)

DGC keeps each coordinate's velocity ``v`` (momentum-corrected gradients, summed) until the
coordinate is selected, then the optimizer applies it at *that* step's learning rate. Dense momentum
SGD would have applied each increment at the rate of the step it was computed at. For every tensor
DGC compresses, rank 0 reads its velocity after each step and reports per epoch:

* ``age``: steps since the coordinate was last sent, averaged over the sent coordinates weighted
  by ``|v|``;
* ``amplification``: ``lr_t * sum |v|`` over the coordinates sent at step ``t`` divided by the same
  accumulation with every increment weighted by its own step's rate (> 1 while the rate rises).

Both leave out the sending step's own increment (a coordinate is "sent" where ``v`` became exactly
zero). Same task, seeds and ``--set`` overrides as ``run``; about a minute on 2 cores.

Example::

    python -m benchmarks.convergence.held --task digits_wd --seed 0 --out held.json
    python -m benchmarks.convergence.held --set digits_wd.warmup_stage_steps=99 --out held-w99.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import ddp as gddp

from .methods import make_method
from .run import parse_setting
from .train import JOBS, TASKS, _cosine, dgc_warmup, make_optimizer, one_cycle

logger = logging.getLogger("convergence.held")


def _worker(rank: int, world: int, port: int, task_name: str, overrides: dict, seed: int, out: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    task = TASKS[task_name].replace(**overrides)
    job = JOBS[task.name](task, rank, world, seed)
    spe = job.steps_per_epoch
    m = make_method("dgc", ratio=task.ratio, momentum=task.momentum, warmup=dgc_warmup(task, spe), clip=task.clip, seed=seed)
    torch.manual_seed(seed)
    net = job.model()
    torch.manual_seed(seed * 7919 + rank)
    model = DDP(net)
    opt = make_optimizer(model.parameters(), task, m)
    state = gddp.register(model, m.compressor, optimizer=opt, min_compress_numel=task.min_compress_numel, log_every=0)
    total = task.epochs * spe
    scheduler = one_cycle(task, opt, total)
    names = [name for name, p in net.named_parameters() if p.numel() >= task.min_compress_numel]
    track: dict[str, dict] = {}
    epochs, step = [], 0
    for epoch in range(task.epochs):
        sums = {name: dict(held=0.0, dense=0.0, age=0.0, weight=0.0, sent=0) for name in names}
        losses, rates = [], []
        for batch in job.epoch(epoch):
            if scheduler is None:
                for group in opt.param_groups:
                    group["lr"] = _cosine(task.lr, step, total)
            lr = opt.param_groups[0]["lr"]
            opt.zero_grad(set_to_none=True)
            loss = job.loss(model, batch)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
            rates.append(lr)
            if rank == 0 and step >= 1:  # iteration 0 is dense
                memory = state.reducer.memory.state
                for name in names:
                    key = next(k for k in memory if str(k).endswith(name))
                    v = memory[key]["velocity"].reshape(-1).clone()
                    t = track.setdefault(name, dict(v=torch.zeros_like(v), h=torch.zeros_like(v),
                                                     last=torch.zeros_like(v)))
                    sent = (v == 0) & (t["v"] != 0)
                    held = t["v"][sent].abs()
                    s = sums[name]
                    s["held"] += lr * float(held.sum())
                    s["dense"] += float(t["h"][sent].abs().sum())
                    s["age"] += float(((step - t["last"][sent]) * held).sum())
                    s["weight"] += float(held.sum())
                    s["sent"] += int(sent.sum())
                    increment = torch.where(sent, torch.zeros_like(v), v - t["v"])
                    t["h"] = torch.where(sent, torch.zeros_like(v), t["h"] + lr * increment)
                    t["last"] = torch.where(sent, torch.full_like(v, step), t["last"])
                    t["v"] = v
            step += 1
        if rank == 0:
            row = {"epoch": epoch + 1, "lr": sum(rates) / len(rates), "train_loss": sum(losses) / len(losses)}
            for name, s in sums.items():
                row[name] = {"sent": s["sent"],
                             "amplification": s["held"] / s["dense"] if s["dense"] else math.nan,
                             "age": s["age"] / s["weight"] if s["weight"] else math.nan}
            epochs.append(row)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"task": task_name, "seed": seed, "overrides": overrides, "epochs": epochs}, f)
        for row in epochs:
            cells = "  ".join(f"{n}: x{row[n]['amplification']:.2f} age {row[n]['age']:.0f}" for n in names)
            logger.info("epoch %2d lr %.3f loss %.2f  %s", row["epoch"], row["lr"], row["train_loss"], cells)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # torch 2.13 + gloo can abort in interpreter teardown (see run.py)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence.held", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="digits_wd", choices=list(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="TASK.FIELD=VALUE")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    overrides: dict = {}
    for item in args.set:
        overrides.update(parse_setting(item))
    task = TASKS[args.task].replace(**overrides)
    if task.dgc_weight_decay != "optimizer" or task.dgc_lr_in_gradient:
        # train.py changes the loss for these (an L2 term, the LR factor); this loop does not
        parser.error("held measures the default route only: leave dgc_weight_decay='optimizer' and "
                     "dgc_lr_in_gradient=false")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, args.task, overrides, args.seed, args.out), nprocs=2,
                       start_method="spawn")


if __name__ == "__main__":
    main()
