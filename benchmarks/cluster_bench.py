"""The whole bandwidth benchmark on emulated clusters, in one command.

For every (link rate, world size): bring up an emulated cluster (launch/cluster.py),
measure the achieved link rate, run the communication microbenchmark
(benchmarks/comm_bench.py) and the end-to-end DDP benchmark (benchmarks/ddp_bench.py,
every method in one run) for each model with one torchrun per node, tear the
cluster down. Results are appended to ``<out>/results.json`` after every point
(``--resume`` skips points already there), then the tables and plots are written
by benchmarks/cluster_report.py.

    make cluster-bench            # the full matrix: 100 Mbit/s, 1 and 10 Gbit/s; 2 and 4 nodes; both models
    make cluster-bench-small      # a few minutes: 1 and 10 Gbit/s, 2 nodes, LSTM, small comm sizes
    python -m benchmarks.cluster_bench --rates 1gbit --worlds 4 --models resnet50
    python -m benchmarks.cluster_bench --rates 1gbit --shapes 4x1,2x2,1x4 --models resnet50   # equal world size

A shape ``NxL`` is N nodes of L ranks (one ``torchrun --nproc-per-node L`` per node);
only the links between nodes are shaped. ``1xL`` is one node: its L ranks on this
machine's loopback, nothing shaped (no link between nodes is crossed).

Without root or iproute2 it says why and runs on loopback without shaping (``rate`` "loopback").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import torch
from tqdm import tqdm

from benchmarks import cluster_report
from launch.cluster import ClusterUnavailable, EmulatedCluster, unsupported_reason

logger = logging.getLogger("cluster_bench")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _descendants(pid: int) -> dict[int, bytes]:
    """pid -> command line of every process below ``pid`` (from /proc)."""
    found = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    found[child] = f.read()
            except OSError:
                continue
            found.update(_descendants(child))
    return found


def _stop_torchrun(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM a loopback torchrun (it stops its ranks, which run in sessions of their own), then SIGKILL the rest."""
    ranks = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid, cmdline in ranks.items():  # only if still the process we saw (pids are reused)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() != cmdline:
                    continue
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"4x1,2x2"`` -> [(4, 1), (2, 2)]: (nodes, ranks per node).

    >>> parse_shapes("4x1,2x2,1x4")
    [(4, 1), (2, 2), (1, 4)]
    """
    shapes = []
    for item in text.split(","):
        try:
            nodes, local = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"a shape is NODESxRANKS_PER_NODE such as 2x2, got {item!r}") from None
        if nodes < 1 or local < 1 or nodes * local < 2:
            raise ValueError(f"shape {item!r}: nodes and ranks per node must be >= 1, and 2 ranks at least")
        shapes.append((nodes, local))
    return shapes


def shape_label(nodes: int, local: int) -> str:
    """``4 nodes`` (one rank each, as the older results say) or ``2 nodes x 2 ranks``."""
    if local == 1:
        return f"{nodes} nodes"
    return f"{nodes} node{'s' if nodes > 1 else ''} x {local} ranks"


def run_job(cluster: EmulatedCluster | None, world: int, script: str, args: list[str], log_path: str,
            timeout: float, port: int) -> None:
    """Run ``script`` under torchrun on the cluster (one torchrun per node, with the cluster's ranks per node), or
    ``world`` ranks on loopback if None; output to the log."""
    with open(log_path, "a") as log:
        log.write(f"\n=== {script} {' '.join(args)}\n")
        log.flush()
        if cluster is not None:
            codes = cluster.run_torchrun(script, args, port=port, timeout=timeout, stdout=log, stderr=log)
        else:
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(world),
                    "--master-addr", "127.0.0.1", "--master-port", str(port), script, *args]
            with subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=log, start_new_session=True) as proc:
                try:
                    codes = [proc.wait(timeout=timeout)]
                except BaseException as err:  # timeout, Ctrl-C, SIGTERM: stop torchrun and its ranks
                    _stop_torchrun(proc)
                    if isinstance(err, subprocess.TimeoutExpired):
                        raise TimeoutError(f"{script} did not finish within {timeout} s on loopback") from err
                    raise
    if any(codes):
        raise RuntimeError(f"{script} failed on the cluster (exit codes {codes}); see {log_path}")


def run_point(rate: str, nodes: int, opts, log_dir: str, bar: tqdm, ddp_args: list[str] = (),
              ranks_per_node: int = 1) -> dict:
    """One (rate, nodes x ranks per node) point: bring the cluster up, measure the link, run the benchmarks,
    tear it down. One node (or rate "loopback") runs every rank on this machine's loopback.

    ``bar`` gets one update per job; ``ddp_args`` are passed on to benchmarks/ddp_bench.py.
    """
    world = nodes * ranks_per_node
    point = {"rate": rate, "world": world, "nodes": nodes, "ranks_per_node": ranks_per_node,
             "load_before": load_average(), "started": time.strftime("%H:%M:%S")}
    cluster = None if rate == "loopback" or nodes == 1 else EmulatedCluster(nodes, rate, ranks_per_node=ranks_per_node)
    with tempfile.TemporaryDirectory() as tmp, (cluster if cluster is not None else _null()):
        link_bps = None
        if cluster is not None:
            point["link"] = cluster.measure_rate(seconds=1.5)
            link_bps = point["link"]["bits_per_s"]
            point["burst_bytes"] = cluster.burst
        log = os.path.join(log_dir, f"{rate}_w{world}.log" if ranks_per_node == 1 else
                           f"{rate}_{nodes}x{ranks_per_node}.log")
        link_arg = ["--link-bps", str(link_bps)] if link_bps else []
        if not opts.skip_comm:
            bar.set_postfix_str(f"{rate} {nodes}x{ranks_per_node} comm")
            out = os.path.join(tmp, "comm.json")
            run_job(cluster, world, "benchmarks/comm_bench.py", ["--sizes", opts.comm_sizes, "--densities",
                    opts.densities, "--repeats", str(opts.comm_repeats), "--out", out, *link_arg], log,
                    opts.timeout, opts.port)
            with open(out) as f:
                point["comm"] = json.load(f)
            bar.update(1)
        point["ddp"] = {}
        for model in opts.models.split(","):
            bar.set_postfix_str(f"{rate} {nodes}x{ranks_per_node} {model}")
            out = os.path.join(tmp, f"ddp_{model}.json")
            steps = opts.steps if opts.slow_steps is None or rate == "loopback" or nodes == 1 or \
                _bps(rate) >= 1e9 else opts.slow_steps
            run_job(cluster, world, "benchmarks/ddp_bench.py", ["--model", model, "--methods", opts.methods,
                    "--steps", str(steps), "--warmup", str(opts.warmup), "--out", out, *link_arg, *ddp_args], log,
                    opts.timeout, opts.port)
            with open(out) as f:
                point["ddp"][model] = json.load(f)
            bar.update(1)
    point["load_after"] = load_average()
    return point


def point_key(point: dict) -> tuple[str, int, int]:
    """(rate, nodes, ranks per node); older results have one rank per node and only ``world``."""
    local = point.get("ranks_per_node", 1)
    return point["rate"], point.get("nodes", point["world"] // local), local


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _bps(rate: str) -> float:
    from launch.linkrate import parse_rate

    return parse_rate(rate)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="1gbit,10gbit,100mbit", help="link rates (tc syntax), run in this order")
    parser.add_argument("--worlds", default="4,2", help="node counts (one rank per node)")
    parser.add_argument("--shapes", default=None,
                        help="NODESxRANKS_PER_NODE list, e.g. 2x2 or 4x1,2x2,1x4 (replaces --worlds)")
    parser.add_argument("--models", default="resnet50,lstm")
    parser.add_argument("--methods", default="compute,dense,fp16,powersgd1,powersgd4,topk1,dgc0.1")
    parser.add_argument("--steps", type=int, default=5, help="timed DDP steps per method")
    parser.add_argument("--slow-steps", type=int, default=3, help="timed steps below 1 Gbit/s (dense steps take s)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--comm-sizes", default="1000000,5000000,25000000")
    parser.add_argument("--densities", default="0.001,0.01")
    parser.add_argument("--comm-repeats", type=int, default=5)
    parser.add_argument("--skip-comm", action="store_true")
    parser.add_argument("--out", default="docs/cluster", help="folder for results.json, results.md and img/")
    parser.add_argument("--log-dir", default="benchmarks/results/cluster_logs")
    parser.add_argument("--resume", action="store_true", help="keep the points already in <out>/results.json")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per torchrun job")
    parser.add_argument("--port", type=int, default=29530)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.makedirs(opts.out, exist_ok=True)
    os.makedirs(opts.log_dir, exist_ok=True)
    results_path = os.path.join(opts.out, "results.json")
    rates = opts.rates.split(",")
    reason = unsupported_reason()
    if reason:
        logger.warning("emulated cluster unavailable: %s. Running on loopback WITHOUT link shaping instead.", reason)
        rates = ["loopback"]
    try:
        shapes = parse_shapes(opts.shapes) if opts.shapes else [(int(w), 1) for w in opts.worlds.split(",")]
    except ValueError as err:
        parser.error(str(err))
    results = {"points": []}
    if opts.resume and os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    results["meta"] = {"command": "python -m benchmarks.cluster_bench " + " ".join(argv or sys.argv[1:]),
                       "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    done = {point_key(p) for p in results["points"]}
    todo = [(r, n, l) for r in rates for n, l in shapes if (r, n, l) not in done]
    per_point = len(opts.models.split(",")) + (0 if opts.skip_comm else 1)
    with tqdm(total=len(todo) * per_point, desc="cluster bench", unit="job") as bar:
        for rate, nodes, local in todo:
            try:
                point = run_point(rate, nodes, opts, opts.log_dir, bar, ranks_per_node=local)
            except (RuntimeError, TimeoutError, ClusterUnavailable) as err:
                logger.error("point %s, %s failed: %s", rate, shape_label(nodes, local), err)
                results.setdefault("failed", []).append({"rate": rate, "world": nodes * local, "nodes": nodes,
                                                         "ranks_per_node": local, "error": str(err)})
                continue
            results["points"] = [p for p in results["points"] if point_key(p) != (rate, nodes, local)] + [point]
            with open(results_path, "w") as f:
                json.dump(results, f, indent=1)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    cluster_report.write_report(results, opts.out)
    logger.info("results: %s, tables: %s, plots: %s", results_path, os.path.join(opts.out, "results.md"),
                os.path.join(opts.out, "img"))


if __name__ == "__main__":
    main()
