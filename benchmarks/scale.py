"""A projection past this machine: step time of dense, fp16, PowerSGD, flat and hierarchical DGC at 8-1,024 nodes.

    python -m benchmarks.scale measure     # emulated clusters here: fit the links, time the kernels (a few minutes)
    python -m benchmarks.scale             # validate against the emulated points, project, write tables and plots

The model is gradsparse's own (:mod:`gradsparse.cost`: alpha-beta links per level;
:mod:`gradsparse.stepmodel`: DDP buckets, the hook's synchronous work, collectives queued
behind the backward pass). Two uses of it:

1. **Validation** on this machine. Inputs, all measured here: the links of the emulated
   clusters and the CPU their collectives take per rank (``measure``: ``python -m
   gradsparse.advise`` under ``launch/cluster.py`` at 1 and 10 Gbit/s, and 2 nodes x 2 ranks,
   fitted with ``cost.LinkModel``), the kernels (one process, and ``CORES`` copies at once),
   PyTorch's own PowerSGD hook on ResNet-50's shapes, DDP's own work (a one-rank DDP step against
   the compute-only step), and from each measured run its own compute-only step and gradsparse's
   compression time (``state.last_stats.compress_s``, as the hook reported it in that run).
   Output: the predicted step of every emulated point and its error against the measured one.
   The points are ``benchmarks/cluster_bench.py`` results given with ``--emulated``; the points
   published in ``/work/shared/DESIGN.md`` / issue 13 (2026-11-29, no raw data) are predicted as
   superseded and not counted. Several ranks sharing this machine's 2 cores: kernel costs are
   multiplied by ranks / cores (at least 1), and the step is at least the cores' bound
   (:func:`gradsparse.stepmodel.cpu_bound`); the compute time is the run's own.
2. **Projection** to nodes of 8 GPUs, with the assumptions in :data:`GPU` (each with
   where it comes from; none measured here: this machine has no GPU).

Writes ``<out>/results.json`` and ``<out>/results.md`` (default docs/scale/) and
``docs/img/scale_*.png``; docs/scale.md explains them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time

from gradsparse.cost import KernelCost, LinkModel, Topology
from gradsparse.model_shapes import BUILTIN, numel
from gradsparse.stepmodel import METHODS, Algorithms, CollectiveCpu, Kernels, ddp_buckets, step_time

logger = logging.getLogger("scale")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORES = 2                      # this machine: the emulated ranks share them

# ------------------------------------------------------------------------------------------- assumptions
GPU = {
    "ranks_per_node": {"value": 8, "source": "8 GPUs per node (DGX/HGX-class)"},
    "intra": {"latency_s": 5e-6, "bytes_per_s": 150e9,
              "source": "NVLink, 150 GB/s per direction: a conservative bus bandwidth for an NVLink node (below "
                        "NVLink 3's 300 GB/s per direction per GPU); 5 us per step"},
    "inter_efficiency": {"value": 0.9, "source": "achieved / line rate; the emulated 1 Gbit/s link gives 0.95"},
    "inter_latency_s": {"tcp": 30e-6, "rdma": 10e-6,
                        "source": "per message: ~30 us over TCP sockets at 10 and 25 Gbit/s, ~10 us with RDMA "
                                  "(InfiniBand / RoCE) at 100 and 400 Gbit/s; assumed, not measured"},
    "inter_rates_gbit": {"value": [10, 25, 100, 400], "source": "per node, shared by its 8 GPUs"},
    "hbm_bytes_per_s": {"value": 1.5e12, "source": "achieved HBM bandwidth of an A100-class GPU (2.0 TB/s spec)"},
    "passes": {"dgc": 8, "topk": 6, "fp16": 3, "powersgd": 10,
               "source": "4-byte passes over the gradient per step: DGC at issue 13's target (<= 8; 10-11 on "
                         "CPU with the fused bucket pipeline, 2026-11-30), TopK <= 6 (its target; 12-13 on CPU); "
                         "fp16: cast out and back (12 B); "
                         "PowerSGD rank 4: error feedback, 3 matrix products, the new error (~10 passes; its "
                         "24 flops per element are negligible)"},
    "unpack_per_pair_s": {"value": 0.05e-9, "source": "scatter-add of one received (index, value) pair: ~40 B of "
                                                      "random access at half the HBM bandwidth"},
    "compute_s": {"resnet50": 0.100, "transformer1b": 0.66,
                  "source": "ResNet-50: batch 256 per GPU at ~2,500 images/s (the order of published A100 "
                            "mixed-precision throughput); 1B transformer: 6 x 1.01e9 parameters x 16,384 tokens "
                            "per GPU (8 x 2,048) / 150 TFLOP/s achieved (48 % of A100 bf16 peak)"},
    "algorithms": {"allreduce": "tree", "allgather": "ring",
                   "source": "NCCL: trees for allreduce at scale (2 log2 p latency rounds), rings for allgather "
                             "(p - 1 rounds); gradsparse's flat path pads payloads to the largest and allgathers"},
}
NODES = [8, 16, 32, 64, 128, 256, 512, 1024]
PROJECTED = ["dense", "fp16", "powersgd4", "dgc0.1", "dgc0.1hier", "dgc0.1auto", "dgc0.1split"]
CROSSING = ("dgc0.1", "dgc0.1hier", "dgc0.1split")   # the DGC variants whose crossover with dense is tabled

# SUPERSEDED: emulated points published without raw data (quiet machine, 2026-11-29; DESIGN.md and issue 13):
# ResNet-50, batch 4 of 32x32, one thread per rank, median step over steps 3-11, an older build; compute =
# that run's compute-only step; compress = the hook's reported compression per step (115-145 ms: the
# midpoint). Replaced in the validation by a re-run of the same 2 x 1 points with benchmarks.cluster_bench
# (raw data: docs/scale/emulated-2x1.json; docs/scale.md); still predicted and listed as superseded.
PUBLISHED = [
    {"nodes": 2, "local": 1, "rate": "1gbit", "compute_ms": 249, "compress_ms": 130, "superseded": True,
     "steps": {"dense": 926, "fp16": 547, "powersgd4": 635, "topk1": 388, "dgc0.1": 399}},
    {"nodes": 2, "local": 1, "rate": "10gbit", "compute_ms": 249, "compress_ms": 130, "superseded": True,
     "steps": {"dense": 450, "fp16": 418, "dgc0.1": 391}},
]
# the 2 x 2 point of DESIGN.md (dense 1,542, DGC 798) has no compute-only step from its run: it is compared
# only through a run of our own (--emulated), whose compute-only step is measured beside it.
# gloo's alltoall on the emulated cluster (4 nodes at 1 Gbit/s, the split transport's pieces of a 25M-element
# bucket at 25 %: benchmarks/comm_bench.py), for the validation of the split transport's runs
ALLTOALL_COMM = "docs/scale/split-4x1-1gbit-comm.json"
BENCH_TO_MODEL = {"dense": "dense", "fp16": "fp16", "powersgd4": "powersgd4_1b", "topk1": "topk1",
                  "dgc0.1": "dgc0.1", "dgc0.1hier": "dgc0.1hier",
                  "dgc0.1warmar": "dgc25allreduce", "dgc0.1warmsplit": "dgc25split"}


# ---------------------------------------------------------------------------------------------- measure
SIZES = "16384,131072,1048576,4194304,16777216"     # fp32 elements per timed collective: 64 kB .. 64 MB
# ranks of the emulated cluster running collectives at once when advise times each level (all on this host)
ACTIVE = {"flat": lambda nodes, local: nodes * local, "intra": lambda nodes, local: nodes * local,
          "inter": lambda nodes, local: nodes}


def host_cpu(timings: list[dict], world: int, active: int) -> dict:
    """The host's CPU per rank and collective kind (busy CPU seconds of this whole host during each timed
    collective of ``world`` ranks, from advise's rows, over the ``active`` ranks running collectives then),
    fitted as CPU seconds per round and per byte through the busiest hop. On the emulated cluster every rank,
    and the kernel's packet work for the emulated links, run on this host.

    >>> rows = [{"op": "allreduce", "bytes": b, "host_cpu_s": 2 * (1e-4 + b / 1e9)} for b in (1e6, 4e6, 16e6)]
    >>> m = host_cpu(rows, world=2, active=2)["allreduce"]   # per rank: 2 rounds of 1e-4 / 2, 1e-9 s per byte
    >>> round(m["latency_s"] * 1e6, 1), round(m["bytes_per_s"] / 1e9, 3)
    (50.0, 1.0)
    """
    from gradsparse.cost import LinkModel, Observation
    from gradsparse.errors import InvalidConfigError

    out = {}
    for kind in ("allreduce", "allgather", "allreduce_fp16"):
        ring = "allreduce" if kind == "allreduce_fp16" else kind
        obs = [Observation.collective(ring, r["bytes"], world, r["host_cpu_s"] / active) for r in timings
               if r["op"] == kind and r.get("host_cpu_s") is not None and r["host_cpu_s"] > 0]
        try:
            out[kind] = LinkModel.fit(obs).as_dict()
        except InvalidConfigError:
            out[kind] = None
    return out


def measure(out_path: str, port: int = 29680) -> dict:
    """Fit the emulated links (advise under launch/cluster.py) and time the kernels (advise, one process)."""
    from tqdm import tqdm

    from launch.cluster import EmulatedCluster, unsupported_reason

    reason = unsupported_reason()
    if reason:
        raise SystemExit(f"emulated cluster unavailable: {reason}")
    configs = [(2, 1, "1gbit"), (2, 1, "10gbit"), (2, 1, "100mbit"), (2, 2, "1gbit")]
    inputs = {"links": {}, "load_before": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "host": platform.node()}
    tmp = tempfile.mkdtemp(prefix="scale-advise-")
    with tqdm(total=len(configs) + 1, desc="measure", unit="job") as bar:
        for nodes, local, rate in configs:
            key = f"{nodes}x{local}@{rate}"
            bar.set_postfix_str(key)
            path = os.path.join(tmp, f"{key}.json")
            with EmulatedCluster(nodes, rate, ranks_per_node=local) as cluster:
                achieved = cluster.measure_rate(seconds=1.0)["bits_per_s"]
                codes = cluster.run_torchrun("-m", ["gradsparse.advise", "--model", "mlp", "--repeats", "5",
                                                    "--sizes", SIZES, "--json", path], port=port, timeout=600,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if any(codes):
                raise RuntimeError(f"advise failed on {key}: exit codes {codes}")
            with open(path) as f:
                links = json.load(f)["links"]
            inputs["links"][key] = {level: v["model"] for level, v in links.items()}
            inputs["links"][key]["tcp_bits_per_s"] = achieved
            inputs["links"][key]["timings"] = {level: v["timings"] for level, v in links.items()}
            # the round through shared memory (intra_shared) is the ranks' own copies: no collective CPU to fit
            inputs["links"][key]["cpu"] = {level: v["cpu"] for level, v in links.items() if "cpu" in v}
            inputs["links"][key]["host_cpu"] = {level: host_cpu(v["timings"], v["world"], ACTIVE[level](nodes, local))
                                                for level, v in links.items() if "cpu" in v}
            bar.update(1)
        bar.set_postfix_str("kernels")
        inputs["kernels_cpu"] = _kernels(tmp, copies=1)[0]
        # the same, CORES copies at once: each rank of an emulated cluster shares the memory bandwidth and
        # caches with the others while it compresses (the compute-only step of each run already does)
        inputs["kernels_cpu_shared"] = {"copies": CORES, "runs": _kernels(tmp, copies=CORES)}
        inputs["ddp_overhead"] = _ddp_overhead(tmp, port)
        bar.update(1)
    inputs["load_after"] = list(os.getloadavg())
    with open(out_path, "w") as f:
        json.dump(inputs, f, indent=1)
    return inputs


def _ddp_overhead(tmp: str, port: int) -> dict:
    """DDP's own work per step on ResNet-50 (copying the gradients into its buckets and back): a one-rank DDP
    step with no hook against the same step without DDP (``benchmarks/ddp_bench.py``, one process, gloo; the
    allreduce of one rank moves nothing), per gradient element."""
    path = os.path.join(tmp, "ddp-world1.json")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                    "127.0.0.1", "--master-port", str(port + 1), "benchmarks/ddp_bench.py", "--model", "resnet50",
                    "--methods", "compute,dense", "--steps", "25", "--warmup", "3", "--out", path], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    with open(path) as f:
        steps = {m["method"]: m["step_s"]["median"] for m in json.load(f)["methods"]}
    n = numel(BUILTIN["resnet50"]())
    return {"compute_s": steps["compute"], "ddp_s": steps["dense"],
            "per_element_s": max(steps["dense"] - steps["compute"], 0.0) / n}


def _kernels(tmp: str, copies: int) -> list[dict]:
    """``gradsparse.advise``'s kernel timings on ResNet-50 (one thread), from ``copies`` processes run at once."""
    paths = [os.path.join(tmp, f"kernels-{copies}-{i}.json") for i in range(copies)]
    procs = [subprocess.Popen([sys.executable, "-m", "gradsparse.advise", "--model", "resnet50", "--link-gbit", "1",
                               "--repeats", "5", "--json", path, "--quiet"], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}) for path in paths]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"gradsparse.advise (kernels) failed: exit codes {codes}")
    out = []
    for path in paths:
        with open(path) as f:
            out.append(json.load(f)["kernels"])
    return out


# ------------------------------------------------------------------------------------------- validation
def _link(inputs: dict, rate: str, level: str) -> LinkModel | None:
    """The fitted link between nodes (its bandwidth at most the TCP stream measured on the same emulated link:
    the fit weighs every message size alike, and small messages leave within tbf's burst at veth speed, so
    it can land above what bulk transfers get) or inside a node: gloo's collectives (``intra``), or the
    hierarchical reducer's round through shared memory (``intra_shared``; None where ``inputs`` predate it)."""
    links = inputs["links"]
    if level == "inter":
        key = f"2x1@{rate}" if links.get(f"2x1@{rate}", {}).get("flat") else f"2x2@{rate}"
        m = links[key]["flat"] if key.startswith("2x1") else links[key]["inter"]
        stream = links[key].get("tcp_bits_per_s")
        return LinkModel(m["latency_s"], min(m["bytes_per_s"], stream / 8) if stream else m["bytes_per_s"])
    m = links["2x2@1gbit"].get(level)
    return None if m is None else LinkModel(m["latency_s"], m["bytes_per_s"])


def collective_cpu(inputs: dict, nodes: int, local: int, rate: str, source: str = "cpu") -> CollectiveCpu | None:
    """The CPU work of gloo's collectives measured on the cluster most like this one: between nodes of one
    rank each (``2x1@rate``, flat), nodes of two ranks (``2x2@rate``, flat), or one node (``2x2@1gbit``, the
    ranks inside a node: loopback). ``source``: ``host_cpu`` (this host's busy CPU per rank, the kernel's
    packet work included: what the emulation costs) or ``cpu`` (the ranks' own process time). None if
    ``inputs`` predates the CPU measurement."""
    links = inputs["links"]
    if nodes == 1:
        cpu = links.get("2x2@1gbit", {}).get(source, {}).get("intra")
    else:
        cpu = links.get(f"{'2x1' if local == 1 else '2x2'}@{rate}", {}).get(source, {}).get("flat")
    if not cpu or not cpu.get("allreduce") or not cpu.get("allgather"):
        return None
    models = {k: LinkModel(v["latency_s"], v["bytes_per_s"]) if v else None for k, v in cpu.items()}
    return CollectiveCpu(models["allreduce"], models["allgather"], models.get("allreduce_fp16"))


def emulated_points(paths: list[str]) -> list[dict]:
    """Validation points from cluster_bench results: every method with its run's compute and compress time."""
    points = []
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        for p in results["points"]:
            local = p.get("ranks_per_node", 1)
            nodes = p.get("nodes", p["world"] // local)
            for model, d in p.get("ddp", {}).items():
                if model != "resnet50":
                    continue
                m = {r["method"]: r for r in d["methods"]}
                if "compute" not in m:
                    continue
                # flat DGC's (a hierarchical run compresses a shard: the model scales the flat cost to it)
                compress = [r["compress_s"]["median"] for r in sorted(m.values(), key=lambda r: r["method"] != "dgc0.1")
                            if r.get("compress_s") and r["method"].startswith("dgc")]
                points.append({"nodes": nodes, "local": local, "rate": p["rate"],
                               "compute_ms": 1e3 * m["compute"]["step_s"]["median"],
                               "compress_ms": 1e3 * compress[0] if compress else None,
                               "topk_compress_ms": 1e3 * m["topk1"]["compress_s"]["median"] if "topk1" in m else None,
                               "warm_compress_ms": 1e3 * m["dgc0.1warmar"]["compress_s"]["median"]
                               if "dgc0.1warmar" in m else None,
                               "steps": {k: 1e3 * r["step_s"]["median"] for k, r in m.items() if k in BENCH_TO_MODEL},
                               "batch": d.get("batch"), "load": p.get("load_before"), "source": path})
    # DGC's 25 % stage: its selection and scatter as the allreduce run's hook reported them (the split's hook
    # time also holds its blocking alltoall), the least of one file's rates per shape: the work does not depend
    # on the link, but the hook's time also holds the wait in the descriptor exchange, which queues behind 150 MB
    # of allreduces a step (8 s of the 8.2 s reported at 100 Mbit/s)
    least: dict[tuple, float] = {}
    for pt in points:
        if pt["warm_compress_ms"] is not None:
            key = (pt["source"], pt["nodes"], pt["local"])
            least[key] = min(least.get(key, math.inf), pt["warm_compress_ms"])
    for pt in points:
        if pt["warm_compress_ms"] is not None:
            pt["warm_compress_ms"] = least[pt["source"], pt["nodes"], pt["local"]]
    return points


def kernel_inputs(inputs: dict, ranks: int) -> dict:
    """Per-element kernel costs for a run of ``ranks`` ranks on this machine: timed with ``min(ranks, CORES)``
    copies at once where ``inputs`` has them (``kernels_cpu_shared``: the mean of the copies), else in one
    process. PowerSGD: PyTorch's hook with one bucket, as the runs use it (older inputs: its matrix work only).

    >>> k = {"dgc0.1": {"per_element_s": 4e-9}, "unpack_per_pair_s": 1e-9, "fp16_per_element_s": 2e-9,
    ...      "powersgd_per_element_s": 3e-9, "powersgd": {"one_bucket": {"per_element_s": 8e-9}}}
    >>> kernel_inputs({"kernels_cpu": k}, 2)["powersgd_per_element_s"]
    8e-09
    """
    runs = [inputs["kernels_cpu"]]
    shared = inputs.get("kernels_cpu_shared")
    if ranks > 1 and shared and shared.get("runs"):
        runs = shared["runs"]

    def mean(get):
        return sum(get(r) for r in runs) / len(runs)

    def psgd(r):
        return r["powersgd"]["one_bucket"]["per_element_s"] if "powersgd" in r else r["powersgd_per_element_s"]

    return {"dgc_per_element_s": mean(lambda r: r["dgc0.1"]["per_element_s"]),
            "unpack_per_pair_s": mean(lambda r: r["unpack_per_pair_s"]),
            "fp16_per_element_s": mean(lambda r: r["fp16_per_element_s"]),
            "powersgd_per_element_s": mean(psgd), "copies": len(runs)}


def alltoall_efficiency(path: str = ALLTOALL_COMM) -> float:
    """The share of the link's bandwidth gloo's alltoall achieved: ideal over measured seconds of the ``alltoall``
    row of a ``benchmarks.comm_bench`` result (the split transport's pieces, timed on the emulated cluster).

    >>> round(alltoall_efficiency(), 2)
    0.57
    """
    with open(path if os.path.isabs(path) else os.path.join(ROOT, path)) as f:
        row = next(r for r in json.load(f)["rows"] if r["op"] == "alltoall")
    return row["ideal_s"] / row["time_s"]["median"]


def validate(inputs: dict, points: list[dict], run_compress: bool = True,
             algorithms: Algorithms = Algorithms()) -> list[dict]:
    """Predicted against measured step of every point, from the inputs measured here and the point's own run.

    ``run_compress=False`` (``--kernel-costs``): the sparse methods' work from the kernels timed here,
    not from the compression time each run's hook reported (which includes the wait in the blocking
    descriptor exchange that the step model also adds).

    Several ranks sharing this machine's ``CORES`` cores: kernel costs timed in one process are multiplied by
    ranks / cores (at least 1), and the step is at least what the cores allow for the training thread's work
    and the collectives' CPU work (``cores_per_rank = CORES / ranks``; :func:`gradsparse.stepmodel.cpu_bound`).
    ``schedule_ms``: the same model without that bound (links and overlap only), as published before.
    ``algorithms``: gloo's rings, and the alltoall's share of the link (:func:`alltoall_efficiency`; only the split
    transport runs one).
    """
    shapes = BUILTIN["resnet50"]()
    buckets = ddp_buckets(shapes)
    compressed = sum(b.compressed for b in buckets)
    ddp = inputs.get("ddp_overhead", {}).get("per_element_s", 0.0)   # older inputs: not measured
    rows = []
    for pt in points:
        nodes, local = pt["nodes"], pt["local"]
        if nodes > 1 and not any(f"2x{n}@{pt['rate']}" in inputs["links"] for n in (1, 2)):
            logger.warning("scale: no link measured at %s in these inputs: the %dx%d point is left out", pt["rate"],
                           nodes, local)
            continue
        ranks = nodes * local
        contention = max(1.0, ranks / CORES)
        inter = _link(inputs, pt["rate"], "inter") if nodes > 1 else None
        intra = _link(inputs, pt["rate"], "intra") if local > 1 else None
        topo = Topology(nodes, inter, local=local, intra=intra)
        gloo = collective_cpu(inputs, nodes, local, pt["rate"])
        k = kernel_inputs(inputs, ranks)
        shared = _link(inputs, pt["rate"], "intra_shared") if local > 1 else None
        for method_name, measured in pt["steps"].items():
            method = METHODS[BENCH_TO_MODEL[method_name]]
            # the hierarchical runs reduce inside a node through shared memory (CPU buckets)
            through_shm = method.kind == "hierarchical" and local > 1 and nodes > 1
            if through_shm and shared is None:
                continue  # inputs measured before advise timed the round through shared memory
            compress_ms = pt.get("topk_compress_ms") if method_name == "topk1" else pt.get("compress_ms")
            if method_name == "topk1" and compress_ms is None:
                compress_ms = pt.get("compress_ms")
            if method_name.startswith("dgc0.1warm"):
                compress_ms = pt.get("warm_compress_ms")
                if compress_ms is None or not run_compress:
                    continue  # the kernels here are timed at 0.1 %: a 25 % stage is predicted from its run only
            if not run_compress:
                compress_ms = None
            if compress_ms is not None and method.kind == "split":
                # the allreduce run's compression time holds no unpacking: the split's pairs (its region's pieces,
                # the reduced regions) at the unpack cost timed here
                sparse = KernelCost(compress_ms / 1e3 / compressed, contention * k["unpack_per_pair_s"])
            elif compress_ms is not None:      # the run's own compression time (unpack included)
                sparse = KernelCost(per_element_s=compress_ms / 1e3 / compressed)
            else:
                sparse = KernelCost(contention * k["dgc_per_element_s"], contention * k["unpack_per_pair_s"])
            kernels = Kernels(sparse, contention * k["fp16_per_element_s"], contention * k["powersgd_per_element_s"],
                              collective_cpu=gloo, ddp_per_element_s=contention * ddp, node_shared_memory=through_shm)
            compute_s = pt["compute_ms"] / 1e3
            cores = CORES / ranks if gloo is not None else None
            where = Topology(nodes, inter, local=local, intra=shared) if through_shm else topo
            t = step_time(method, buckets, where, kernels, compute_s, cores_per_rank=cores, algorithms=algorithms)
            predicted = 1e3 * t["step"]
            serial = 1e3 * step_time(method, buckets, where, kernels, compute_s, backward_share=0,
                                     cores_per_rank=cores, algorithms=algorithms)["step"]
            rows.append({"shape": f"{nodes}x{local}", "rate": pt["rate"], "method": method_name,
                         "measured_ms": measured, "predicted_ms": predicted,
                         "error": predicted / measured - 1, "compute_ms": pt["compute_ms"],
                         "schedule_ms": 1e3 * t["schedule"], "schedule_error": t["schedule"] * 1e3 / measured - 1,
                         "cpu_bound_ms": None if t["cpu_bound"] is None else 1e3 * t["cpu_bound"],
                         "collective_cpu_ms": 1e3 * t["cpu"], "cores_per_rank": cores,
                         "bound_by": "cpu" if t["cpu_bound"] is not None and t["cpu_bound"] > t["schedule"]
                         else "schedule",
                         "no_overlap_ms": serial, "no_overlap_error": serial / measured - 1,
                         "source": pt.get("source", "DESIGN.md / issue 13 (quiet, 2026-11-29)"),
                         "load": pt.get("load"), "superseded": pt.get("superseded")})
    return rows


# ------------------------------------------------------------------------------------------- projection
def gpu_kernels(method: str) -> Kernels:
    hbm, passes = GPU["hbm_bytes_per_s"]["value"], GPU["passes"]
    sparse_passes = passes["topk"] if method.startswith("topk") else passes["dgc"]
    return Kernels(KernelCost(4 * sparse_passes / hbm, GPU["unpack_per_pair_s"]["value"]),
                   4 * passes["fp16"] / hbm, 4 * passes["powersgd"] / hbm)


def gpu_topology(nodes: int, gbit: float) -> Topology:
    eff, lat = GPU["inter_efficiency"]["value"], GPU["inter_latency_s"]
    inter = LinkModel(lat["rdma"] if gbit >= 100 else lat["tcp"], eff * gbit * 1e9 / 8)
    intra = LinkModel(GPU["intra"]["latency_s"], GPU["intra"]["bytes_per_s"])
    return Topology(nodes, inter, local=GPU["ranks_per_node"]["value"], intra=intra)


def project(models=("resnet50", "transformer1b"), nodes_list=NODES, rates=None) -> list[dict]:
    from tqdm import tqdm

    rates = rates or GPU["inter_rates_gbit"]["value"]
    algorithms = Algorithms(GPU["algorithms"]["allreduce"], GPU["algorithms"]["allgather"])
    rows = []
    jobs = [(m, g, n) for m in models for g in rates for n in nodes_list]
    buckets = {m: ddp_buckets(BUILTIN[m]()) for m in models}
    for model, gbit, nodes in tqdm(jobs, desc="projection", unit="point", leave=False):
        topo = gpu_topology(nodes, gbit)
        compute = GPU["compute_s"][model]
        for name in PROJECTED:
            t = step_time(METHODS[name], buckets[model], topo, gpu_kernels(name), compute, algorithms=algorithms)
            rows.append({"model": model, "gbit": gbit, "nodes": nodes, "gpus": nodes * topo.local, "method": name,
                         "step_ms": 1e3 * t["step"], "hook_ms": 1e3 * t["hook"], "comm_ms": 1e3 * t["comm"],
                         "transports": t["transports"]})
    return rows


def crossovers(rows: list[dict]) -> list[dict]:
    """Per model and rate: the first node count at which each DGC variant is no faster than dense."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        for gbit in sorted({r["gbit"] for r in rows}):
            sel = [r for r in rows if r["model"] == model and r["gbit"] == gbit]
            dense = {r["nodes"]: r["step_ms"] for r in sel if r["method"] == "dense"}
            entry = {"model": model, "gbit": gbit}
            for name in CROSSING:
                mine = {r["nodes"]: r["step_ms"] for r in sel if r["method"] == name}
                lost = [n for n in sorted(mine) if mine[n] >= dense[n]]
                entry[name] = lost[0] if lost else None
                entry[f"{name}_pays_at_8"] = mine[min(mine)] < dense[min(mine)]
            out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------- output
def _pct(x: float) -> str:
    return f"{100 * x:+.0f} %"


def _validation_table(validation: list[dict]) -> list[str]:
    out = ["| cluster | link | method | measured | predicted | error | links and overlap only | error | cores' bound "
           "| bound by | collectives' CPU | compute (run's own) | load | source |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|"]
    for v in validation:
        src = os.path.basename(v["source"]) if v["source"].endswith(".json") else v["source"]
        load = f"{v['load'][0]:.1f}" if v.get("load") else "quiet"
        bound = f"{v['cpu_bound_ms']:,.0f}" if v.get("cpu_bound_ms") is not None else "—"
        out.append(f"| {v['shape']} | {v['rate']} | {v['method']} | {v['measured_ms']:,.0f} | {v['predicted_ms']:,.0f} "
                   f"| {_pct(v['error'])} | {v['schedule_ms']:,.0f} | {_pct(v['schedule_error'])} | {bound} | "
                   f"{v['bound_by']} | {v['collective_cpu_ms']:,.0f} | {v['compute_ms']:.0f} | {load} | {src} |")
    return out


def markdown(validation: list[dict], rows: list[dict], cross: list[dict], inputs: dict, command: str,
             superseded: list[dict] = ()) -> str:
    out = ["# Scale projection and its validation (generated)", "",
           f"Generated by `{command}` from `docs/scale/inputs.json` (measured {inputs.get('date', '?')}, load "
           f"average {inputs.get('load_before')} before, {inputs.get('load_after')} after, on {CORES} cores). "
           "Prose, assumptions and conclusions: [../scale.md](../scale.md).", "",
           "## Links fitted on the emulated clusters", "",
           "Between nodes the validation uses the fit's bandwidth or the TCP stream's, whichever is lower "
           "(`_link`: the fit weighs every message size alike, and small messages leave within tbf's burst).", "",
           "| cluster | level | latency us | Gbit/s (fit of gloo collectives) | TCP stream Gbit/s |",
           "|---|---|---:|---:|---:|"]
    for key, levels in inputs["links"].items():
        for level in ("flat", "intra", "inter"):
            if level in levels:
                m = levels[level]
                tcp = f"{levels['tcp_bits_per_s'] / 1e9:.3f}" if level != "intra" else "— (inside a node)"
                out.append(f"| {key} | {level} | {1e6 * m['latency_s']:.0f} | {m['gbit_per_s']:.3f} | {tcp} |")
    cpu_rows = {}
    for source in ("cpu", "host_cpu"):
        for key, levels in inputs["links"].items():
            for level, kinds in levels.get(source, {}).items():
                for kind, m in kinds.items():
                    if m:
                        cpu_rows.setdefault((key, level, kind), {})[source] = m

    def cell(m):
        return f"{1e6 * m['latency_s']:.0f} | {1e9 / m['bytes_per_s']:.2f}" if m else "— | —"

    if cpu_rows:
        out += ["", "CPU work of gloo's collectives per rank, during the same timed collectives, fitted per kind as "
                "CPU "
                "seconds per latency round and per byte through the busiest hop: the ranks' own (`time.process_time`) "
                "and this host's busy CPU (`/proc/stat`, every core, the kernel's packet work for the emulated links "
                "included, and anything else running then) over the ranks running collectives (the validation charges "
                "the ranks' own):", "",
                "| cluster | level | collective | ranks' us per round | ranks' ns per byte | host's us per round | "
                "host's ns per byte |", "|---|---|---|---:|---:|---:|---:|"]
        out += [f"| {key} | {level} | {kind} | {cell(v.get('cpu'))} | {cell(v.get('host_cpu'))} |"
                for (key, level, kind), v in cpu_rows.items()]
    k = inputs["kernels_cpu"]
    psgd = k.get("powersgd")
    psgd_text = ("PowerSGD rank 4 (PyTorch's powerSGD_hook itself, one process): "
                 + ", ".join(f"{v['buckets']} bucket(s) {1e3 * v['step_s']:.0f} ms per step "
                             f"({1e9 * v['per_element_s']:.2f} ns per compressed element)" for v in psgd.values())
                 if psgd else f"PowerSGD rank 4 {1e9 * k['powersgd_per_element_s']:.2f} ns/element (its matrix work)")
    out += ["", f"CPU kernel costs (one process, one thread, ResNet-50 shapes): DGC 0.1 % "
            f"{1e9 * k['dgc0.1']['per_element_s']:.2f} ns/element, TopK 1 % {1e9 * k['topk1']['per_element_s']:.2f}, "
            f"unpack {1e9 * k['unpack_per_pair_s']:.2f} ns/pair, fp16 cast {1e9 * k['fp16_per_element_s']:.2f} "
            f"ns/element; {psgd_text}.", ""]
    shared = inputs.get("kernels_cpu_shared")
    if shared:
        runs = [kernel_inputs({"kernels_cpu": r}, 1) for r in shared["runs"]]
        out += [f"The same with {shared['copies']} copies at once (used for the runs of 2 ranks or more: their ranks "
                "share the memory bandwidth and caches while they compute): DGC 0.1 % "
                + " / ".join(f"{1e9 * r['dgc_per_element_s']:.2f}" for r in runs) + " ns/element, fp16 cast "
                + " / ".join(f"{1e9 * r['fp16_per_element_s']:.2f}" for r in runs) + ", PowerSGD (one bucket) "
                + " / ".join(f"{1e9 * r['powersgd_per_element_s']:.2f}" for r in runs) + ".", ""]
    ddp = inputs.get("ddp_overhead")
    if ddp:
        out += [f"DDP's own work (a one-rank DDP step with no hook against the compute-only step, ResNet-50): "
                f"{1e3 * ddp['ddp_s']:.1f} against {1e3 * ddp['compute_s']:.1f} ms, "
                f"{1e9 * ddp['per_element_s']:.2f} ns per gradient element.", ""]
    out += ["## Validation: predicted against measured step (ms)", "",
            f"Predicted: the step model (links, DDP's buckets, the overlap with the backward pass) and, because the "
            f"emulated ranks share this machine's {CORES} cores, at least the cores' bound "
            "(`gradsparse.stepmodel.cpu_bound`: the training thread's compute and hook work plus the collectives' "
            "CPU work, over the cores a rank has). 'links and overlap only' is the model without that bound. "
            "'collectives' CPU': what the bound charges for gloo's work (ms per step and rank).", ""]
    out += _validation_table(validation)
    within = sum(abs(v["error"]) <= 0.2 for v in validation)
    schedule = sum(abs(v["schedule_error"]) <= 0.2 for v in validation)
    n = len(validation)
    out += ["", f"{within} of {n} points within 20 % ({schedule} of {n} with the links and the overlap alone, "
            "without the cores' bound).", ""]
    if superseded:
        out += ["### Superseded points (not counted)", "",
                "Published 2026-11-29 (issue 13, DESIGN.md) without raw data: an older build, batch 4 per rank; "
                "replaced by the re-run of the same clusters above. Predicted from their runs' own compute and "
                "compression times.", ""]
        out += _validation_table(superseded)
        within = sum(abs(v["error"]) <= 0.2 for v in superseded)
        out += ["", f"{within} of {len(superseded)} superseded points within 20 %.", ""]
    out += summary(rows)
    out += ["## Projection (ms per step)", ""]
    for model in sorted({r["model"] for r in rows}):
        for gbit in sorted({r["gbit"] for r in rows}):
            sel = [r for r in rows if r["model"] == model and r["gbit"] == gbit]
            out += [f"### {model}, {gbit} Gbit/s per node, 8 GPUs per node", "",
                    "| nodes (GPUs) | " + " | ".join(METHODS[m].label for m in PROJECTED) + " |",
                    "|---|" + "---:|" * len(PROJECTED)]
            for n in sorted({r["nodes"] for r in sel}):
                by = {r["method"]: r for r in sel if r["nodes"] == n}
                dense = by["dense"]["step_ms"]
                cells = [f"{by[m]['step_ms']:,.0f} ({dense / by[m]['step_ms']:.2f}x)" for m in PROJECTED]
                out.append(f"| {n} ({8 * n}) | " + " | ".join(cells) + " |")
            out.append("")
    out += ["## Where DGC stops paying (first node count at which it is no faster than dense)", "",
            "| model | Gbit/s | flat DGC 0.1 % | hierarchical DGC 0.1 % | split DGC 0.1 % |", "|---|---:|---|---|---|"]
    for c in cross:
        def cell(name):
            if not c[f"{name}_pays_at_8"]:
                return "never pays (from 8 nodes)"
            return f"{c[name]} nodes" if c[name] else "pays up to 1,024 nodes"
        out.append(f"| {c['model']} | {c['gbit']} | " + " | ".join(cell(name) for name in CROSSING) + " |")
    return "\n".join(out) + "\n"


def summary(rows: list[dict], nodes=(8, 64, 256, 1024)) -> list[str]:
    """Markdown: speed-up over dense per model, rate and node count, for every projected method."""
    out = ["## Summary: predicted speed-up over dense fp32", "",
           "| model | Gbit/s | nodes | " + " | ".join(METHODS[m].label.replace("gradsparse ", "")
                                                      for m in PROJECTED[1:]) + " |",
           "|---|---:|---:|" + "---:|" * (len(PROJECTED) - 1)]
    by = {(r["model"], r["gbit"], r["nodes"], r["method"]): r["step_ms"] for r in rows}
    for model in sorted({r["model"] for r in rows}):
        for gbit in sorted({r["gbit"] for r in rows}):
            for n in nodes:
                if (model, gbit, n, "dense") not in by:
                    continue
                dense = by[model, gbit, n, "dense"]
                cells = [f"{dense / by[model, gbit, n, m]:.2f}x" for m in PROJECTED[1:]]
                out.append(f"| {model} | {gbit} | {n} | " + " | ".join(cells) + " |")
    return out + [""]


def plots(rows: list[dict], validation: list[dict], img_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(img_dir, exist_ok=True)
    written = []
    rates = sorted({r["gbit"] for r in rows})
    for model in sorted({r["model"] for r in rows}):
        fig, axes = plt.subplots(1, len(rates), figsize=(4.2 * len(rates), 4), sharey=True, squeeze=False)
        for ax, gbit in zip(axes[0], rates):
            for name in PROJECTED:
                sel = sorted((r for r in rows if r["model"] == model and r["gbit"] == gbit and r["method"] == name),
                             key=lambda r: r["nodes"])
                ax.plot([r["nodes"] for r in sel], [r["step_ms"] for r in sel], marker="o", ms=3,
                        label=METHODS[name].label, linestyle="--" if name == "dense" else "-")
            ax.axhline(1e3 * GPU["compute_s"][model], color="gray", linestyle=":", label="compute only")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{gbit} Gbit/s per node", fontsize=10)
            ax.set_xlabel("nodes (8 GPUs each)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].set_ylabel("predicted step (ms)")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{model}: predicted step time (model: gradsparse.cost / stepmodel; assumptions in docs/scale.md)",
                     fontsize=10)
        fig.tight_layout()
        path = os.path.join(img_dir, f"scale_{model}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if validation:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for v in validation:
            ax.scatter(v["measured_ms"], v["predicted_ms"], s=18)
            ax.annotate(f"{v['shape']} {v['rate']} {v['method']}", (v["measured_ms"], v["predicted_ms"]), fontsize=6)
        lo = min(min(v["measured_ms"], v["predicted_ms"]) for v in validation) * 0.8
        hi = max(max(v["measured_ms"], v["predicted_ms"]) for v in validation) * 1.2
        ax.plot([lo, hi], [lo, hi], color="gray")
        ax.fill_between([lo, hi], [0.8 * lo, 0.8 * hi], [1.2 * lo, 1.2 * hi], color="gray", alpha=0.15,
                        label="within 20 %")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured step (ms), emulated cluster")
        ax.set_ylabel("predicted step (ms)")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(img_dir, "scale_validation.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="report", choices=("report", "measure"))
    parser.add_argument("--inputs", default="docs/scale/inputs.json")
    parser.add_argument("--emulated", action="append", default=[],
                        help="cluster_bench results.json with a ResNet-50 'compute' row (repeatable)")
    parser.add_argument("--out", default="docs/scale")
    parser.add_argument("--img", default="docs/img")
    parser.add_argument("--kernel-costs", action="store_true",
                        help="validate with the sparse methods' work from the kernels timed here, not each run's "
                             "hook-reported compression time")
    parser.add_argument("--alltoall-comm", default=ALLTOALL_COMM,
                        help="comm_bench result whose alltoall row gives the alltoall's share of the link")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.makedirs(args.out, exist_ok=True)
    if args.command == "measure":
        measure(args.inputs)
        logger.info("inputs written to %s", args.inputs)
        return 0
    with open(args.inputs) as f:
        inputs = json.load(f)
    gloo = Algorithms(alltoall_efficiency=alltoall_efficiency(args.alltoall_comm))
    validation = validate(inputs, emulated_points(args.emulated), run_compress=not args.kernel_costs, algorithms=gloo)
    superseded = validate(inputs, PUBLISHED, run_compress=not args.kernel_costs)
    for v in validation + superseded:
        logger.info("%-5s %-6s %-9s measured %7.0f ms predicted %7.0f ms error %s%s", v["shape"], v["rate"],
                    v["method"], v["measured_ms"], v["predicted_ms"], _pct(v["error"]),
                    " (superseded)" if v.get("superseded") else "")
    rows = project()
    cross = crossovers(rows)
    command = "python -m benchmarks.scale " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"command": command, "assumptions": GPU, "validation": validation, "superseded": superseded,
                   "projection": rows, "crossovers": cross,
                   "parameters": {m: numel(BUILTIN[m]()) for m in ("resnet50", "transformer1b")}}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(validation, rows, cross, inputs, command, superseded))
    for path in plots(rows, validation, args.img):
        logger.info("plot: %s", path)
    logger.info("tables: %s", os.path.join(args.out, "results.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
