"""Helpers shared by the cluster benchmarks: bytes on the wire, per-rank gathering, summaries.

Bytes on the wire are the kernel's transmit counter of the interface gloo uses
(``GLOO_SOCKET_IFNAME``; set by launch/multinode.sh). On an emulated cluster each
node has its own interface, so the counter is that node's traffic, headers
included. Without it (loopback) every rank shares ``lo``: :func:`wire_iface`
says so and the numbers are divided by the local world size.

Example::

    >>> from benchmarks.wire import summarize
    >>> summarize([3.0, 1.0, 2.0, 10.0])
    {'median': 2.5, 'min': 1.0, 'max': 10.0, 'p25': 1.75, 'p75': 4.75, 'n': 4}
"""

from __future__ import annotations

import os
import statistics

import torch
import torch.distributed as dist


def wire_iface() -> tuple[str, bool]:
    """(interface, shared): the interface gloo sends on, and whether all local ranks share it."""
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    return (iface, int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1) if iface else ("lo", True)


def tx_bytes() -> int:
    """Bytes sent so far on this rank's interface."""
    with open(f"/sys/class/net/{wire_iface()[0]}/statistics/tx_bytes") as f:
        return int(f.read())


def per_rank_wire_bytes(delta: int) -> float:
    """A counter delta as this rank's share (divided by the local ranks sharing the interface)."""
    iface, shared = wire_iface()
    return delta / int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if shared else float(delta)


def gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's list of floats (same length on every rank), in rank order."""
    mine = torch.tensor(values, dtype=torch.float64)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def slowest(per_rank: list[list[float]]) -> list[float]:
    """Per repetition, the slowest rank's time (a collective is done when its last rank is)."""
    return [max(col) for col in zip(*per_rank)]


def summarize(xs: list[float]) -> dict:
    qs = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "p25": qs[0], "p75": qs[2],
            "n": len(xs)}
