"""Fault benchmark: repeat the fault tests many times and time how long survivors take to error.

Each run starts a real gloo world (world size 3 on loopback) and injects one fault:

* ``sigkill``: one rank SIGKILLs itself in its sparse hook, at a random step and bucket,
  before reducing the bucket or right after issuing its payload allgather;
* ``stall``: one rank stalls in its hook for the collective timeout + 10 s (alive, silent):
  the others must time out;
* ``mismatch-config`` / ``mismatch-dtype`` / ``mismatch-step``: one rank runs another
  compressor ratio, another wire dtype, or another step counter (time to error: from the
  start of the first backward pass to the error, on the slowest rank).

A run passes when every surviving rank ends with a gradsparse error (CommunicationError,
or StateMismatchError naming the mismatch) within the collective timeout plus 5 s, and
the killed rank is the only one that died. Results: a markdown table on stdout and
JSON in benchmarks/results/faults.json.

Example::

    .venv/bin/python -m benchmarks.faults --runs 20 --collective-timeout 20
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import time

import torch

from tests.distributed import run_world_outcomes
from tests.multiprocess.test_faults import disagreeing_rank, train_until_fault

logger = logging.getLogger("benchmarks.faults")


def sigkill_run(rng: random.Random, collective_timeout: float) -> dict:
    compressor = rng.choice(["dgc", "threshold"])
    when = rng.choice(["before", "after"])
    step, bucket = rng.randint(1, 5), rng.randint(0, 2)
    with tempfile.TemporaryDirectory() as folder:
        os.environ["GRADSPARSE_KILL_FILE"] = os.path.join(folder, "killed.pt")
        started = time.time()
        outcomes = run_world_outcomes(train_until_fault, 3, 2, step, compressor, when, bucket,
                                      timeout=collective_timeout + 120, collective_timeout=collective_timeout)
        killed_at = torch.load(os.environ["GRADSPARSE_KILL_FILE"]) if os.path.exists(
            os.environ["GRADSPARSE_KILL_FILE"]) else started
    survivors = outcomes[:2]
    ok = outcomes[2]["exitcode"] == -9 and all(
        o["exitcode"] == 1 and "CommunicationError" in o.get("error", "") for o in survivors)
    delays = [o["time"] - killed_at for o in survivors if "time" in o]
    return {"fault": "sigkill", "detail": f"{compressor}, {when}, step {step}, bucket {bucket}", "ok": ok,
            "seconds_to_error": max(delays) if delays else None,
            "errors": [o.get("error", "")[:160] for o in survivors]}


def stall_run(rng: random.Random, collective_timeout: float) -> dict:
    step, bucket = rng.randint(1, 5), rng.randint(0, 2)
    with tempfile.TemporaryDirectory() as folder:
        os.environ["GRADSPARSE_KILL_FILE"] = os.path.join(folder, "stalled.pt")
        os.environ["GRADSPARSE_HANG_SECONDS"] = str(collective_timeout + 10)
        outcomes = run_world_outcomes(train_until_fault, 3, 2, step, "dgc", "hang", bucket,
                                      timeout=collective_timeout + 120, collective_timeout=collective_timeout)
        stalled_at = torch.load(os.environ["GRADSPARSE_KILL_FILE"])
    survivors = outcomes[:2]
    ok = all(o["exitcode"] == 1 and "CommunicationError" in o.get("error", "") for o in outcomes)
    delays = [o["time"] - stalled_at for o in survivors if "time" in o]
    return {"fault": "stall", "detail": f"dgc, step {step}, bucket {bucket}", "ok": ok and max(delays) < collective_timeout + 5,
            "seconds_to_error": max(delays) if delays else None,
            "errors": [o.get("error", "")[:160] for o in survivors]}


def mismatch_run(what: str, collective_timeout: float) -> dict:
    outcomes = run_world_outcomes(disagreeing_rank, 3, what, timeout=collective_timeout + 120,
                                  collective_timeout=collective_timeout)
    seen = [o.get("result", {}) for o in outcomes]
    named = {"config": "configuration", "wire_dtype": "wire dtype", "step": "step"}[what]
    ok = all(o["exitcode"] == 0 for o in outcomes) and all(
        s.get("error") and f"disagree on the {named}" in s["error"] for s in seen)
    return {"fault": f"mismatch-{what.replace('_', '-')}", "detail": f"rank 2 differs in {named}", "ok": ok,
            "seconds_to_error": max((s.get("seconds", float("nan")) for s in seen), default=None),
            "errors": [str(s.get("error"))[:160] for s in seen]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per fault kind")
    parser.add_argument("--collective-timeout", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", default="sigkill,stall,mismatch", help="comma-separated kinds to run")
    parser.add_argument("--out", default="benchmarks/results/faults.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rng = random.Random(args.seed)
    kinds = args.faults.split(",")
    plan = [(k, None) for k in ("sigkill", "stall") if k in kinds for _ in range(args.runs)]
    if "mismatch" in kinds:
        plan += [("mismatch", w) for w in ("config", "wire_dtype", "step") for _ in range(args.runs)]
    results = []
    for i, (kind, what) in enumerate(plan, 1):
        if kind == "mismatch":
            result = mismatch_run(what, args.collective_timeout)
        else:
            result = (sigkill_run if kind == "sigkill" else stall_run)(rng, args.collective_timeout)
        results.append(result)
        logger.info("[%d/%d] %s (%s): %s in %.1f s", i, len(plan), result["fault"], result["detail"],
                    "ok" if result["ok"] else "FAILED", result["seconds_to_error"] or float("nan"))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"collective_timeout": args.collective_timeout, "load": os.getloadavg(), "runs": results}, f,
                  indent=1)
    print("| fault | runs | outcome as specified | time to error: median / max (s) |\n|---|---|---|---|")
    for fault in dict.fromkeys(r["fault"] for r in results):
        rows = [r for r in results if r["fault"] == fault]
        times = [r["seconds_to_error"] for r in rows if r["seconds_to_error"] is not None]
        print(f"| {fault} | {len(rows)} | {sum(r['ok'] for r in rows)}/{len(rows)} | "
              f"{statistics.median(times):.1f} / {max(times):.1f} |")
    os._exit(0 if all(r["ok"] for r in results) else 1)


if __name__ == "__main__":
    main()
