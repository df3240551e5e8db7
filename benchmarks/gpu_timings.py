"""GPU timings of the kernels against torch.topk and one device-memory read (run by benchmarks/gpu_check.sh).

On a CUDA device: the reducer's result on CUDA tensors equals its result on the CPU
(TopK and DGC over ResNet-50-sized buckets, exact top-k on both); then, on a 25M fp32
gradient at densities 0.1 %, 1 %, 10 % and 25 %: selection (``ops.sampled_topk_indices``, the exact top-k),
``torch.topk`` of the same k, ``pack`` and ``unpack_add`` of 4 ranks' payloads, and
one read of the input (``x.sum()``), each the median of CUDA-event timings after a
warm-up, inputs rotated so no timing reads a cached copy. Targets (issue 13):
selection >= 5x faster than torch.topk and within 5x of one read::

    python -m benchmarks.gpu_timings --json out/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
from gradsparse import DGC, TopK, ops  # noqa: E402
from gradsparse.comm import LocalCommunicator  # noqa: E402
from gradsparse.reducer import Segment, SparseReducer  # noqa: E402

logger = logging.getLogger("benchmarks.gpu_timings")
NUMEL = 25_000_000
DENSITIES = (0.001, 0.01, 0.1, 0.25)


def cuda_ms(fn, inputs, repeats: int = 20) -> float:
    """Median milliseconds of ``fn(x)`` over ``repeats`` runs, rotating through ``inputs``."""
    for x in inputs[:2]:
        fn(x)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        x = inputs[i % len(inputs)]
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def reducer_matches_cpu() -> dict:
    """The same buckets reduced on CUDA and on the CPU give the same bucket and the same memory."""
    out = {}
    segments = [Segment("a", 0, 3_000_000), Segment("b", 3_000_000, 1_000), Segment("c", 3_001_000, 200_000)]
    for name, make in (("topk1", lambda: TopK(0.01)), ("dgc0.1", lambda: DGC(0.001, warmup=None))):
        results = {}
        for device in ("cpu", "cuda"):
            r = SparseReducer(make(), LocalCommunicator())
            gen = torch.Generator().manual_seed(0)
            flats = []
            for step in range(3):
                g = torch.randn(3_201_000, generator=gen).to(device)
                flats.append(r.reduce(g, segments, step).wait().cpu())
            results[device] = (flats, {k: {n: t.cpu() for n, t in s.items()} for k, s in r.memory.state.items()})
        (cpu_out, cpu_mem), (gpu_out, gpu_mem) = results["cpu"], results["cuda"]
        out[name] = all(torch.equal(a, b) for a, b in zip(cpu_out, gpu_out)) and all(
            torch.equal(cpu_mem[k][n], gpu_mem[k][n]) for k in cpu_mem for n in cpu_mem[k])
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs one (benchmarks/gpu_check.sh)")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "numel": NUMEL,
              "reducer_equals_cpu": reducer_matches_cpu(), "rows": []}
    inputs = [torch.randn(NUMEL, device="cuda") for _ in range(4)]
    gen = torch.Generator().manual_seed(0)
    read = cuda_ms(lambda x: x.sum(), inputs)
    for density in DENSITIES:
        k = max(1, round(density * NUMEL))
        select = cuda_ms(lambda x: ops.sampled_topk_indices(x, k, 0.01, gen), inputs)
        topk = cuda_ms(lambda x: torch.topk(x.abs(), k, sorted=False), inputs)
        idx = ops.sampled_topk_indices(inputs[0], k, 0.01, gen)
        vals = inputs[0][idx]
        pack = cuda_ms(lambda x: ops.pack(idx, vals, x[:0], NUMEL, torch.float32), inputs)
        payloads = [ops.pack(idx, vals, inputs[0][:0], NUMEL, torch.float32)] * 4
        out = torch.empty(NUMEL, device="cuda")
        unpack = cuda_ms(lambda x: ops.unpack_add(payloads, out, torch.float32, None, alpha=0.25, overwrite=True),
                         inputs)
        row = {"density": density, "k": k, "select_ms": select, "torch_topk_ms": topk, "pack_ms": pack,
               "unpack_add_4_ms": unpack, "read_ms": read, "select_vs_topk": topk / select,
               "select_in_reads": select / read}
        result["rows"].append(row)
        logger.info("density %g: select %.3f ms, torch.topk %.3f ms (%.1fx), %.1f reads", density, select, topk,
                    topk / select, select / read)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['device']}: one read of {NUMEL:,} fp32 = {read:.3f} ms; reducer equals CPU: "
          f"{result['reducer_equals_cpu']}")
    print("| density | select ms | torch.topk ms | speed-up | select / read | pack ms | unpack-add x4 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['density']:g} | {r['select_ms']:.3f} | {r['torch_topk_ms']:.3f} | {r['select_vs_topk']:.1f}x | "
              f"{r['select_in_reads']:.1f} | {r['pack_ms']:.3f} | {r['unpack_add_4_ms']:.3f} |")
    return result


if __name__ == "__main__":
    main()
