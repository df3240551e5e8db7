"""Profile one rank's DDP step with a comm hook, alone on the machine (world size 1, no network).

Explains where a step's time goes when a cluster benchmark misses a target: the
compute floor, gradsparse's compression time (``state.last_stats.compress_s``; of which
``blocking_s`` is done inside the hook before each collective, stalling backward) and
the torch.profiler table of the operators inside the step::

    python benchmarks/profile_hook.py --model resnet50 --method dgc0.1 --steps 5

Prints a JSON line (step and compression medians) and the profiler's top operators.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from benchmarks.bench_models import loss_fn, make_batch  # noqa: E402
from benchmarks.ddp_bench import build  # noqa: E402
from benchmarks.teardown import exit_without_teardown  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "lstm"])
    parser.add_argument("--method", default="dgc0.1")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29633", rank=0, world_size=1)
    results = {}
    for method in ("compute", args.method):
        model, opt, timer, state = build(method, args.model)
        x, y = make_batch(args.model, args.batch, torch.Generator().manual_seed(0))
        times, compress, blocking = [], [], []
        prof = None
        for step in range(3 + args.steps):
            if step == 3 and method != "compute":
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                prof.__enter__()
            t0 = time.perf_counter()
            loss = loss_fn(args.model, model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= 3:
                times.append(time.perf_counter() - t0)
                if state is not None:
                    compress.append(state.last_stats.compress_s)
                    blocking.append(state.last_stats.blocking_s)
        if prof is not None:
            prof.__exit__(None, None, None)
        results[method] = {"step_ms": 1e3 * statistics.median(times),
                           "compress_ms": 1e3 * statistics.median(compress) if compress else None,
                           # the part inside the hook, before each bucket's collective: it stalls backward
                           "blocking_ms": 1e3 * statistics.median(blocking) if blocking else None}
    print(json.dumps({"model": args.model, "threads": args.threads, "load": os.getloadavg(), **results}))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    exit_without_teardown()


if __name__ == "__main__":
    main()
