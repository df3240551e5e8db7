"""Measure the achieved rate of a link: one TCP stream, receiver-side timing.

Run the receiver on one node and the sender on another (the emulated cluster
does this inside its namespaces)::

    python -m launch.linkrate recv --port 5201 --seconds 1.5 &     # prints a JSON line
    python -m launch.linkrate send --host 10.55.0.1 --port 5201 --seconds 1.5

The receiver times from the first to the last byte it reads, skipping the
first ``warm`` bytes (TCP slow start and the token bucket's initial burst), so
the rate is the sustained rate the shaped link delivers.

Example::

    >>> from launch.linkrate import parse_rate
    >>> parse_rate("1gbit"), parse_rate("100mbit"), parse_rate("2.5gbit")
    (1000000000, 100000000, 2500000000)
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sys
import time

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_rate(text: str) -> int:
    """``"1gbit"`` -> 1_000_000_000 bits/s (tc's units: bit, kbit, mbit, gbit; decimal)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(bit|kbit|mbit|gbit)\s*", str(text).lower())
    if not m:
        raise ValueError(f"link rate must look like 100mbit, 1gbit or 10gbit, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def receive(port: int, seconds: float, warm: int = 1 << 20, bind: str = "0.0.0.0", ready=None) -> dict:
    """Accept one sender; return bytes and the sustained rate after the first ``warm`` bytes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((bind, port))
        srv.listen(1)
        srv.settimeout(seconds + 30)
        if ready is not None:
            ready()
        conn, _ = srv.accept()
        with conn:
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            total, t_warm, b_warm = 0, None, 0
            while True:
                n = conn.recv_into(view)
                if n == 0:
                    break
                total += n
                if t_warm is None and total >= warm:
                    t_warm, b_warm = time.perf_counter(), total
            t_end = time.perf_counter()
    if t_warm is None or t_end <= t_warm:
        raise RuntimeError(f"link probe received only {total} bytes")
    return {"bytes": total, "seconds": t_end - t_warm, "bits_per_s": 8 * (total - b_warm) / (t_end - t_warm)}


def send(host: str, port: int, seconds: float, connect_timeout: float = 20.0) -> int:
    """Send as fast as the link takes for ``seconds``; returns bytes sent."""
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    chunk = b"\0" * (1 << 20)
    sent = 0
    with sock:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            sock.sendall(chunk)
            sent += len(chunk)
    return sent


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["recv", "send"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5201)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--warm", type=int, default=1 << 20, help="bytes excluded from the timing")
    args = parser.parse_args(argv)
    if args.role == "recv":
        result = receive(args.port, args.seconds, args.warm, ready=lambda: print("READY", flush=True))
        print(json.dumps(result), flush=True)
    else:
        send(args.host, args.port, args.seconds)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
