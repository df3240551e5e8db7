"""The main job (``make demo``): what gradsparse is for, on an emulated 2-node cluster at 1 Gbit/s.

    python -m benchmarks.demo                      # what `make demo` runs: ResNet-50 shapes, 2 nodes, 1 Gbit/s
    python -m benchmarks.demo --rate 100mbit       # a slower network
    python -m benchmarks.demo --loopback --model mlp --steps 2   # a quick look, no namespaces
    python -m benchmarks.demo --nodes 2 --ranks-per-node 2       # 2 nodes of 2 ranks, only the link between shaped

DDP trains a ResNet-50-shaped model (25.6M parameters, benchmarks/bench_models.py) on two nodes,
each a network namespace joined by a veth link shaped to ``--rate`` with tc (launch/cluster.py;
needs root and iproute2, else both ranks run on loopback without shaping, and the screen says
so). The gradients go out four ways, one after the other in one run, same seed and data:
dense fp32 allreduce, PyTorch's ``fp16_compress_hook``, PyTorch's PowerSGD (rank 4, one DDP
bucket: with several it aborts under gloo) and gradsparse DGC at 0.1 % density; first, the same
step without communication (the floor), last, DGC as it runs during its first warm-up stage (25 %
density). The steps are benchmarks/ddp_bench.py's,
the cluster and the run are benchmarks/cluster_bench.py's ``run_point``; this file adds the
progress bar, the table, the JSON and the plot.

DGC 0.1 % is measured in steady state (``DGC(0.001, warmup=None)``): its default warm-up lasts
the first 1,000 optimizer steps (gradsparse.schedule.DEFAULT_WARMUP_STEPS), longer than this
run, and at 25 % density a step costs about what a dense one does. The last line shows that.

Output: the table on screen, ``<out>/demo.json`` and ``<out>/demo.png`` (default
benchmarks/results/demo/), the torchrun logs in ``<out>/logs/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import socket
import sys
import textwrap
import threading
import time
import types

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from benchmarks import cluster_report
from benchmarks.bench_models import MODELS, make_model
from benchmarks.cluster_bench import load_average, run_point
from benchmarks.ddp_bench import METHODS
from gradsparse.schedule import DEFAULT_WARMUP_STEPS
from launch.cluster import unsupported_reason

logger = logging.getLogger("demo")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_METHODS = "compute,dense,fp16,powersgd4,dgc0.1,dgc0.1warm"
LABELS = {"dgc0.1": "gradsparse DGC 0.1 % (steady state *)", "powersgd4": "PowerSGD rank 4 (one bucket)"}
NOTE = (f"* DGC 0.1 % is measured in steady state, DGC(0.001, warmup=None): what a job sees after its first "
        f"{DEFAULT_WARMUP_STEPS:,} optimizer steps. DGC(0.001) warms up over those steps (density 25 %, 6.25 %, "
        f"1.6 %, 0.4 %, 250 steps each), longer than this run; the warm-up line is its first stage (25 %). Optimizers: SGD momentum 0.9 for dense, fp16 and PowerSGD; momentum 0 "
        f"for DGC, whose momentum is in the compressor. PowerSGD runs with one DDP bucket (with several, PyTorch's hook "
        f"aborts under gloo), so it does not overlap communication with the backward pass.")


class _StepBar:
    """The progress bar as run_point sees it: it counts jobs, the demo counts steps (from the progress lines)."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def set_postfix_str(self, s: str) -> None:
        self.bar.set_postfix_str(s)

    def update(self, n: int = 1) -> None:
        pass


def _follow(path: str, bar: tqdm, stop: threading.Event) -> None:
    """Advance ``bar`` for every ``progress <method> <step> <steps>`` line rank 0 appends to the log."""
    pos = os.path.getsize(path) if os.path.exists(path) else 0
    while not stop.is_set():
        if os.path.exists(path):
            with open(path) as f:
                f.seek(pos)
                chunk = f.read()
            end = chunk.rfind("\n") + 1  # whole lines only
            pos += len(chunk[:end].encode())
            for line in chunk[:end].splitlines():
                parts = line.split()
                if len(parts) == 4 and parts[0] == "progress":
                    bar.set_description_str(parts[1])
                    bar.update(1)
        stop.wait(0.3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=MODELS)
    parser.add_argument("--rate", default="1gbit", help="link rate per direction, tc syntax (default 1gbit)")
    parser.add_argument("--nodes", type=int, default=2, help="nodes (emulated, one network namespace each)")
    parser.add_argument("--ranks-per-node", type=int, default=1,
                        help="ranks per node (their traffic inside the node is not shaped)")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"from {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (PowerSGD needs 3)")
    parser.add_argument("--batch", type=int, default=2, help="per-rank batch (32x32 images for resnet50)")
    parser.add_argument("--loopback", action="store_true", help="no namespaces: both ranks on loopback, unshaped")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "demo"))
    parser.add_argument("--port", type=int, default=None,
                        help="rendezvous port (default: 29540 in the namespaces, a free one on loopback)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before the torchrun job is killed")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(set(methods) - set(METHODS))}; choose from {METHODS}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _exit_on_signal)  # unwinds, so the namespaces and the ranks are removed
    log_dir = os.path.join(args.out, "logs")
    os.makedirs(log_dir, exist_ok=True)

    reason = "--loopback was given" if args.loopback else unsupported_reason()
    rate = "loopback" if reason else args.rate
    numel = sum(p.numel() for p in make_model(args.model).parameters())
    world = args.nodes * args.ranks_per_node
    where = (f"{args.nodes} emulated nodes (network namespaces) x {args.ranks_per_node} rank(s), links between nodes "
             f"shaped to {args.rate} with tc" if not reason
             else f"{world} ranks on this machine's loopback, NO link shaping")
    ranks = f"{args.nodes} nodes x {args.ranks_per_node} rank(s)" if not reason else f"{world} ranks"
    print(f"gradsparse demo: DDP, {args.model} ({numel:,} parameters), {where}; {len(methods)} methods x "
          f"({args.warmup} untimed + {args.steps} timed steps), batch {args.batch} per rank, one thread per rank.",
          flush=True)
    if reason:
        print(f"NOTE: emulated cluster unavailable: {reason}. Running on loopback instead: step times measure this "
              f"machine, not a {args.rate} network (on loopback the network is nearly free, so every method steps "
              "about as fast as its computation); bytes per step are the same as on a network.", flush=True)
    load_before = load_average()
    print(f"load average before: {' '.join(map(str, load_before))} (on {os.cpu_count()} cores)", flush=True)

    port = args.port or (_free_port() if reason else 29540)  # loopback ports are shared with every other job
    opts = types.SimpleNamespace(skip_comm=True, models=args.model, methods=",".join(methods), steps=args.steps,
                                 slow_steps=None, warmup=args.warmup, timeout=args.timeout, port=port)
    log_path = os.path.join(log_dir, f"{rate}_w{world}.log" if args.ranks_per_node == 1 else
                            f"{rate}_{args.nodes}x{args.ranks_per_node}.log")
    stop = threading.Event()
    started = time.monotonic()
    with logging_redirect_tqdm(), tqdm(total=len(methods) * (args.warmup + args.steps), desc="starting",
                                       unit="step", dynamic_ncols=True) as bar:
        follower = threading.Thread(target=_follow, args=(log_path, bar, stop), daemon=True)
        follower.start()
        try:
            point = run_point(rate, args.nodes, opts, log_dir, _StepBar(bar),
                              ddp_args=["--batch", str(args.batch), "--progress"], ranks_per_node=args.ranks_per_node)
        except (RuntimeError, TimeoutError) as err:  # the namespaces are gone already (run_point's with block)
            logger.error("%s", err)
            return 1
        except (KeyboardInterrupt, SystemExit) as stop_signal:  # Ctrl-C, SIGTERM
            logger.error("interrupted: the ranks were stopped%s", "" if reason else " and the namespaces removed")
            return 130 if isinstance(stop_signal, KeyboardInterrupt) else stop_signal.code
        finally:
            stop.set()
            follower.join()
    elapsed = time.monotonic() - started

    link = point.get("link")
    link_text = (f"{args.rate} links, {link['bits_per_s'] / 1e6:,.0f} Mbit/s measured (one TCP stream)" if link
                 else "loopback, unshaped")
    results = {"meta": {"command": " ".join(["python -m benchmarks.demo", *(sys.argv[1:] if argv is None else argv)]),
                        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "host": platform.node(), "cpus": os.cpu_count(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "seconds": round(elapsed, 1)},
               "mode": "loopback" if reason else "emulated", "loopback_reason": reason, "model": args.model,
               "parameters": numel, "note": NOTE, "point": point,
               "table": cluster_report.point_rows(point, args.model, LABELS)}
    json_path = os.path.join(args.out, "demo.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    title = (f"{args.model} ({numel / 1e6:.1f}M parameters), {ranks}, {link_text}; batch {args.batch}/rank, "
             f"{args.steps} timed steps after {args.warmup}\nload average {point['load_before']} before, "
             f"{point['load_after']} after (shared cores: absolute times are noisy). DGC 0.1 %: steady state, after "
             f"the warm-up's {DEFAULT_WARMUP_STEPS:,} steps")
    png_path = cluster_report.point_plot(point, args.model, os.path.join(args.out, "demo.png"), title, LABELS)

    print(f"\n{args.model}, {ranks}, {link_text}; median step of the slowest rank over {args.steps} steps after "
          f"{args.warmup}; speed-up and fewer bytes against dense in this run")
    print(cluster_report.point_table(point, args.model, wire=not reason, labels=LABELS))
    print(textwrap.fill(
        "sent = bytes each rank hands to the collectives per step (payload; gradsparse: state.last_stats.bytes_sent; "
        "PowerSGD: its own element count x 4)" + ("; wire = node 0's interface transmit counter (headers and "
                                                  "DDP's broadcast of BatchNorm buffers included)" if not reason else
                                                  "; wire bytes are not shown: on loopback the counter is shared with "
                                                  "every process on this machine"), 120))
    print(textwrap.fill(NOTE, 120))
    print(f"load average: {' '.join(map(str, point['load_before']))} before, {' '.join(map(str, point['load_after']))} "
          f"after, on {os.cpu_count()} cores shared with other jobs: absolute times are noisy, compare within the run.")
    if reason:
        print(f"LOOPBACK: {reason}; no link shaping, so the step times say little about a real network.")
    print(f"took {elapsed:.0f} s. results: {json_path}\nplot: {png_path}\nlogs: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
