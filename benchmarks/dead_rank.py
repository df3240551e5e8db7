"""Dead-rank benchmark: a rank SIGKILLed at step 3 under horovodrun --gloo and mpirun, repeated.

Each run launches tests/dead_rank_worker.py with 4 ranks (DGC 1 %, the ``flat`` path or the
``hierarchical`` one as 2 emulated nodes x 2 ranks); the victim kills itself at step 3. Cases:
Horovod flat (victim 1) and hierarchical (victim 3), mpirun hierarchical (victim 3, Open MPI's
default: mpirun ends the job), and mpirun ``--with-ft ulfm`` flat (victim 1) and hierarchical
(victim 3). Per run: the launcher's exit status, seconds from the kill to its exit, and the
survivors that raised (their error type and seconds from the kill). A survivor that raised waits
2 s (tests/dead_rank_worker.py's ``LINGER_S``) before it exits, which the launcher's time includes
under ``--with-ft ulfm``. Results: a markdown table on stdout and JSON in
benchmarks/results/dead_rank.json.

Example::

    .venv/bin/python -m benchmarks.dead_rank --runs 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile

from tests.docblocks import ROOT
from tests.multiprocess.test_horovod import horovod_cmd
from tests.multiprocess.test_mpi import mpi_cmd
from tests.subprocesses import launch_with_a_dead_rank

logger = logging.getLogger("benchmarks.dead_rank")

WORLD = 4
CASES = {  # name: (launcher command builder, worker backend, path, victim)
    "horovod flat": (lambda *a: horovod_cmd(WORLD, *a), "horovod", "flat", 1),
    "horovod hierarchical": (lambda *a: horovod_cmd(WORLD, *a), "horovod", "hierarchical", 3),
    "mpirun hierarchical": (lambda *a: mpi_cmd(WORLD, *a), "mpi", "hierarchical", 3),
    "mpirun --with-ft ulfm flat": (lambda *a: _ulfm(mpi_cmd(WORLD, *a)), "mpi", "flat", 1),
    "mpirun --with-ft ulfm hierarchical": (lambda *a: _ulfm(mpi_cmd(WORLD, *a)), "mpi", "hierarchical", 3),
}


def _ulfm(cmd: list[str]) -> list[str]:
    return cmd[:1] + ["--with-ft", "ulfm"] + cmd[1:]


def run_case(name: str, timeout: float) -> dict:
    build, backend, path, victim = CASES[name]
    with tempfile.TemporaryDirectory() as folder:
        cmd = build("-m", "tests.dead_rank_worker", backend, path, str(victim), folder)
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
        proc, after_kill_s, outcomes = launch_with_a_dead_rank(cmd, folder, timeout, ROOT, env)
    return {"returncode": proc.returncode, "exit_after_kill_s": after_kill_s,
            "raised": {r: (o["type"], o["after_kill_s"]) for r, o in sorted(outcomes.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=120.0, help="per launch; a hang fails the run")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "dead_rank.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load = os.getloadavg()
    results = {name: [run_case(name, args.timeout) for _ in range(args.runs)] for name in CASES}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"runs": args.runs, "loadavg_at_start": load, "results": results}, f, indent=1)
    logger.info("load average at start: %.1f %.1f %.1f", *load)
    logger.info("| case | runs | launcher exit status | kill -> launcher exit, median / max s | survivors that raised "
                "CommunicationError, per run | kill -> their error, median / max s |")
    logger.info("|---|---|---|---|---|---|")
    for name, runs in results.items():
        exits = [r["exit_after_kill_s"] for r in runs]
        codes = sorted({r["returncode"] for r in runs})
        raised = [[r_ for r_, (t, _) in r["raised"].items() if t == "CommunicationError"] for r in runs]
        other = sorted({t for r in runs for t, _ in r["raised"].values()} - {"CommunicationError"})
        times = [s for r in runs for _, s in r["raised"].values()]
        took = f"{statistics.median(times):.2f} / {max(times):.2f}" if times else "-"
        logger.info("| %s | %d | %s | %.2f / %.2f | %s%s | %s |", name, len(runs), codes, statistics.median(exits),
                    max(exits), raised, f" (also: {other})" if other else "", took)

if __name__ == "__main__":
    main()
