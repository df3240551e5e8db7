"""Smoke test for a multi-node launch: every rank joins, sums, and reports where it runs.

Run it with the launcher before a real job, on every node::

    launch/multinode.sh --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 -- launch/check_job.py

Rank 0 prints one JSON line (and writes it to ``--out`` if given): world size, the
allreduce result (must equal the world size), and per rank the node's address on the
interface gloo uses and that interface's transmitted bytes during a 4 MB allreduce.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist


def iface_address(iface: str | None) -> str:
    """IPv4 address of ``iface`` (via the kernel), or the hostname's when unknown."""
    if iface:
        import fcntl
        import struct

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", iface[:15].encode()))  # SIOCGIFADDR
            return socket.inet_ntoa(packed[20:24])
    return socket.gethostbyname(socket.gethostname())


def tx_bytes(iface: str | None) -> int:
    """Bytes transmitted so far on ``iface`` (loopback when None)."""
    with open(f"/sys/class/net/{iface or 'lo'}/statistics/tx_bytes") as f:
        return int(f.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    iface = os.environ.get("GLOO_SOCKET_IFNAME")
    ones = torch.ones(4)
    dist.all_reduce(ones)
    before = tx_bytes(iface)
    big = torch.ones(1 << 20)
    dist.all_reduce(big)
    # A rank's allreduce returns once it has received its share; its own last segments may still wait in
    # the shaped link's queue, uncounted (3.83 of 4 MB once). After the barrier every peer has received them.
    dist.barrier()
    sent = tx_bytes(iface) - before
    mine = torch.tensor([rank, int(ones[0]), sent], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    names = [None] * world
    dist.all_gather_object(names, {"rank": rank, "address": iface_address(iface), "iface": iface,
                                   "host": socket.gethostname()})
    if rank == 0:
        report = {"world_size": world, "allreduce": [int(t[1]) for t in everyone],
                  "tx_bytes_4MB_allreduce": [int(t[2]) for t in everyone], "ranks": names}
        line = json.dumps(report)
        print(line, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(line + "\n")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # torch 2.13 + gloo can abort in interpreter teardown (docs/ddp.md, "Shutting down")


if __name__ == "__main__":
    main()
