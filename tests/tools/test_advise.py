"""python -m gradsparse.advise: for real at world 2 on gloo (torchrun), and in one process."""

import json
import math
import os
import sys

import pytest
import torch

from gradsparse import advise
from gradsparse.advise import main
from gradsparse.cost import LinkModel, Topology, collective_time
from gradsparse.errors import InvalidConfigError
from gradsparse.model_shapes import mlp
from gradsparse.stepmodel import ddp_buckets
from tests.distributed import free_port
from tests.docblocks import ROOT
from tests.subprocesses import run_group


def test_advise_at_world_two_measures_the_link_and_recommends_the_fastest(tmp_path):
    out = tmp_path / "advice.json"
    proc = run_group([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                      "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "gradsparse.advise",
                      "--model", "mlp", "--sizes", "4096,65536,1048576", "--repeats", "3", "--ranks-per-node", "1",
                      "--compute-ms", "5", "--json", str(out)],
                     timeout=240, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("recommended:") == 1                      # the table comes from rank 0 only
    advice = json.loads(out.read_text())
    assert advice["measured_on"] == {"world": 2, "ranks_per_node": 1}
    link = advice["links"]["flat"]
    assert link["world"] == 2 and [r["op"] for r in link["timings"]] == ["allreduce", "allgather",
                                                                         "allreduce_fp16"] * 3
    # the CPU the collectives take per rank, fitted per kind: positive, finite, and below the wall time
    assert set(link["cpu"]) == {"allreduce", "allgather", "allreduce_fp16"}
    for r in link["timings"]:
        assert 0 < r["cpu_s"] < 2 * r["median_s"] + 0.05, r
    for kind, cpu in link["cpu"].items():
        assert cpu is not None and math.isfinite(cpu["bytes_per_s"]) and cpu["bytes_per_s"] > 0, kind
    model = link["model"]
    assert math.isfinite(model["bytes_per_s"]) and model["bytes_per_s"] > 0
    assert math.isfinite(model["latency_s"]) and model["latency_s"] >= 0
    predicted = advice["predicted"]
    assert set(predicted) == {"dense", "fp16", "powersgd4", "topk1", "dgc0.1", "dgc0.1auto"}
    best = min(predicted, key=lambda m: predicted[m]["step_s"])
    assert advice["recommendation"]["method"] == best
    assert advice["recommendation"]["sparse_pays"] == (
        min(predicted[m]["step_s"] for m in ("topk1", "dgc0.1", "dgc0.1auto")) < predicted["dense"]["step_s"])
    assert all(p["step_s"] >= 0.005 for p in predicted.values())       # no method beats the compute time
    # the dense prediction is the fitted link's allreduce of the model's buckets
    fitted = LinkModel(model["latency_s"], model["bytes_per_s"])
    comm = sum(collective_time("allreduce", 4 * b.numel, 2, fitted) for b in ddp_buckets(mlp()))
    assert predicted["dense"]["comm_s"] == pytest.approx(comm)
    k = advice["kernels"]
    assert k["dgc0.1"]["per_element_s"] > 0
    assert k["topk1"]["compressed_elements"] == 256 * 512  # 2.weight (2,560 elements) goes whole


def test_advise_in_one_process_needs_a_link_and_takes_a_factory():
    with pytest.raises(InvalidConfigError, match="--link-gbit"):
        main(["--model", "mlp", "--quiet"])
    with pytest.raises(InvalidConfigError, match="module:factory"):
        main(["--model", "nosuchmodel", "--link-gbit", "1", "--quiet"])
    with pytest.raises(InvalidConfigError, match="has no function 'nosuch'"):  # was AttributeError
        main(["--model", "benchmarks.bench_models:nosuch", "--link-gbit", "1", "--quiet"])
    with pytest.raises(InvalidConfigError, match="returned int, not an nn.Module"):  # was AttributeError
        main(["--model", "os:getpid", "--link-gbit", "1", "--quiet"])
    advice = main(["--model", "benchmarks.bench_models:mlp", "--link-gbit", "1", "--latency-us", "50", "--quiet",
                   "--nodes", "4", "--ranks-per-node", "2", "--compute-ms", "3"])
    assert advice["parameters"] == 133_898
    assert advice["predicted_for"]["nodes"] == 4 and "dgc0.1hier" in advice["predicted"]
    assert advice["predicted_for"]["inter"]["gbit_per_s"] == pytest.approx(1.0)
    topo = Topology(4, LinkModel(50e-6, 1.25e8), local=2, intra=LinkModel(5e-6, 1.5e11))
    dense = sum(collective_time("allreduce", 4 * b.numel, 8, topo.flat_link) for b in ddp_buckets(mlp()))
    assert advice["predicted"]["dense"]["comm_s"] == pytest.approx(dense)


def test_advise_on_two_nodes_of_two_ranks_shares_the_link_between_nodes(tmp_path):
    # 4 ranks as 2 "nodes" of 2 (all on loopback here): the link inside a node and the one between nodes are
    # timed on their own groups, and rank 0's link between nodes reaches every rank as plain numbers
    out = tmp_path / "advice.json"
    proc = run_group([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4",
                      "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "gradsparse.advise",
                      "--model", "mlp", "--sizes", "4096,1048576,4194304", "--repeats", "3", "--ranks-per-node", "2",
                      "--json", str(out), "--quiet"],
                     timeout=240, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    advice = json.loads(out.read_text())
    assert advice["measured_on"] == {"world": 4, "ranks_per_node": 2}
    links = advice["links"]
    assert links["intra"]["world"] == 2 and links["inter"]["world"] == 2
    assert [r["op"] for r in links["inter"]["timings"]] == ["allreduce", "allgather", "allreduce_fp16"] * 3
    assert all(r["median_s"] > 0 and r["cpu_s"] > 0 for r in links["inter"]["timings"])
    assert links["inter"]["cpu"]["allreduce"]["bytes_per_s"] > 0         # rank 0's CPU fit reached every rank
    assert advice["predicted_for"]["inter"]["bytes_per_s"] == links["inter"]["model"]["bytes_per_s"] > 0
    # inside a node the hierarchical prediction uses the round through shared memory, as the reducer does
    shared = links["intra_shared"]
    assert shared["world"] == 2 and [r["op"] for r in shared["timings"]] == ["shared_memory_round"] * 3
    assert advice["predicted_for"]["intra"] == shared["model"] and shared["model"]["bytes_per_s"] > 0


def test_timings_that_fit_no_line_give_the_bandwidth_of_the_largest_transfers():
    from gradsparse.advise import _bandwidth_only
    from gradsparse.cost import Observation

    # a loaded machine: the larger transfer came back faster than the smaller one
    obs = [Observation.collective("allreduce", 4e6, 2, 0.004), Observation.collective("allreduce", 4e6, 2, 0.006),
           Observation.collective("allreduce", 4e4, 2, 0.005)]
    with pytest.raises(InvalidConfigError, match="do not grow"):
        LinkModel.fit(obs)
    link = _bandwidth_only(obs)
    assert link.latency_s == 0 and link.bytes_per_s == pytest.approx((4e6 / 0.004 + 4e6 / 0.006) / 2)  # median rate


@pytest.mark.parametrize("bucket_mb", [25.0, math.inf])
def test_powersgd_cost_times_pytorchs_hook_on_ddps_buckets(bucket_mb):
    import torch

    from gradsparse.advise import _powersgd_cost
    from gradsparse.stepmodel import _powersgd_split

    shapes = mlp()
    got = _powersgd_cost(shapes, 4, 2, torch.Generator().manual_seed(0), bucket_mb)
    buckets = ddp_buckets(shapes, bucket_mb=bucket_mb, first_bucket_mb=1.0 if bucket_mb == 25.0 else bucket_mb)
    assert got["buckets"] == len(buckets)
    split = [_powersgd_split(b, 4) for b in buckets]
    assert got["compressed_elements"] == sum(c for _, _, c in split)
    # the hook compressed what the step model says it does: numel / (1-D tensors + P + Q)
    numel = sum(b.numel for b in buckets)
    assert got["compression_rate"] == pytest.approx(numel / sum(plain + pq for plain, pq, _ in split))
    assert got["step_s"] > 0 and got["per_element_s"] == pytest.approx(got["step_s"] / got["compressed_elements"])


@pytest.mark.parametrize("fp16_s, dgc_s, expected", [
    (0.9, 0.5, "sparse pays here."),
    (0.4, 0.5, "sparse beats dense here (DGC: 2.00x dense), but fp16 is faster."),
    (0.4, 1.25, "sparse does NOT pay here (best: DGC, 0.80x dense)."),
])
def test_the_verdict_says_whether_sparse_is_best_beats_dense_or_neither(fp16_s, dgc_s, expected):
    predicted = {"dense": {"label": "dense", "step_s": 1.0}, "fp16": {"label": "fp16", "step_s": fp16_s},
                 "topk1": {"label": "TopK", "step_s": 2.0}, "dgc0.1": {"label": "DGC", "step_s": dgc_s}}
    assert advise.verdict(advise.recommend(predicted)) == expected


def test_a_busy_machine_is_reported_with_the_advice():
    """Under more load than cores the kernel timings are waits for descheduled threads (24 ms a kernel
    seen here at load 4.7 on 2 cores): the advice says so, in its JSON and as a WARNING."""
    from gradsparse.advise import busy_warning

    assert busy_warning(1.9, 2, 2) is None
    warning = busy_warning(4.7, 2, 2)
    assert "load 4.7 on 2 cores" in warning and "OMP_NUM_THREADS=1" in warning
    assert "quiet machine" in busy_warning(3.0, 2, 1) and "OMP_NUM_THREADS" not in busy_warning(3.0, 2, 1)
    advice = main(["--model", "mlp", "--link-gbit", "1", "--quiet"])
    machine = advice["machine"]
    assert machine["cores"] >= 1 and machine["threads"] == torch.get_num_threads()
    assert machine["warning"] == busy_warning(machine["load_average"], machine["cores"], machine["threads"])
