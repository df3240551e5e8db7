"""Soak benchmark: thousands of DDP steps at world size 3; RSS of every rank over time.

Runs the worker of tests/multiprocess/test_long_run.py (DGC with warm-up, and Threshold with a rank
that sends nothing every other step; several buckets of different sizes) and prints,
per method, every rank's resident set size at each probe, plus the growth from the
first probe to the end, both as is and after ``malloc_trim(0)`` (glibc keeps freed pages
of the varying-size payload buffers; trimmed RSS is what is really held). JSON in
benchmarks/results/soak.json.

Example::

    .venv/bin/python -m benchmarks.soak --steps 5000 --probe-every 500
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from tests.distributed import run_world
from tests.multiprocess.test_long_run import METHODS, long_run_worker

logger = logging.getLogger("benchmarks.soak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--probe-every", type=int, default=500)
    parser.add_argument("--history-size", type=int, default=10_000,
                        help="the hook's statistics history (about 1 KB per step until full)")
    parser.add_argument("--out", default="benchmarks/results/soak.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = {}
    for name in METHODS:
        started = time.monotonic()
        logger.info("%s: %d steps at world size 3 ...", name, args.steps)
        ranks = run_world(long_run_worker, 3, args.steps, args.probe_every, (name,), args.history_size,
                          timeout=24 * 3600)
        results[name] = {"seconds": time.monotonic() - started,
                         "rss_mib": [{step: p["rss_mib"] for step, p in r[name]["probes"].items()} for r in ranks],
                         "trimmed_mib": [{step: p["trimmed_mib"] for step, p in r[name]["probes"].items()}
                                         for r in ranks],
                         "ranks_identical": len({r[name]["probes"][args.steps]["hash"] for r in ranks}) == 1}
        logger.info("%s: done in %.0f s", name, results[name]["seconds"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"steps": args.steps, "history_size": args.history_size, "load": os.getloadavg(), "results": results}, f, indent=1)
    probes = sorted(results[next(iter(results))]["rss_mib"][0])
    print("RSS in MiB, as is / after malloc_trim(0)\n")
    print("| method | rank | " + " | ".join(f"step {s}" for s in probes) + " | growth after first probe |")
    print("|---|---|" + "---|" * len(probes) + "---|")
    for name, res in results.items():
        for rank, (rss, trimmed) in enumerate(zip(res["rss_mib"], res["trimmed_mib"], strict=True)):
            print(f"| {name} | {rank} | " + " | ".join(f"{rss[s]:.1f} / {trimmed[s]:.1f}" for s in probes) +
                  f" | {rss[probes[-1]] - rss[probes[0]]:+.1f} / {trimmed[probes[-1]] - trimmed[probes[0]]:+.1f} |")
    print(f"\nranks bit-identical at step {args.steps}: " +
          ", ".join(f"{n}: {r['ranks_identical']}" for n, r in results.items()))
    os._exit(0)


if __name__ == "__main__":
    main()
