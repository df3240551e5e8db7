"""Long runs at world size 3: bit-identical ranks after 1000 steps, same seed -> same parameters, flat memory.

Buckets of several sizes; Threshold with counts that vary per rank and a rank that
sends nothing every other step. ``benchmarks/soak.py`` runs the same worker for
longer and reports RSS over time (docs/reliability.md).
"""

import ctypes
import resource

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, Threshold, Warmup
from gradsparse import ddp as gddp

from ..distributed import run_world
from ..models import loss_of, make_model, params_hash

METHODS = {
    "dgc": lambda: DGC(0.01, warmup=Warmup(ratios=(0.25, 0.06), length=20, unit="step")),
    "threshold": lambda: Threshold(0.004),
}


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (from /proc; Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def trimmed_rss_mib() -> float:
    """RSS after asking glibc to return freed heap pages (``malloc_trim(0)``): what is really held."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_mib()


def long_run_worker(rank, world, steps, probe_every=100, methods=tuple(METHODS), history_size=10_000):
    """Train each method for ``steps`` steps; parameter hashes and RSS every ``probe_every`` steps."""
    out = {}
    for name in methods:
        model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
        opt = torch.optim.SGD(model.parameters(), lr=0.02)
        state = gddp.register(model, METHODS[name](), optimizer=opt, log_every=0, history_size=history_size)
        probes = {}
        for step in range(steps):
            opt.zero_grad()
            silent = name == "threshold" and rank == world - 1 and step % 2  # sends nothing on odd steps
            (loss_of(model, "mlp", rank, step % 500) * (0.0 if silent else 1.0)).backward()
            opt.step()
            if (step + 1) % probe_every == 0:
                probes[step + 1] = {"hash": params_hash(model), "rss_mib": rss_mib(), "trimmed_mib": trimmed_rss_mib()}
        out[name] = {"probes": probes,
                     "selected_min": min(h["selected"] for h in list(state.history)[1:]),
                     "buckets": state.last_stats.buckets}
    return out


def test_1000_steps_world_3_bit_identical_deterministic_and_flat_in_memory():
    results = run_world(long_run_worker, 3, 1000, timeout=900)
    for name in METHODS:
        final = {r[name]["probes"][1000]["hash"] for r in results}
        assert len(final) == 1, name
        assert results[0][name]["buckets"] > 1
        for r in results:
            held = {step: p["trimmed_mib"] for step, p in r[name]["probes"].items()}
            assert held[1000] - held[300] < 4, (name, held)  # nothing retained per step once warm
    assert results[2]["threshold"]["selected_min"] == 0  # the silent rank really sent nothing

    again = run_world(long_run_worker, 3, 100)  # new processes, same seed: the same parameters
    for first, second in zip(results, again, strict=True):
        for name in METHODS:
            assert second[name]["probes"][100]["hash"] == first[name]["probes"][100]["hash"], name
