"""benchmarks/scale.py: the validation and the projection use the step model as documented."""

import pytest

from benchmarks import scale
from gradsparse.cost import LinkModel
from gradsparse.model_shapes import BUILTIN
from gradsparse.stepmodel import METHODS, ddp_buckets, step_time

LINK = {"latency_s": 1e-4, "bytes_per_s": 1.1e8, "gbit_per_s": 0.88}
INPUTS = {"links": {"2x1@1gbit": {"flat": LINK, "tcp_bits_per_s": 9.5e8},
                    "2x2@1gbit": {"flat": LINK, "inter": LINK, "intra": {**LINK, "bytes_per_s": 1e9},
                                  "tcp_bits_per_s": 9.5e8}},
          "kernels_cpu": {"dgc0.1": {"per_element_s": 4e-9}, "topk1": {"per_element_s": 4e-9},
                          "unpack_per_pair_s": 3e-9, "fp16_per_element_s": 1e-9, "powersgd_per_element_s": 2e-8}}


def test_validation_predicts_each_point_with_its_own_compute_and_compression():
    point = {"nodes": 2, "local": 2, "rate": "1gbit", "compute_ms": 500, "compress_ms": 200,
             "steps": {"dense": 1500, "dgc0.1": 800}}
    rows = scale.validate(INPUTS, [point])
    assert [r["method"] for r in rows] == ["dense", "dgc0.1"]
    for r in rows:
        assert r["error"] == pytest.approx(r["predicted_ms"] / r["measured_ms"] - 1)
        assert r["predicted_ms"] >= 500                      # never below the run's compute
    dense = step_time(METHODS["dense"], ddp_buckets(BUILTIN["resnet50"]()),
                      scale.Topology(2, LinkModel(1e-4, 1.1e8), local=2, intra=LinkModel(1e-4, 1e9)),
                      scale.Kernels(), 0.5)
    assert rows[0]["predicted_ms"] == pytest.approx(1e3 * dense["step"])


def test_projection_covers_the_grid_and_crossovers_read_it():
    rows = scale.project(models=("resnet50",), nodes_list=[8, 1024], rates=[10, 400])
    assert len(rows) == 2 * 2 * len(scale.PROJECTED)
    assert all(r["step_ms"] >= 1e3 * scale.GPU["compute_s"]["resnet50"] - 1e-9 for r in rows)
    by = {(r["gbit"], r["nodes"], r["method"]): r["step_ms"] for r in rows}
    # past density x world ~ 1 the flat allgather moves more than a ring allreduce: 0.001 x 8,192 GPUs = 8
    assert by[10, 1024, "dgc0.1"] > by[10, 1024, "dense"]
    assert by[10, 1024, "dgc0.1hier"] < by[10, 1024, "dgc0.1"]
    cross = scale.crossovers(rows)
    for c in cross:
        mine = {n: by[c["gbit"], n, "dgc0.1"] for n in (8, 1024)}
        dense = {n: by[c["gbit"], n, "dense"] for n in (8, 1024)}
        expected = next((n for n in (8, 1024) if mine[n] >= dense[n]), None)
        assert c["dgc0.1"] == expected and c["dgc0.1_pays_at_8"] == (mine[8] < dense[8])


def test_validation_charges_the_collectives_cpu_where_ranks_share_the_cores():
    import copy

    from gradsparse.stepmodel import CollectiveCpu, cpu_bound

    cpu = {"allreduce": {"latency_s": 1e-4, "bytes_per_s": 2e9}, "allgather": {"latency_s": 1e-4, "bytes_per_s": 1e9},
           "allreduce_fp16": {"latency_s": 1e-4, "bytes_per_s": 1e9}}
    inputs = copy.deepcopy(INPUTS)
    inputs["links"]["2x2@1gbit"]["cpu"] = {"intra": cpu, "flat": cpu}
    inputs["ddp_overhead"] = {"per_element_s": 1e-9}
    point = {"nodes": 1, "local": 4, "rate": "1gbit", "compute_ms": 300, "compress_ms": None,
             "steps": {"dense": 500}}
    row = scale.validate(inputs, [point])[0]
    buckets = ddp_buckets(BUILTIN["resnet50"]())
    gloo = CollectiveCpu(LinkModel(1e-4, 2e9), LinkModel(1e-4, 1e9), LinkModel(1e-4, 1e9))
    by_hand = sum(gloo.seconds("allreduce", 4 * b.numel, 4) for b in buckets)
    assert row["collective_cpu_ms"] == pytest.approx(1e3 * by_hand)
    busy = 0.3 + 2 * 1e-9 * sum(b.numel for b in buckets)        # DDP's work at 4 ranks on 2 cores: x 2
    assert row["cpu_bound_ms"] == pytest.approx(1e3 * cpu_bound(busy, by_hand, 0.5))
    assert row["predicted_ms"] == pytest.approx(max(row["schedule_ms"], row["cpu_bound_ms"]))
    assert row["bound_by"] == "cpu"                                # loopback at 1 GB/s: the cores bind
    # inputs without the CPU measurement: no bound, the schedule alone
    assert scale.validate(INPUTS, [point])[0]["cpu_bound_ms"] is None


def test_scale_docstring_examples():
    """benchmarks/ is outside `make test`'s doctest collection: its examples (host_cpu, kernel_inputs) run here."""
    import doctest

    result = doctest.testmod(scale)
    assert result.attempted >= 2 and result.failed == 0, result


def test_the_link_between_nodes_is_at_most_the_measured_stream():
    def inputs(fit_gbit, stream_gbit):
        flat = {"latency_s": 5e-5, "bytes_per_s": fit_gbit * 1e9 / 8}
        return {"links": {"2x1@1gbit": {"flat": flat, "tcp_bits_per_s": stream_gbit * 1e9},
                          "2x2@1gbit": {"intra": {"latency_s": 1e-5, "bytes_per_s": 1e9}}}}
    above = scale._link(inputs(1.027, 0.956), "1gbit", "inter")  # small messages within tbf's burst lift the fit
    assert above.bytes_per_s == 0.956e9 / 8 and above.latency_s == 5e-5
    below = scale._link(inputs(0.925, 0.956), "1gbit", "inter")
    assert below.bytes_per_s == 0.925e9 / 8
    assert scale._link(inputs(1.027, 0.956), "1gbit", "intra").bytes_per_s == 1e9  # inside a node: no stream


def test_hierarchical_points_take_the_round_through_shared_memory_or_are_left_out():
    """A hierarchical run reduced inside each node through /dev/shm: its point is predicted with advise's round
    through shared memory as the intra link, as the ranks' own copies (``node_shared_memory``); inputs measured
    before that round was timed have nothing to predict it with, and the point is left out, not guessed."""
    import copy

    from gradsparse.cost import KernelCost

    point = {"nodes": 2, "local": 2, "rate": "1gbit", "compute_ms": 500, "compress_ms": 200,
             "steps": {"dgc0.1": 800, "dgc0.1hier": 780}}
    assert [r["method"] for r in scale.validate(INPUTS, [point])] == ["dgc0.1"]
    inputs = copy.deepcopy(INPUTS)
    shm = {"latency_s": 9e-4, "bytes_per_s": 2.2e9}
    inputs["links"]["2x2@1gbit"]["intra_shared"] = shm
    rows = {r["method"]: r for r in scale.validate(inputs, [point])}
    assert set(rows) == {"dgc0.1", "dgc0.1hier"}
    buckets = ddp_buckets(BUILTIN["resnet50"]())
    sparse = KernelCost(per_element_s=0.2 / sum(b.compressed for b in buckets))
    hier = step_time(METHODS["dgc0.1hier"], buckets,
                     scale.Topology(2, LinkModel(1e-4, 1.1e8), local=2, intra=LinkModel(9e-4, 2.2e9)),
                     scale.Kernels(sparse, node_shared_memory=True), 0.5)
    assert rows["dgc0.1hier"]["predicted_ms"] == pytest.approx(1e3 * hier["step"])
    # the flat point is unchanged by the hierarchical input
    assert rows["dgc0.1"]["predicted_ms"] == scale.validate(INPUTS, [point])[0]["predicted_ms"]


def test_kernel_costs_replace_the_runs_compression_time():
    point = {"nodes": 2, "local": 2, "rate": "1gbit", "compute_ms": 500, "compress_ms": 200,
             "steps": {"dense": 1500, "dgc0.1": 800}}
    own, kernels = (scale.validate(INPUTS, [point], run_compress=flag) for flag in (True, False))
    timed = scale.validate(INPUTS, [{k: v for k, v in point.items() if k != "compress_ms"}])
    assert own[0]["predicted_ms"] == kernels[0]["predicted_ms"]          # dense: no compression either way
    assert kernels[1]["predicted_ms"] == timed[1]["predicted_ms"]        # the kernels timed here, as without one
    assert kernels[1]["predicted_ms"] != own[1]["predicted_ms"]


def test_warm_up_points_take_the_25_percent_runs_own_compression_or_are_left_out():
    """DGC's 25 % stage (the split transport's runs) is predicted with the compression its allreduce run's hook
    reported, by the split and allreduce kinds at 25 %; without it (or with the kernels timed at 0.1 %) the
    points are left out, not guessed."""
    from gradsparse.cost import KernelCost

    point = {"nodes": 2, "local": 1, "rate": "1gbit", "compute_ms": 500, "compress_ms": None,
             "warm_compress_ms": 300, "steps": {"dense": 1500, "dgc0.1warmar": 1600, "dgc0.1warmsplit": 1500}}
    rows = {r["method"]: r for r in scale.validate(INPUTS, [point])}
    assert set(rows) == {"dense", "dgc0.1warmar", "dgc0.1warmsplit"}
    buckets = ddp_buckets(BUILTIN["resnet50"]())
    per_element = 0.3 / sum(b.compressed for b in buckets)
    # the split's unpacking is not in the allreduce run's time: priced at the unpack timed here
    for name, model, per_pair in (("dgc0.1warmar", "dgc25allreduce", 0.0), ("dgc0.1warmsplit", "dgc25split", 3e-9)):
        t = step_time(METHODS[model], buckets, scale.Topology(2, LinkModel(1e-4, 1.1e8)),
                      scale.Kernels(KernelCost(per_element, per_pair)), 0.5)
        assert rows[name]["predicted_ms"] == pytest.approx(1e3 * t["step"])
    # the alltoall's share of the link slows the split alone
    half = scale.Algorithms(alltoall_efficiency=0.5)
    slow = {r["method"]: r for r in scale.validate(INPUTS, [point], algorithms=half)}
    assert slow["dgc0.1warmsplit"]["predicted_ms"] > rows["dgc0.1warmsplit"]["predicted_ms"]
    assert slow["dgc0.1warmar"]["predicted_ms"] == rows["dgc0.1warmar"]["predicted_ms"]
    assert {r["method"] for r in scale.validate(INPUTS, [{**point, "warm_compress_ms": None}])} == {"dense"}
    assert {r["method"] for r in scale.validate(INPUTS, [point], run_compress=False)} == {"dense"}
