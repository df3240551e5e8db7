"""DGC written from the paper, all ranks simulated in one process: the oracle of the multi-process DGC tests.

Lin et al., "Deep Gradient Compression" (ICLR 2018), Algorithm 1 with momentum
correction, local gradient clipping, momentum factor masking and warm-up, as the
authors' code (synxlin/deep-gradient-compression) applies it. Nothing from gradsparse
is imported: selection is the full-sort oracle of tests/oracles.py; counts, clip limit,
warm-up ratios and rounding are written out here from their definitions.

Per step, for every rank ``r`` and compressed tensor (``numel >= min_compress_numel``):

1. ``g`` = the rank's local gradient. Local clipping: each rank's share ``g / N`` of the
   averaged gradient is clipped at ``clip_norm / sqrt(N)``, i.e. ``g`` at
   ``clip_norm * sqrt(N)`` (torch's ``clip_grad_norm_`` convention:
   ``g * limit / (norm + 1e-6)`` when ``norm > limit``). Tensors sent whole are not
   clipped (the authors clip inside the memory's compensation, which only compressed
   tensors go through).
2. Momentum correction: ``u = m*u + g; v = v + u``; Nesterov (the authors' form):
   ``u = m*(u + g); v = v + u + g``.
3. Select the exact top-``k`` of ``|v|`` over the tensor (granularity "parameter") or
   over the concatenation, in bucket order, of the bucket's compressed tensors
   ("bucket"); ``k = max(1, ceil(ratio * n))`` with the warm-up's ratio for the step
   (never below the target); every coordinate on the dense first step(s).
4. Send ``v[chosen]`` rounded to the wire dtype; ``v`` keeps what the rounding lost
   (``v[chosen] -= sent``); momentum factor masking: ``u[chosen] = 0``, except where every
   coordinate of the group is sent (then DGC is dense momentum SGD and ``u`` carries on).
5. Average: each rank's pairs, scaled by ``1/N``, added in rank order.

Tensors sent whole (``numel < min_compress_numel``): the ranks' gradients, rounded to
the wire dtype (not on the dense first step, which moves the bucket's own dtype), are
averaged, then torch.optim.SGD's momentum applies to the average: ``buf = m*buf + avg``,
update ``buf`` (Nesterov: ``avg + m*buf``). Parameters then take plain SGD steps
``p -= lr * update``.

Floating-point operations are written in the order of the paper's formulas and
torch's SGD, so that the library, computing the same formulas in fp32, agrees to the
last bit wherever it sums in the same order; the tests still compare with the
tolerance rule (tests/tolerances.py).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .models import loss_of, make_model
from .oracles import count_for, topk_oracle


@dataclasses.dataclass
class Config:
    ratio: float = 0.02
    momentum: float = 0.9
    nesterov: bool = False
    clip_norm: float | None = None
    warmup: tuple[float, ...] = ()     # one ratio per stage of ``stage_steps`` steps, then ``ratio``
    stage_steps: int = 2
    granularity: str = "parameter"
    wire: torch.dtype | None = None    # None: the gradient's dtype (fp32 here)
    min_compress_numel: int = 2048
    start_iter: int = 1                # dense steps first
    lr: float = 0.1

    def ratio_at(self, step: int) -> float:
        stage = step // self.stage_steps
        return max(self.warmup[stage], self.ratio) if stage < len(self.warmup) else self.ratio


@dataclasses.dataclass
class Trace:
    """What the reference saw, for the tests' preconditions."""

    clipped: int = 0        # (rank, step, tensor) gradients the clipping changed
    unclipped: int = 0
    complete_groups: int = 0  # groups sent whole by selection (k = n) after the dense steps
    masked_groups: int = 0
    multi_tensor_groups: int = 0


def run(world: int, cfg: Config, steps: int, layouts: dict[int, list[list[tuple[str, int]]]], kind: str = "mlp"):
    """Train ``make_model(kind)`` for ``steps`` as DGC over ``world`` ranks would; return (parameters, trace).

    ``layouts[step]`` lists the DDP buckets of that step, each as ``[(name, numel), ...]`` in
    the bucket's memory order (recorded from DDP by the test; only its grouping matters here).
    """
    torch.set_num_threads(1)
    model = make_model(kind)
    named = dict(model.named_parameters())
    wire = cfg.wire or torch.float32
    m = cfg.momentum
    u = [{n: torch.zeros(p.numel()) for n, p in named.items()} for _ in range(world)]
    v = [{n: torch.zeros(p.numel()) for n, p in named.items()} for _ in range(world)]
    whole_buf = {n: torch.zeros(p.numel()) for n, p in named.items()}
    trace = Trace()
    for step in range(steps):
        grads = []
        for r in range(world):
            model.zero_grad()
            loss_of(model, kind, r, step).backward()
            grads.append({n: p.grad.detach().reshape(-1).clone() for n, p in named.items()})
        dense = step < cfg.start_iter
        ratio = cfg.ratio_at(step)
        update = {}
        for bucket in layouts[step]:
            compressed = [n for n, numel in bucket if numel >= cfg.min_compress_numel]
            whole = [n for n, numel in bucket if numel < cfg.min_compress_numel]
            if cfg.granularity == "parameter":
                groups = [[n] for n in compressed]
            else:
                groups = [compressed] if compressed else []
            sums = {n: torch.zeros(named[n].numel()) for n in compressed}
            for r in range(world):
                for n in compressed:
                    g = grads[r][n]
                    if cfg.clip_norm is not None:
                        limit = cfg.clip_norm * math.sqrt(world)
                        norm = float(torch.linalg.vector_norm(g))
                        if norm > limit:
                            g = g * (limit / (norm + 1e-6))
                            trace.clipped += 1
                        else:
                            trace.unclipped += 1
                    if cfg.nesterov:
                        u[r][n] = (u[r][n] + g) * m
                        v[r][n] = v[r][n] + u[r][n] + g
                    else:
                        u[r][n] = u[r][n] * m + g
                        v[r][n] = v[r][n] + u[r][n]
                for group in groups:
                    joined = torch.cat([v[r][n] for n in group])
                    k = joined.numel() if dense else count_for(ratio, joined.numel())
                    complete = k >= joined.numel()
                    if r == 0 and not dense:
                        trace.complete_groups += complete
                        trace.masked_groups += not complete
                        trace.multi_tensor_groups += len(group) > 1
                    mask = torch.zeros(joined.numel(), dtype=torch.bool)
                    mask[topk_oracle(joined, k)] = True
                    start = 0
                    for n in group:
                        picked = mask[start:start + v[r][n].numel()]
                        start += v[r][n].numel()
                        sent = torch.where(picked, v[r][n].to(wire).float(), 0.0)
                        v[r][n] = torch.where(picked, v[r][n] - sent, v[r][n])
                        if not complete:
                            u[r][n] = torch.where(picked, 0.0, u[r][n])
                        sums[n] = torch.where(picked, sums[n] + sent * (1.0 / world), sums[n])
            for n in compressed:
                update[n] = sums[n]
            for n in whole:
                avg = torch.zeros(named[n].numel())
                for r in range(world):
                    sent = grads[r][n] if dense else grads[r][n].to(wire).float()
                    avg = avg + sent * (1.0 / world)
                whole_buf[n] = whole_buf[n] * m + avg
                update[n] = avg.add(whole_buf[n], alpha=m) if cfg.nesterov else whole_buf[n].clone()
        with torch.no_grad():
            for n, p in named.items():
                p.add_(update[n].view_as(p), alpha=-cfg.lr)
    return {n: p.detach().clone() for n, p in named.items()}, trace
