"""gradsparse.stepmodel and gradsparse.model_shapes: buckets as DDP makes them, step times that obey their model."""

import dataclasses
import math

import pytest
import torch.distributed as dist

from gradsparse.cost import KernelCost, LinkModel, Topology, collective_time, payload_bytes
from gradsparse.model_shapes import BUILTIN, numel, transformer_1b
from gradsparse.stepmodel import (METHODS, Algorithms, Bucket, CollectiveCpu, Kernels, bucket_cost, cpu_bound,
                                  ddp_buckets, step_time)
from gradsparse.reducer import DESCRIPTOR_BYTES

GBIT = LinkModel(50e-6, 1.25e8)
NVLINK = LinkModel(5e-6, 1.5e11)
KERNELS = Kernels(KernelCost(per_element_s=3e-9, per_pair_s=4e-9), fp16_per_element_s=1e-9,
                  powersgd_per_element_s=5e-9)


@pytest.mark.parametrize("name", ["resnet50", "mlp"])
def test_builtin_shapes_are_the_benchmark_models(name):
    from benchmarks.bench_models import make_model

    model = make_model(name)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == BUILTIN[name]()


def test_transformer_1b_counts_by_hand():
    d, layers = 2048, 18
    per_layer = 12 * d * d + 13 * d                       # qkv, proj, 4x MLP in and out, their biases, 2 LayerNorms
    assert numel(transformer_1b()) == 50_304 * d + 2048 * d + layers * per_layer + 2 * d


@pytest.mark.parametrize("bucket_mb", [25.0, 4.0])
def test_ddp_buckets_match_torch_assignment_in_gradient_order(bucket_mb):
    from benchmarks.bench_models import make_model

    params = list(make_model("resnet50").parameters())[::-1]     # DDP's rebuilt buckets follow gradient order
    groups, _ = dist._compute_bucket_assignment_by_size(params, [dist._DEFAULT_FIRST_BUCKET_BYTES,
                                                                 int(bucket_mb * 2**20)])
    ours = ddp_buckets(BUILTIN["resnet50"](), bucket_mb=bucket_mb)
    assert [b.numel for b in ours] == [sum(params[i].numel() for i in g) for g in groups]


def test_bucket_costs_by_hand():
    b = Bucket(numel=1_000_000, compressed=990_000, matrices=((1000, 990),))
    topo = Topology(4, GBIT)
    dense = bucket_cost(METHODS["dense"], b, topo, KERNELS)
    assert dense == {"control": 0.0, "sync": 0.0, "comm": collective_time("allreduce", 4e6, 4, GBIT), "cpu": 0.0}
    fp16 = bucket_cost(METHODS["fp16"], b, topo, KERNELS)
    assert fp16["comm"] == collective_time("allreduce", 2e6, 4, GBIT) and fp16["sync"] == pytest.approx(1e-3)
    dgc = bucket_cost(METHODS["dgc0.1"], b, topo, KERNELS)
    assert dgc["control"] == collective_time("allgather", DESCRIPTOR_BYTES, 4, GBIT)
    assert dgc["sync"] == pytest.approx(3e-9 * 990_000)
    pairs = 990 + 10_000                                     # 0.1 % of the compressed part; the small tensors whole
    assert dgc["comm"] == pytest.approx(collective_time("allgather", payload_bytes(990_000, 0.001, n_dense=10_000),
                                                        4, GBIT) + 4e-9 * 4 * pairs)
    selected = bucket_cost(METHODS["dgc25allreduce"], b, topo, KERNELS)   # the selection, summed densely
    assert selected["control"] == dgc["control"] and selected["sync"] == pytest.approx(3e-9 * 990_000)
    assert selected["comm"] == dense["comm"]
    psgd = bucket_cost(METHODS["powersgd4"], b, topo, KERNELS)
    pq = (1000 + 990) * 4
    assert psgd["sync"] == pytest.approx(5e-9 * 990_000)
    assert psgd["comm"] == pytest.approx(collective_time("allreduce", 4 * 10_000, 4, GBIT)
                                         + 2 * collective_time("allreduce", 4 * pq / 2, 4, GBIT))


def test_step_is_never_below_compute_and_dense_at_world_one_is_compute():
    buckets = ddp_buckets(BUILTIN["resnet50"]())
    for nodes in (1, 2, 16):
        topo = Topology(nodes, GBIT if nodes > 1 else None, local=1) if nodes > 1 else Topology(1, None)
        for name, method in METHODS.items():
            t = step_time(method, buckets, topo, KERNELS, compute_s=0.2)
            assert t["step"] >= 0.2 - 1e-12, (nodes, name, t)
    assert step_time(METHODS["dense"], buckets, Topology(1, None), KERNELS, 0.2)["step"] == pytest.approx(0.2)


def test_overlap_hides_communication_behind_backward_but_one_bucket_does_not():
    buckets = ddp_buckets(BUILTIN["resnet50"]())
    topo = Topology(2, LinkModel(0.0, 1e12))                         # communication nearly free
    many = step_time(METHODS["dense"], buckets, topo, Kernels(), compute_s=1.0)
    assert many["step"] == pytest.approx(1.0, abs=1e-3)
    slow = Topology(2, LinkModel(0.0, 1.25e8))
    many = step_time(METHODS["dense"], buckets, slow, Kernels(), compute_s=1.0)
    one = step_time(METHODS["dense"], [Bucket(sum(b.numel for b in buckets), 0, ())], slow, Kernels(), 1.0)
    assert one["step"] == pytest.approx(1.0 + one["comm"])             # everything after the backward pass
    assert many["step"] < one["step"] and many["comm"] == pytest.approx(one["comm"])


def test_hierarchical_beats_flat_on_nodes_of_several_ranks_and_auto_is_the_cheapest():
    buckets = ddp_buckets(BUILTIN["resnet50"]())
    topo = Topology(8, GBIT, local=8, intra=NVLINK)
    flat = step_time(METHODS["dgc0.1"], buckets, topo, KERNELS, 0.1)
    hier = step_time(METHODS["dgc0.1hier"], buckets, topo, KERNELS, 0.1)
    auto = step_time(METHODS["dgc0.1auto"], buckets, topo, KERNELS, 0.1)
    assert hier["step"] < flat["step"]
    assert auto["step"] <= min(hier["step"], flat["step"]) + 1e-9
    assert sum(auto["transports"].values()) == len(buckets)
    # one rank per node: hierarchical is the flat path
    flat1 = Topology(8, GBIT)
    assert step_time(METHODS["dgc0.1hier"], buckets, flat1, KERNELS, 0.1) == \
        step_time(METHODS["dgc0.1"], buckets, flat1, KERNELS, 0.1)


def test_tree_latency_helps_dense_at_scale():
    buckets = ddp_buckets(BUILTIN["resnet50"]())
    topo = Topology(512, LinkModel(20e-6, 1.25e10), local=8, intra=NVLINK)
    ring = step_time(METHODS["dense"], buckets, topo, KERNELS, 0.1)["comm"]
    tree = step_time(METHODS["dense"], buckets, topo, KERNELS, 0.1, algorithms=Algorithms(allreduce="tree"))["comm"]
    rounds = 2 * (4096 - 1) - 2 * math.ceil(math.log2(4096))
    assert ring - tree == pytest.approx(len(buckets) * rounds * 20e-6)


# ------------------------------------------------------------------ the collectives' CPU on ranks that share cores
LOOPBACK = LinkModel(1e-4, 1.2e9)                                 # a fast "link": the CPU, not the wire, sets the pace
GLOO_CPU = CollectiveCpu(allreduce=LinkModel(2e-5, 1.5e9), allgather=LinkModel(2e-5, 2e9),
                         allreduce_fp16=LinkModel(2e-5, 0.8e9))


def test_cpu_bound_by_hand():
    assert cpu_bound(0.3, 0.1, 1.0) == pytest.approx(0.4)                # 2 threads a rank on one core each
    assert cpu_bound(0.4, 0.1, 0.5) == pytest.approx(0.4 + 0.1 / 0.5)    # 4 ranks on 2 cores
    assert cpu_bound(0.3, 0.1, 2.0) == pytest.approx(0.3)                # a core for each thread: nothing added
    assert cpu_bound(0.1, 0.3, 4.0) == pytest.approx(0.3)                # the collectives' thread alone
    assert cpu_bound(0.3, 0.3, 1.5) == pytest.approx(0.6 / 1.5)          # between: the work over the cores


def test_collective_cpu_is_summed_per_bucket_and_binds_only_where_cores_are_short():
    buckets = ddp_buckets(BUILTIN["resnet50"]())
    topo = Topology(2, LOOPBACK)
    kernels = Kernels(collective_cpu=GLOO_CPU)
    free = step_time(METHODS["dense"], buckets, topo, kernels, 0.25)                       # default: own cores
    assert free["cpu_bound"] is None and free["step"] == free["schedule"]
    shared = step_time(METHODS["dense"], buckets, topo, kernels, 0.25, cores_per_rank=1.0)
    by_hand = sum(collective_time("allreduce", 4 * b.numel, 2, GLOO_CPU.allreduce) for b in buckets)
    assert shared["cpu"] == pytest.approx(by_hand)
    assert shared["schedule"] == pytest.approx(free["step"])
    assert shared["step"] == pytest.approx(0.25 + by_hand)
    assert shared["step"] > free["step"]                                     # the fast link hid it all before
    # fp16: half the bytes at the fp16 allreduce's own CPU cost, the cast on the training thread
    fp16 = step_time(METHODS["fp16"], buckets, topo, Kernels(fp16_per_element_s=1e-9, collective_cpu=GLOO_CPU),
                     0.25, cores_per_rank=1.0)
    cast = 1e-9 * sum(b.numel for b in buckets)
    assert fp16["cpu"] == pytest.approx(sum(collective_time("allreduce", 2 * b.numel, 2, GLOO_CPU.allreduce_fp16)
                                            for b in buckets))
    assert fp16["step"] == pytest.approx(max(fp16["schedule"], 0.25 + cast + fp16["cpu"]))
    # a slow link: the collectives' CPU is spread over their transfer, the schedule binds
    slow = step_time(METHODS["dense"], buckets, Topology(2, GBIT), kernels, 0.25, cores_per_rank=1.0)
    assert slow["step"] == slow["schedule"] > slow["cpu_bound"]


def test_hierarchical_through_shared_memory_counts_the_node_steps_as_the_ranks_own_copies():
    """``node_shared_memory``: the node's reduce-scatter stays the hook's own work and the copy back becomes the
    callback's CPU (its time on the intra link), replacing gloo's CPU for both; nothing else changes."""
    b = Bucket(numel=4_000_000, compressed=3_990_000, matrices=())
    shm = LinkModel(9e-4, 2.2e9)                                   # advise's round through /dev/shm, 2 ranks a node
    topo = Topology(2, GBIT, local=2, intra=shm)
    method = METHODS["dgc0.1hier"]
    gloo = bucket_cost(method, b, topo, Kernels(KernelCost(per_element_s=3e-9), collective_cpu=GLOO_CPU))
    own = bucket_cost(method, b, topo, Kernels(KernelCost(per_element_s=3e-9), collective_cpu=GLOO_CPU,
                                               node_shared_memory=True))
    back = collective_time("allgather", 4 * math.ceil(b.numel / 2), 2, shm)
    node_gloo = (collective_time("reduce_scatter", 4 * b.numel, 2, GLOO_CPU.allreduce)
                 + collective_time("allgather", 4 * math.ceil(b.numel / 2), 2, GLOO_CPU.allgather))
    assert {k: own[k] for k in ("control", "sync", "comm")} == {k: gloo[k] for k in ("control", "sync", "comm")}
    assert own["cpu"] == pytest.approx(gloo["cpu"] - node_gloo + back)
    assert own["sync"] > collective_time("reduce_scatter", 4 * b.numel, 2, shm)  # the round's first half, and DGC


def test_sparse_cpu_counts_descriptors_payloads_and_unpack():
    b = Bucket(numel=1_000_000, compressed=990_000, matrices=((1000, 990),))
    kernels = Kernels(KernelCost(per_element_s=3e-9, per_pair_s=4e-9), collective_cpu=GLOO_CPU)
    dgc = bucket_cost(METHODS["dgc0.1"], b, Topology(4, GBIT), kernels)
    payload = payload_bytes(990_000, 0.001, n_dense=10_000)
    assert dgc["cpu"] == pytest.approx(collective_time("allgather", DESCRIPTOR_BYTES, 4, GLOO_CPU.allgather)
                                       + collective_time("allgather", payload, 4, GLOO_CPU.allgather)
                                       + 4e-9 * 4 * (990 + 10_000))


def test_ddp_own_work_runs_on_the_training_thread_for_every_ddp_method():
    buckets = ddp_buckets(BUILTIN["resnet50"]())
    n = sum(b.numel for b in buckets)
    topo = Topology(2, LinkModel(0.0, 1e13))                          # the network costs nothing
    for name in ("dense", "dgc0.1", "powersgd4_1b"):
        plain = step_time(METHODS[name], buckets, topo, KERNELS, 0.2)
        ddp = step_time(METHODS[name], buckets, topo, Kernels(**{**KERNELS.__dict__, "ddp_per_element_s": 1e-9}), 0.2)
        assert ddp["step"] == pytest.approx(plain["step"] + 1e-9 * n, rel=1e-6), name
        assert ddp["hook"] == pytest.approx(plain["hook"]), name           # not the hook's work
    assert step_time(METHODS["compute"], buckets, topo, Kernels(ddp_per_element_s=1e-9), 0.2)["step"] == 0.2


def test_split_by_hand_its_alltoall_blocks_the_hook_and_its_regions_follow_the_union():
    b = Bucket(numel=1_000_000, compressed=990_000, matrices=())
    topo = Topology(4, GBIT)
    for density in (0.001, 0.25):
        method = dataclasses.replace(METHODS["dgc0.1split"], density=density)
        cost = bucket_cost(method, b, topo, KERNELS)
        nbytes = payload_bytes(990_000, density, n_dense=10_000)
        assert cost["control"] == collective_time("allgather", DESCRIPTOR_BYTES, 4, GBIT)
        assert cost["sync"] == pytest.approx(3e-9 * 990_000)
        assert cost["after"] == pytest.approx(collective_time("alltoall", nbytes, 4, GBIT)
                                              + collective_time("allgather", 8, 4, GBIT))
        assert cost["post"] == pytest.approx(4e-9 * (math.ceil(density * 990_000) + 10_000))
        reduced = (1 - (1 - density) ** 4) * 990_000 / 4 + 10_000 / 4   # any rank's pick, and the whole elements
        message = 16 + min(8 * reduced, 4 * 250_000)                     # as pairs, or as values when smaller
        assert cost["comm"] == pytest.approx(collective_time("allgather", message, 4, GBIT) + 4e-9 * 4 * reduced)
    assert 8 * (1 - 0.75 ** 4) * 990_000 / 4 > 4 * 250_000              # at 25 % the regions go as values
    # 2 nodes of 2 ranks: both ranks' pieces cross the node's link at once
    shared = bucket_cost(METHODS["dgc0.1split"], b, Topology(2, GBIT, local=2, intra=NVLINK), KERNELS)
    nbytes = payload_bytes(990_000, 0.001, n_dense=10_000)
    assert shared["after"] == pytest.approx(collective_time("alltoall", nbytes, 4, GBIT, share=2)
                                            + collective_time("allgather", 8, 4, GBIT))
    # an alltoall at half the link's rate (gloo's reached 57 % here) takes twice the bytes' time, the same latency
    half = bucket_cost(METHODS["dgc0.1split"], b, topo, KERNELS, Algorithms(alltoall_efficiency=0.5))
    assert half["after"] == pytest.approx(collective_time("alltoall", 2 * nbytes, 4, GBIT)
                                          + collective_time("allgather", 8, 4, GBIT))
    with pytest.raises(ValueError):
        Algorithms(alltoall_efficiency=0.0)


def test_the_splits_blocking_alltoall_waits_for_the_queue_and_delays_the_backward_pass():
    buckets = ddp_buckets(BUILTIN["resnet50"]())
    slow = Topology(4, LinkModel(50e-6, 1.25e7))
    split = step_time(METHODS["dgc0.1split"], buckets, slow, KERNELS, 0.2)
    costs = [bucket_cost(METHODS["dgc0.1split"], b, slow, KERNELS) for b in buckets]
    # every bucket's alltoall and the hook's own work sit on the training thread
    assert split["hook"] >= sum(c["control"] + c["sync"] + c["after"] + c["post"] for c in costs) - 1e-12
    # at 25 % over a slow link the split moves fewer bytes than the allgather of pairs, and is faster
    warm = {kind: step_time(dataclasses.replace(METHODS["dgc0.1split"], kind=kind, density=0.25), buckets, slow,
                            KERNELS, 0.2)["step"] for kind in ("sparse", "split")}
    assert warm["split"] < warm["sparse"]
