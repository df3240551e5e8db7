"""An emulated N-node cluster on one machine: network namespaces, veth links shaped by tc.

Topology: every node is a network namespace with one interface ``eth0``
(address ``10.55.0.<i+1>/24``) and ``ranks_per_node`` ranks (one ``torchrun
--nproc-per-node`` per node); the ranks of a node reach each other over the
namespace's own loopback, unshaped, as over NVLink or PCIe inside a real node.
Two nodes are joined by one veth pair; more
than two by one veth pair per node into a bridge in a hub namespace (a switch).
Every veth end is shaped with ``tc tbf`` (tbf shapes egress only, so both ends
are shaped: each node gets a full-duplex link of ``rate`` to the switch), with
an optional ``netem`` delay in front. Everything is torn down on exit, on
Ctrl-C, on SIGTERM and on failure; stale namespaces of a killed run are removed
by ``python -m launch.cluster cleanup``.

Needs root and iproute2 (``ip``, ``tc``). :func:`unsupported_reason` says why
not when they are missing; the command line then falls back to one loopback
``torchrun`` without shaping, and says so.

Run a script on 4 nodes with 1 Gbit/s links (one ``torchrun`` per node, through
``launch/multinode.sh``, exactly as on a real cluster), or on 2 nodes of 2 ranks::

    python -m launch.cluster --nodes 4 --rate 1gbit -- benchmarks/comm_bench.py --sizes 1000000
    python -m launch.cluster --nodes 2 --ranks-per-node 2 --rate 1gbit -- launch/check_job.py

From Python::

    with EmulatedCluster(2, rate="1gbit") as cluster:
        print(cluster.measure_rate())        # achieved rate, bits/s, measured with TCP
        cluster.run_torchrun("train.py", ["--steps", "10"])

Example (no root needed)::

    >>> EmulatedCluster(4, rate="1gbit").addresses
    ['10.55.0.1', '10.55.0.2', '10.55.0.3', '10.55.0.4']
    >>> c = EmulatedCluster(2, rate="1gbit", ranks_per_node=2)
    >>> c.world_size, c.node_of_rank(3)
    (4, 1)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

try:
    from .linkrate import parse_rate
except ImportError:  # run as a file: python launch/cluster.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from launch.linkrate import parse_rate

logger = logging.getLogger("launch.cluster")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MULTINODE = os.path.join(HERE, "multinode.sh")
PREFIX = "gsc"
IFACE = "eth0"
SUBNET = "10.55.0"


class ClusterUnavailable(RuntimeError):
    """The emulated cluster cannot be built here (not root, no iproute2, namespaces refused)."""


def unsupported_reason() -> str | None:
    """Why an emulated cluster cannot be built on this machine, or None if it can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces and tc need root (run as root or with CAP_NET_ADMIN + CAP_SYS_ADMIN)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"iproute2 is missing ({', '.join(missing)} not found; apt-get install iproute2)"
    probe = f"{PREFIX}{os.getpid()}probe"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, text=True, timeout=20)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        return f"'ip netns add' failed: {getattr(err, 'stderr', '') or err}".strip()
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def list_namespaces() -> list[str]:
    out = _sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL the processes inside one of our namespaces (they were started by this tool)."""
    pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def cleanup_stale() -> list[str]:
    """Delete namespaces left by emulated clusters whose owning process is gone."""
    removed = []
    for ns in list_namespaces():
        m = re.fullmatch(rf"{PREFIX}(\d+)(n\d+|hub|probe)", ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _kill_namespace_processes(ns)
            _sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


def default_burst(rate_bps: int) -> int:
    """Token-bucket size in bytes: 2 ms at the link rate, at least 64 KiB (one GSO packet)."""
    return max(64 * 1024, int(rate_bps / 8 * 0.002))


class EmulatedCluster:
    """N network namespaces joined by shaped veth links (a bridge for N > 2); a context manager.

    Args:
        nodes: number of nodes (>= 2).
        rate: link rate per direction, tc syntax (``"100mbit"``, ``"1gbit"``); None: unshaped.
        delay: optional one-way delay added on every shaped end (tc netem syntax, ``"0.5ms"``).
        burst: tbf bucket in bytes (None: :func:`default_burst`).
        ranks_per_node: ranks each node's ``torchrun`` starts (``--nproc-per-node``); only the links
            between nodes are shaped.
    """

    def __init__(self, nodes: int, rate: str | None = None, delay: str | None = None, burst: int | None = None,
                 ranks_per_node: int = 1):
        if int(nodes) != nodes or nodes < 2:
            raise ValueError(f"an emulated cluster needs at least 2 nodes, got {nodes!r}")
        if int(ranks_per_node) != ranks_per_node or ranks_per_node < 1:
            raise ValueError(f"ranks_per_node must be an integer >= 1, got {ranks_per_node!r}")
        self.ranks_per_node = int(ranks_per_node)
        if nodes > 250:
            raise ValueError("at most 250 nodes fit the /24 subnet")
        self.nodes = int(nodes)
        self.rate = rate
        self.rate_bps = parse_rate(rate) if rate is not None else None
        self.delay = delay
        self.burst = burst if burst is not None else (default_burst(self.rate_bps) if self.rate_bps else None)
        tag = f"{PREFIX}{os.getpid()}"
        self.namespaces = [f"{tag}n{i}" for i in range(self.nodes)]
        self.hub = f"{tag}hub" if self.nodes > 2 else None
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(self.nodes)]
        self.iface = IFACE
        self._up = False
        self._old_handlers: dict[int, object] = {}

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node

    def node_of_rank(self, rank: int) -> int:
        """The node torchrun puts global rank ``rank`` on (ranks are numbered node by node)."""
        return rank // self.ranks_per_node

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> EmulatedCluster:
        self._install_signal_handlers()
        try:
            self.up()
        except BaseException:
            self.down()
            self._restore_signal_handlers()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum, frame):
            raise SystemExit(128 + signum)  # unwinds through __exit__, which tears down

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, on_term)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def up(self) -> None:
        """Create namespaces, links, addresses and shaping."""
        reason = unsupported_reason()
        if reason:
            raise ClusterUnavailable(reason)
        self._up = True  # from here on, down() has something to remove
        for ns in self.namespaces + ([self.hub] if self.hub else []):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        if self.hub is None:
            a, b = self.namespaces
            _sh("ip", "link", "add", IFACE, "netns", a, "type", "veth", "peer", "name", IFACE, "netns", b)
            ends = [(a, IFACE), (b, IFACE)]
        else:
            _sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _sh("ip", "-n", self.hub, "link", "set", "br0", "up")
            ends = []
            for i, ns in enumerate(self.namespaces):
                port = f"p{i}"
                _sh("ip", "link", "add", IFACE, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.hub)
                _sh("ip", "-n", self.hub, "link", "set", port, "master", "br0")
                _sh("ip", "-n", self.hub, "link", "set", port, "up")
                ends += [(ns, IFACE), (self.hub, port)]
        for ns, addr in zip(self.namespaces, self.addresses):
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFACE)
            _sh("ip", "-n", ns, "link", "set", IFACE, "up")
        for ns, dev in ends:
            self._shape(ns, dev)
        logger.info("emulated cluster up: %d nodes x %d ranks %s, rate %s, delay %s, burst %s B%s", self.nodes,
                    self.ranks_per_node, self.addresses, self.rate or "unshaped", self.delay or "none", self.burst,
                    f", bridge in {self.hub}" if self.hub else "")

    def _shape(self, ns: str, dev: str) -> None:
        tbf = ["tbf", "rate", self.rate, "burst", str(self.burst), "latency", "50ms"] if self.rate else None
        if self.delay:
            proc = _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", self.delay,
                       check=False)
            if proc.returncode != 0:
                raise ClusterUnavailable(f"cannot add a delay: tc netem failed ({proc.stderr.strip()}); this kernel "
                                         "lacks sch_netem (CONFIG_NET_SCH_NETEM). Run without --delay.")
            if tbf:
                _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *tbf)
        elif tbf:
            _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf)

    def down(self) -> None:
        """Kill what runs inside the namespaces and delete them (idempotent)."""
        if not self._up:
            return
        present = set(list_namespaces())
        for ns in self.namespaces + ([self.hub] if self.hub else []):
            if ns in present:
                _kill_namespace_processes(ns)
                _sh("ip", "netns", "del", ns, check=False)
        self._up = False
        logger.info("emulated cluster down: namespaces %s removed", ", ".join(self.namespaces))

    # ------------------------------------------------------------------ running
    def exec_argv(self, node: int, argv: list[str], env: dict | None = None) -> list[str]:
        """Command line that runs ``argv`` inside node ``node`` (the caller's environment is kept)."""
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        return ["ip", "netns", "exec", self.namespaces[node], "env", *extra, *argv]

    def qdiscs(self) -> str:
        """``tc -s qdisc`` of every shaped interface (to check the shaping by eye)."""
        out = []
        for ns in self.namespaces + ([self.hub] if self.hub else []):
            out.append(f"[{ns}]\n" + _sh("tc", "-n", ns, "-s", "qdisc", "show", check=False).stdout)
        return "\n".join(out)

    def measure_rate(self, src: int = 1, dst: int = 0, seconds: float = 1.5, port: int = 5201) -> dict:
        """Achieved TCP rate from node ``src`` to node ``dst`` (one stream), in bits/s."""
        env = {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        recv = subprocess.Popen(self.exec_argv(dst, [sys.executable, "-m", "launch.linkrate", "recv", "--port",
                                                     str(port), "--seconds", str(seconds)], env),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            if recv.stdout.readline().strip() != "READY":
                raise RuntimeError(f"link probe receiver failed: {recv.stderr.read()}")
            _sh(*self.exec_argv(src, [sys.executable, "-m", "launch.linkrate", "send", "--host", self.addresses[dst],
                                      "--port", str(port), "--seconds", str(seconds)], env))
            out, err = recv.communicate(timeout=60)
        finally:
            if recv.poll() is None:
                recv.kill()
        if recv.returncode != 0:
            raise RuntimeError(f"link probe receiver failed: {err}")
        result = json.loads(out.strip().splitlines()[-1])
        result.update(src=src, dst=dst, configured_bits_per_s=self.rate_bps)
        logger.info("link %d -> %d: %.3f Gbit/s achieved (configured %s)", src, dst, result["bits_per_s"] / 1e9,
                    self.rate or "unshaped")
        return result

    def run_torchrun(self, script: str, args: list[str] | None = None, *, nproc_per_node: int | None = None,
                     port: int = 29500, env: dict | None = None, timeout: float | None = None,
                     stdout=None, stderr=None) -> list[int]:
        """One ``launch/multinode.sh`` (so one ``torchrun``) per node; returns each node's exit code.

        ``nproc_per_node`` defaults to the cluster's ``ranks_per_node``. If a node fails, the
        others are stopped. A timeout kills every node and raises TimeoutError.
        """
        nproc_per_node = self.ranks_per_node if nproc_per_node is None else nproc_per_node
        procs = []
        for i in range(self.nodes):
            argv = ["bash", MULTINODE, "--nnodes", str(self.nodes), "--node-rank", str(i),
                    "--master-addr", self.addresses[0], "--master-port", str(port),
                    "--nproc-per-node", str(nproc_per_node), "--iface", IFACE, "--", script, *(args or [])]
            procs.append(subprocess.Popen(self.exec_argv(i, argv, {"PYTHON": sys.executable, **(env or {})}),
                                          cwd=ROOT, stdout=stdout, stderr=stderr))
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                codes = [p.poll() for p in procs]
                if all(c is not None for c in codes):
                    return codes
                if any(c not in (None, 0) for c in codes):
                    logger.error("a node failed (exit codes %s): stopping the others", codes)
                    time.sleep(2)  # let the others report their error first
                    for ns in self.namespaces:
                        _kill_namespace_processes(ns)
                    return [p.wait() for p in procs]
                if deadline is not None and time.monotonic() > deadline:
                    for ns in self.namespaces:
                        _kill_namespace_processes(ns)
                    raise TimeoutError(f"{script} did not finish within {timeout} s on the emulated cluster")
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def run_loopback(nodes: int, nproc_per_node: int, script: str, args: list[str], port: int = 29500) -> int:
    """The fallback: one torchrun on loopback with all ranks, no shaping."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
            str(nodes * nproc_per_node), "--master-addr", "127.0.0.1", "--master-port", str(port), script, *args]
    return subprocess.run(argv, cwd=ROOT).returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a torchrun script on an emulated cluster (network namespaces + shaped veth links).",
        epilog="example: python -m launch.cluster --nodes 4 --rate 1gbit -- benchmarks/comm_bench.py")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rate", default="1gbit", help="link rate per direction, tc syntax; 'none' = unshaped")
    parser.add_argument("--delay", default=None, help="one-way delay per shaped end, e.g. 0.5ms")
    parser.add_argument("--burst", type=int, default=None, help="tbf burst in bytes (default: 2 ms at the rate)")
    parser.add_argument("--ranks-per-node", "--nproc-per-node", dest="nproc_per_node", type=int, default=1,
                        help="ranks per node (torchrun --nproc-per-node); only links between nodes are shaped")
    parser.add_argument("--port", type=int, default=29500)
    parser.add_argument("--no-measure", action="store_true", help="skip the link-rate measurement")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the job is killed")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="'cleanup' (remove stale namespaces), 'probe' (bring up, measure, tear down), "
                             "or -- script.py [args]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command == ["cleanup"]:
        removed = cleanup_stale()
        logger.info("removed %d stale namespaces %s", len(removed), removed)
        return 0
    if not command:
        parser.error("give 'cleanup', 'probe' or -- script.py [args]")
    rate = None if args.rate.lower() == "none" else args.rate
    reason = unsupported_reason()
    if reason:
        if command == ["probe"]:
            logger.error("emulated cluster unavailable: %s", reason)
            return 2
        logger.warning("emulated cluster unavailable: %s. Falling back to ONE loopback torchrun with %d ranks, "
                       "WITHOUT link shaping: timings measure this machine's loopback, not a %s network.",
                       reason, args.nodes * args.nproc_per_node, rate)
        return run_loopback(args.nodes, args.nproc_per_node, command[0], command[1:], args.port)
    with EmulatedCluster(args.nodes, rate, args.delay, args.burst, ranks_per_node=args.nproc_per_node) as cluster:
        if not args.no_measure:
            link = cluster.measure_rate()
            print(json.dumps({"link": link}), flush=True)
        if command == ["probe"]:
            print(cluster.qdiscs())
            return 0
        codes = cluster.run_torchrun(command[0], command[1:], port=args.port, timeout=args.timeout)
    logger.info("node exit codes: %s", codes)
    return max(abs(c) for c in codes)


if __name__ == "__main__":
    sys.exit(main())
