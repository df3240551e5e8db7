"""The emulated cluster and the multi-node launcher, on real namespaces, veth links and torchrun."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from launch.cluster import ClusterUnavailable, EmulatedCluster, list_namespaces, unsupported_reason

from ..docblocks import ROOT

REASON = unsupported_reason()
needs_netns = pytest.mark.skipif(REASON is not None, reason=f"emulated cluster unavailable: {REASON}")


def _ours(cluster):
    return set(cluster.namespaces + ([cluster.hub] if cluster.hub else [])) & set(list_namespaces())


@needs_netns
def _check_job(cluster, tmp_path, port: int) -> dict:
    """launch/check_job.py under torchrun on every node of ``cluster``; its report."""
    out = tmp_path / "check.json"
    codes = cluster.run_torchrun("launch/check_job.py", ["--out", str(out)], port=port, timeout=120,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert codes == [0, 0]
    return json.loads(out.read_text())


def test_two_nodes_shaped_run_torchrun_across_and_tear_down(tmp_path):
    cluster = EmulatedCluster(2, rate="200mbit")
    with cluster:
        assert _ours(cluster) == set(cluster.namespaces)
        link = cluster.measure_rate(seconds=1.0)
        # shaped: close to the configured rate, and far below what an unshaped veth carries (>2 Gbit/s here)
        assert 0.7 * 200e6 < link["bits_per_s"] < 1.1 * 200e6, link
        report = _check_job(cluster, tmp_path, 29611)
    assert not _ours(cluster), "namespaces left behind"
    assert report["world_size"] == 2 and report["allreduce"] == [2, 2]
    assert [r["address"] for r in report["ranks"]] == ["10.55.0.1", "10.55.0.2"]
    assert all(r["iface"] == "eth0" for r in report["ranks"])
    # a 4 MB ring allreduce over 2 nodes moves about 4 MB out of each node's own interface
    assert all(3.9e6 < b < 5e6 for b in report["tx_bytes_4MB_allreduce"]), report


@needs_netns
def test_two_nodes_of_two_ranks_shape_only_the_link_between_nodes(tmp_path):
    """2 x 2: one torchrun --nproc-per-node 2 per namespace; ranks numbered node by node; inside a node unshaped."""
    cluster = EmulatedCluster(2, rate="200mbit", ranks_per_node=2)
    with cluster:
        between = cluster.measure_rate(src=1, dst=0, seconds=0.8)["bits_per_s"]
        inside = cluster.measure_rate(src=0, dst=0, seconds=0.8)["bits_per_s"]   # node 0 to its own address
        report = _check_job(cluster, tmp_path, 29613)
    assert not _ours(cluster), "namespaces left behind"
    assert 0.7 * 200e6 < between < 1.1 * 200e6 and inside > 5 * 200e6, (between, inside)
    assert report["world_size"] == 4 and report["allreduce"] == [4, 4, 4, 4]
    assert [r["address"] for r in report["ranks"]] == ["10.55.0.1", "10.55.0.1", "10.55.0.2", "10.55.0.2"]
    assert [cluster.node_of_rank(r) for r in range(4)] == [0, 0, 1, 1]
    # a ring allreduce of 4 MB over ranks 0-1 | 2-3 crosses each node's link once per direction: 2 x 3/4 x 4 MB =
    # 6 MB out of each node's eth0 (the counter is the node's, shared by its 2 ranks). Had the ranks of a node
    # talked over eth0 too, each node would send 12 MB.
    assert all(4.5e6 < b < 9e6 for b in report["tx_bytes_4MB_allreduce"]), report


@needs_netns
def test_bridge_for_three_nodes_is_shaped_both_ways():
    with EmulatedCluster(3, rate="100mbit") as cluster:
        up = cluster.measure_rate(src=2, dst=0, seconds=0.8)["bits_per_s"]
        down = cluster.measure_rate(src=0, dst=1, seconds=0.8)["bits_per_s"]
        assert "tbf" in cluster.qdiscs()
    assert not _ours(cluster)
    assert 0.7e8 < up < 1.1e8 and 0.7e8 < down < 1.1e8, (up, down)


@needs_netns
def test_teardown_after_an_error():
    cluster = EmulatedCluster(3, rate="1gbit")
    with pytest.raises(RuntimeError, match="boom"):
        with cluster:
            assert len(_ours(cluster)) == 4
            raise RuntimeError("boom")
    assert not _ours(cluster)


@needs_netns
def test_delay_is_applied_or_refused_clearly_and_torn_down():
    """netem may be missing from the kernel (it is on the development VM): then a clear error, nothing left."""
    cluster = EmulatedCluster(2, rate="1gbit", delay="2ms")
    try:
        with cluster:
            assert "netem" in cluster.qdiscs() and "tbf" in cluster.qdiscs()
    except ClusterUnavailable as err:
        assert "sch_netem" in str(err)
    assert not _ours(cluster)


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_teardown_on_ctrl_c_and_sigterm(sig):
    # Ctrl-C as in a terminal: a job started in the background by a non-interactive shell (as CI
    # runners may) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    script = textwrap.dedent("""
        import signal, time
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from launch.cluster import EmulatedCluster
        with EmulatedCluster(2, rate="1gbit") as c:
            print(" ".join(c.namespaces), flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    names = proc.stdout.readline().split()
    assert len(names) == 2 and set(names) <= set(list_namespaces())
    proc.send_signal(sig)
    try:
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert not set(names) & set(list_namespaces())


def test_fallback_to_loopback_says_why(tmp_path):
    """Without iproute2 on PATH the command line says so and runs one loopback torchrun instead."""
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "PATH": os.path.dirname(sys.executable)}
    proc = subprocess.run([sys.executable, "-m", "launch.cluster", "--nodes", "2", "--rate", "1gbit", "--port", "29612",
                           "--", "launch/check_job.py", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert "emulated cluster unavailable" in proc.stderr and "WITHOUT link shaping" in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["allreduce"] == [2, 2]


def test_multinode_script_refuses_bad_arguments():
    bad_rank = subprocess.run(["bash", "launch/multinode.sh", "--nnodes", "2", "--node-rank", "2", "--master-addr",
                               "10.0.0.1", "--", "x.py"], cwd=ROOT, capture_output=True, text=True)
    assert bad_rank.returncode == 2 and "not in [0, 2)" in bad_rank.stderr
    missing = subprocess.run(["bash", "launch/multinode.sh", "--nnodes", "2"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "required" in missing.stderr
    bad_iface = subprocess.run(["bash", "launch/multinode.sh", "--nnodes", "1", "--node-rank", "0", "--master-addr",
                                "127.0.0.1", "--iface", "nosuch0", "--", "x.py"], cwd=ROOT, capture_output=True, text=True)
    assert bad_iface.returncode == 2 and "no interface nosuch0" in bad_iface.stderr


def test_cluster_refuses_impossible_sizes_and_rates():
    with pytest.raises(ValueError, match="at least 2 nodes"):
        EmulatedCluster(1)
    with pytest.raises(ValueError, match="link rate"):
        EmulatedCluster(2, rate="fast")
    with pytest.raises(ValueError, match="ranks_per_node"):
        EmulatedCluster(2, ranks_per_node=0)
