"""Main job: DDP training with the DGC hook against dense allreduce, on loopback.

Launched by ``make demo`` as::

    torchrun --standalone --nproc-per-node 2 benchmarks/ddp_demo.py [--steps 40]

Both runs train the same model from the same seed on the same data; the table
at the end shows bytes sent per step and rank, the compression ratio in bytes,
the median step time and the final loss for each.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsparse
from gradsparse import ddp as gddp

logger = logging.getLogger("ddp_demo")


def make_model() -> nn.Module:
    """A 3.4M-parameter MLP classifier (enough parameters for sparsity to matter)."""
    return nn.Sequential(nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, 10))


def run(method: str, steps: int, batch: int, rank: int) -> dict:
    torch.manual_seed(0)
    model = DDP(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9 if method == "dense" else 0.0)
    state = None
    if method == "dgc":
        warmup = gradsparse.Warmup(unit="step", length=max(1, steps // 10))
        state = gddp.register(model, gradsparse.DGC(0.001, momentum=0.9, warmup=warmup), optimizer=opt, log_every=0)
    data = torch.Generator().manual_seed(1234 + rank)
    teacher = torch.Generator().manual_seed(99)
    w_true = torch.randn(512, 10, generator=teacher)
    times, sent, ratios, loss = [], [], [], float("nan")
    for step in range(steps):
        x = torch.randn(batch, 512, generator=data)
        y = (x @ w_true).argmax(1)
        dist.barrier()
        t0 = time.perf_counter()
        loss_t = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        loss = float(loss_t)
        n = sum(p.numel() for p in model.parameters())
        if state is not None:
            s = state.last_stats
            sent.append(s.bytes_sent)
            ratios.append(s.compression_ratio)
            logger.info("[dgc] step %3d  loss %.4f  %s", step, loss, s)
        else:
            sent.append(4 * n)  # a dense fp32 allreduce hands the whole gradient to the collective
            ratios.append(1.0)
            if step % 10 == 0:
                logger.info("[dense] step %3d  loss %.4f  step %.1f ms", step, loss, 1e3 * times[-1])
    tail = slice(steps // 2, None)  # after warm-up
    return {"method": method, "bytes_per_step": statistics.median(sent[tail]),
            "ratio": statistics.median(ratios[tail]), "step_ms": 1e3 * statistics.median(times[tail]),
            "loss": loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    results = [run(m, args.steps, args.batch, rank) for m in ("dense", "dgc")]
    if rank == 0:
        lines = [f"world size {dist.get_world_size()}, {args.steps} steps, medians over the second half",
                 f"{'method':<8}{'bytes sent/step':>18}{'compression':>14}{'step ms':>10}{'final loss':>12}"]
        for r in results:
            lines.append(f"{r['method']:<8}{r['bytes_per_step']:>18,.0f}{r['ratio']:>13.1f}x"
                         f"{r['step_ms']:>10.1f}{r['loss']:>12.4f}")
        logger.info("results\n%s", "\n".join(lines))
    dist.destroy_process_group()
    # torch 2.13 + gloo sometimes aborts in interpreter teardown after all work is done
    # (docs/ddp.md, "Shutting down"); skip the teardown so the exit code is the job's.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
