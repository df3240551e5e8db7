"""End-to-end DDP step benchmark: dense vs fp16 vs PowerSGD vs gradsparse, real comm hooks, one run.

Run under torchrun, normally on an emulated cluster (benchmarks/cluster_bench.py does)::

    python -m launch.cluster --nodes 4 --rate 1gbit -- benchmarks/ddp_bench.py --model resnet50 --out ddp.json

Methods (every one in the same run, same model seed, same data):

- ``compute``: forward, backward and SGD step without DDP: the compute floor of a step.
- ``dense``: DDP with no hook (fp32 allreduce, DDP's default 25 MB buckets).
- ``fp16``: PyTorch's ``fp16_compress_hook``.
- ``powersgd1`` / ``powersgd4``: PyTorch's ``powerSGD_hook``, rank 1 / 4, ``start_powerSGD_iter=2``,
  run with ONE bucket (``bucket_cap_mb=4096``): with several buckets it aborts under gloo
  ("collective mismatch", ../shared/DESIGN.md), because it issues collectives from future callbacks.
- ``topk1``: gradsparse ``TopK(0.01)``; ``dgc0.1``: gradsparse ``DGC(0.001, warmup=None)`` (no
  warm-up: its ratio is 0.1 % from the first compressed step; optimizer momentum 0): DGC as a job
  sees it after the default warm-up's 1,000 optimizer steps (``gradsparse.schedule.DEFAULT_WARMUP_STEPS``).
- ``dgc0.1hier`` / ``dgc0.1auto`` (and ``topk1hier`` / ``topk1auto``): ``dgc0.1`` (``topk1``) reduced hierarchically (dense inside the node, sparse
  between nodes; ranks per node from torchrun's ``LOCAL_WORLD_SIZE``), always / chosen per bucket by cost.
  Inside a node the buckets move through shared memory; ``dgc0.1hiercoll`` is ``dgc0.1hier`` with
  ``Hierarchy(shared_memory=False)``: through the node's gloo allreduces instead; ``dgc0.1hierwhole`` takes the
  other ranks' results back as whole pieces, not only where their pairs landed (``sparse_gather = False``).
- ``dgc0.1warm``: gradsparse ``DGC(0.001)`` with its default warm-up, which lasts longer than any
  run here: every step is in its first stage, density 25 % (a job's optimizer steps 1-250).
  ``dgc0.1warmar`` / ``dgc0.1warmsplit``: the same with the transport forced to the allreduce of the
  selection / the split transport (``gradsparse.split``); ``dgc0.1warmtime``: chosen by predicted time.

The first ``--warmup`` steps are not timed (gradsparse reduces iteration 0 densely, PowerSGD
iterations 0-1). Per step: the slowest rank's step time, the time spent inside the hook call
(its synchronous part), gradsparse's own compression time (``state.last_stats.compress_s``),
this node's transmitted bytes (interface counter), and the bytes this rank handed to the
collectives (``sent_bytes_per_step``): fp32 gradient for dense, fp16 for the fp16 hook, PowerSGD's
own element count (its uncompressed tensors, P and Q) x 4, gradsparse's ``state.last_stats.bytes_sent``.
With ``--progress`` rank 0 prints ``progress <method> <step> <steps>`` after every step.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState
from torch.nn.parallel import DistributedDataParallel as DDP


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script by torchrun
from benchmarks.bench_models import MODELS, loss_fn, make_batch, make_model
from benchmarks.teardown import exit_without_teardown
from benchmarks.wire import gather_floats, per_rank_wire_bytes, slowest, summarize, tx_bytes, wire_iface
from gradsparse import DGC, TopK
from gradsparse import ddp as gddp
from gradsparse.hierarchical import Hierarchy

logger = logging.getLogger("ddp_bench")

METHODS = ("compute", "dense", "fp16", "powersgd1", "powersgd4", "topk1", "dgc0.1", "dgc0.1warm", "dgc0.1warmtime",
           "dgc0.1warmar", "dgc0.1warmsplit",
           "dgc0.1hier", "dgc0.1hiercoll", "dgc0.1hierwhole", "dgc0.1auto", "topk1hier", "topk1auto")
LABELS = {"compute": "compute only (no comm)", "dense": "dense fp32 (no hook)", "fp16": "fp16_compress_hook",
          "powersgd1": "PowerSGD rank 1", "powersgd4": "PowerSGD rank 4", "topk1": "gradsparse TopK 1 %",
          "dgc0.1": "gradsparse DGC 0.1 %", "dgc0.1warm": "gradsparse DGC, warm-up stage 1 (25 %)",
          "dgc0.1warmtime": "gradsparse DGC, warm-up stage 1, transport by time",
          "dgc0.1warmar": "gradsparse DGC, warm-up stage 1, transport allreduce",
          "dgc0.1warmsplit": "gradsparse DGC, warm-up stage 1, transport split",
          "dgc0.1hier": "gradsparse DGC 0.1 % (hierarchical)",
          "dgc0.1hiercoll": "gradsparse DGC 0.1 % (hierarchical, node allreduces)",
          "dgc0.1hierwhole": "gradsparse DGC 0.1 % (hierarchical, whole pieces back)",
          "dgc0.1auto": "gradsparse DGC 0.1 % (by cost)",
          "topk1hier": "gradsparse TopK 1 % (hierarchical)", "topk1auto": "gradsparse TopK 1 % (by cost)"}
GRADSPARSE = ("topk1", "dgc0.1", "dgc0.1warm", "dgc0.1warmtime", "dgc0.1warmar", "dgc0.1warmsplit", "dgc0.1hier",
              "dgc0.1hiercoll", "dgc0.1hierwhole", "dgc0.1auto", "topk1hier", "topk1auto")
HIERARCHY = {f"{m}{kind}": Hierarchy(transport={"hier": "hierarchical", "auto": "auto"}[kind])
             for m in ("dgc0.1", "topk1") for kind in ("hier", "auto")}
HIERARCHY["dgc0.1hiercoll"] = Hierarchy(transport="hierarchical", shared_memory=False)
HIERARCHY["dgc0.1hierwhole"] = HIERARCHY["dgc0.1hier"]


class HookTimer:
    """Wraps a comm hook; adds up the wall time of its synchronous part per step (``.seconds``)."""

    def __init__(self, hook):
        self.seconds = 0.0

        @functools.wraps(hook)  # DDP checks the hook's name and signature
        def timed(state, bucket):
            t0 = time.perf_counter()
            fut = hook(state, bucket)
            self.seconds += time.perf_counter() - t0
            return fut

        self.hook = timed


def build(method: str, model_kind: str, powersgd_bucket_mb: float = 4096):
    """(model, optimizer, HookTimer or None, GradSparseState / PowerSGDState or None) for one method."""
    torch.manual_seed(0)
    net = make_model(model_kind)
    if method == "compute":
        return net, torch.optim.SGD(net.parameters(), lr=0.01), None, None
    one_bucket = method.startswith("powersgd")
    model = DDP(net, bucket_cap_mb=powersgd_bucket_mb if one_bucket else 25)
    # DGC's momentum lives in the compressor: its optimizer must not add momentum again
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0 if method.startswith("dgc") else 0.9)
    timer, state = None, None
    if method == "fp16":
        timer = HookTimer(default_hooks.fp16_compress_hook)
        model.register_comm_hook(None, timer.hook)
    elif one_bucket:
        timer = HookTimer(powerSGD_hook.powerSGD_hook)
        state = PowerSGDState(None, matrix_approximation_rank=int(method[-1]), start_powerSGD_iter=2)
        model.register_comm_hook(state, timer.hook)
    elif method in GRADSPARSE:
        compressor = TopK(0.01) if method.startswith("topk1") else DGC(0.001) if method.startswith("dgc0.1warm") \
            else DGC(0.001, warmup=None)
        gddp.check_optimizer(opt, compressor)
        # sparse or dense by predicted time, or one transport forced
        transport = {"dgc0.1warmtime": {"transport": "auto"}, "dgc0.1warmar": {"transport": "allreduce"},
                     "dgc0.1warmsplit": {"transport": "split"}}.get(method, {})
        state = gddp.GradSparseState(compressor, model=model, log_every=0, hierarchy=HIERARCHY.get(method),
                                     **transport)
        if method == "dgc0.1hierwhole":
            state.reducer.sparse_gather = False
        timer = HookTimer(gddp.sparse_hook)
        model.register_comm_hook(state, timer.hook)
    elif method != "dense":
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return model, opt, timer, state


def sent_counter(method: str, model, state):
    """A function called once after every step: bytes this rank handed to the collectives in that step.

    Payload, not wire: a ring allreduce of B bytes sends 2(W-1)/W x B per rank (B at W = 2), an
    allgather (W-1) x the payload; DDP's broadcast of buffers (BatchNorm statistics) is not counted.
    """
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "dense":
        return lambda: 4 * numel
    if method == "fp16":
        return lambda: 2 * numel
    if isinstance(state, PowerSGDState):  # it counts the elements it allreduces: uncompressed tensors, P and Q
        seen = [state.total_numel_after_compression]

        def powersgd() -> int:
            now = state.total_numel_after_compression
            step, seen[0] = now - seen[0], now
            return 4 * step if step else 4 * numel  # iterations before start_powerSGD_iter: plain allreduce

        return powersgd
    if isinstance(state, gddp.GradSparseState):
        return lambda: state.last_stats.bytes_sent
    return lambda: 0


def run_method(method: str, args, rank: int) -> dict:
    model, opt, timer, state = build(method, args.model, args.powersgd_bucket_mb)
    gradsparse_state = state if isinstance(state, gddp.GradSparseState) else None
    count_sent = sent_counter(method, model, state)
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [make_batch(args.model, args.batch, gen, args.image_size) for _ in range(4)]
    times, hook_s, compress_s, wire, lib_sent, sent_bytes, density, losses = [], [], [], [], [], [], [], []
    transports = []
    total = args.warmup + args.steps
    for step in range(total):
        x, y = batches[step % len(batches)]
        if method != "compute":
            dist.barrier()
        if timer is not None:
            timer.seconds = 0.0
        before = tx_bytes()
        t0 = time.perf_counter()
        loss = loss_fn(args.model, model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if method != "compute":
            dist.barrier()  # this rank's last sends have left the shaped link's queue (and are counted)
        sent = tx_bytes() - before
        handed = count_sent()
        if args.progress and rank == 0:
            print(f"progress {method} {step + 1} {total}", flush=True)
        if step < args.warmup:
            continue
        times.append(dt)
        losses.append(loss.detach().item())
        wire.append(per_rank_wire_bytes(sent) if method != "compute" else 0.0)
        hook_s.append(timer.seconds if timer is not None else float("nan"))
        sent_bytes.append(handed)
        if gradsparse_state is not None:
            s = gradsparse_state.last_stats
            compress_s.append(s.compress_s)
            lib_sent.append(s.bytes_sent)
            density.append(s.density)
            transports.append((s.allreduce_buckets, s.split_buckets, s.buckets))
            if s.allreduce_buckets:
                logger.info("%s: %d of %d buckets went dense (transport fallback)", method, s.allreduce_buckets, s.buckets)
    if method == "compute":
        per_rank = gather_floats(times)
        step_times = [statistics.median(col) for col in zip(*per_rank)]  # no collective: the typical rank
    else:
        step_times = slowest(gather_floats(times))
    result = {"method": method, "label": LABELS[method], "step_s": summarize(step_times), "step_times": step_times,
              "hook_s": summarize(hook_s) if timer is not None else None,
              "compress_s": summarize(compress_s) if compress_s else None,
              "wire_bytes_per_step": statistics.median(wire),
              "wire_bytes_per_step_all_ranks": [statistics.median(w) for w in gather_floats(wire)],
              "lib_bytes_sent_per_step": statistics.median(lib_sent) if lib_sent else None,
              "sent_bytes_per_step": statistics.median(sent_bytes),
              "density": statistics.median(density) if density else None,
              # per timed step: (buckets by allreduce, by split, all buckets) on rank 0
              "transports": transports or None,
              "loss_last": losses[-1], "bucket_cap_mb": args.powersgd_bucket_mb if method.startswith("powersgd") else 25}
    del model, opt, state, gradsparse_state
    logger.info("%-10s step %.1f ms (min %.1f, max %.1f), sent %.0f B/step/rank, wire %.0f B/step/rank", method,
                1e3 * result["step_s"]["median"], 1e3 * result["step_s"]["min"], 1e3 * result["step_s"]["max"],
                result["sent_bytes_per_step"], result["wire_bytes_per_step"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=MODELS)
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "dgc0.1warm"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 3 for PowerSGD)")
    parser.add_argument("--batch", type=int, default=2, help="per-rank batch size")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--powersgd-bucket-mb", type=float, default=4096,
                        help="DDP bucket cap for PowerSGD (default: one bucket; 25 reproduces the gloo abort)")
    parser.add_argument("--link-bps", type=float, default=None, help="measured link rate (recorded only)")
    parser.add_argument("--out", default=None, help="JSON file (written by rank 0)")
    parser.add_argument("--progress", action="store_true", help="rank 0 prints a progress line after every step")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if args.warmup < 3 and any(m.startswith("powersgd") for m in methods):
        parser.error("--warmup must be >= 3 with PowerSGD (its iterations 0-1 are dense)")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("gradsparse").setLevel(logging.WARNING)
    results = []
    for i, method in enumerate(methods):
        logger.info("[%d/%d] %s, %s, world %d", i + 1, len(methods), method, args.model, dist.get_world_size())
        results.append(run_method(method, args, rank))
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "world_size": dist.get_world_size(), "iface": wire_iface()[0],
                       "link_bps": args.link_bps, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                       "image_size": args.image_size, "methods": results}, f, indent=1)
    dist.barrier()
    exit_without_teardown()


if __name__ == "__main__":
    main()
