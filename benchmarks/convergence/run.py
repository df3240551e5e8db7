"""Run the convergence matrix: every (task, method, seed) on gloo worlds of 2 and 4 processes.

Each world size is one job of ``world`` spawned processes on loopback that runs
its share of the matrix one run after another; rank 0 writes one JSON file per
run into ``--out`` (runs already there are skipped, so an interrupted matrix
resumes). Progress is logged per epoch.

Example::

    python -m benchmarks.convergence run --tasks digits --methods dense dgc --seeds 0 --worlds 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .methods import METHODS
from .train import TASKS, train

logger = logging.getLogger("convergence")
DEFAULT_OUT = os.path.join("benchmarks", "results", "convergence")


def run_name(task: str, method: str, seed: int, world: int) -> str:
    return f"{task}-{method}-seed{seed}-w{world}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, runs: list, out: str, overrides: dict) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        for task, method, seed in runs:
            result = train(rank, world, TASKS[task].replace(**overrides.get(task, {})), method, seed)
            if rank == 0:
                path = os.path.join(out, run_name(task, method, seed, world) + ".json")
                with open(path + ".tmp", "w") as f:
                    json.dump(result, f)
                os.replace(path + ".tmp", path)
                logger.info("done %s: %s %.4f, compression %.1fx after warm-up (%.0f s)", os.path.basename(path),
                            result["metric"], result["final"], result["ratio_after_warmup"], result["seconds"])
            dist.barrier()
    finally:
        dist.destroy_process_group()
    # torch 2.13 + gloo can abort in interpreter teardown after all work is done (docs/ddp.md)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def parse_setting(item: str) -> dict:
    """``"task.field=value"`` (value as JSON, or a bare word as a string) -> ``{field: value}``.

    >>> parse_setting("digits_wd.weight_decay=0"), parse_setting("digits_wd.schedule=cosine")
    ({'weight_decay': 0}, {'schedule': 'cosine'})
    """
    target, _, value = item.partition("=")
    task, _, field = target.partition(".")
    if not (task in TASKS and field and value):
        raise SystemExit(f"--set expects TASK.FIELD=VALUE with TASK in {list(TASKS)}, got {item!r}")
    try:
        return {field: json.loads(value)}
    except json.JSONDecodeError:
        return {field: value}


def run_matrix(tasks, methods, seeds, worlds, out: str, overrides: dict | None = None) -> None:
    """Run every missing (task, method, seed) for each world size; results land in ``out``."""
    os.makedirs(out, exist_ok=True)
    for world in worlds:
        runs = [(t, m, s) for t in tasks for s in seeds for m in methods
                if not os.path.exists(os.path.join(out, run_name(t, m, s, world) + ".json"))]
        if not runs:
            continue
        logger.info("world %d: %d runs", world, len(runs))
        ctx = mp.start_processes(_worker, args=(world, _free_port(), runs, out, overrides or {}), nprocs=world,
                                 join=False, start_method="spawn")
        while not ctx.join():
            pass


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--epochs", type=int, default=None, help="override every task's epochs (quick looks)")
    parser.add_argument("--set", action="append", default=[], metavar="TASK.FIELD=VALUE",
                        help="change one field of a task (JSON value), e.g. digits_wd.schedule='\"cosine\"' or "
                             "digits_wd.weight_decay=0; repeatable (ablations)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = {t: {"epochs": args.epochs} for t in args.tasks} if args.epochs else {}
    for item in args.set:
        overrides.setdefault(item.split(".", 1)[0], {}).update(parse_setting(item))
    run_matrix(args.tasks, args.methods, args.seeds, args.worlds, args.out, overrides)
