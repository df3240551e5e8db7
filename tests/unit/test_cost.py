"""gradsparse.cost: the collective formulas against hand computations, the fit against synthetic timings."""

import math
import random

import pytest
import torch

from gradsparse.cost import (
    Choice,
    KernelCost,
    LinkEstimator,
    LinkModel,
    Observation,
    Topology,
    choose,
    collective_terms,
    collective_time,
    dense_time,
    hierarchical_time,
    payload_bytes,
    sparse_time,
    transport_times,
)
from gradsparse.errors import InvalidConfigError

GBIT = LinkModel(latency_s=50e-6, bytes_per_s=1.25e8)
NVLINK = LinkModel(latency_s=5e-6, bytes_per_s=1.5e11)


# ---------------------------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("kind, nbytes, world, algorithm, expected", [
    ("allreduce", 100, 4, "ring", (6, 150)),          # 2(p-1) rounds, 2(p-1)/p * B
    ("allreduce", 100, 5, "tree", (6, 160)),          # 2 ceil(log2 5) = 6 rounds
    ("reduce_scatter", 80, 4, "ring", (3, 60)),       # (p-1), (p-1)/p * B
    ("allgather", 10, 8, "ring", (7, 70)),            # every rank receives 7 payloads of 10 B
    ("allgather", 10, 8, "tree", (3, 70)),
    ("allgather", 10, 1, "ring", (0, 0)),             # nothing moves at world 1
    ("alltoall", 80, 4, "ring", (3, 60)),             # p - 1 pieces of B / p leave each rank
    ("alltoall", 80, 4, "tree", (3, 60)),             # a pairwise exchange whichever algorithm
    ("p2p", 10, 1, "ring", (1, 10)),
])
def test_collective_terms_by_hand(kind, nbytes, world, algorithm, expected):
    assert collective_terms(kind, nbytes, world, algorithm=algorithm) == pytest.approx(expected)


def test_shared_link_divides_bandwidth_not_latency():
    rounds, moved = collective_terms("allgather", 1000, 4, share=8)
    assert (rounds, moved) == (3, 8 * 3 * 1000)
    assert collective_time("allgather", 1000, 4, GBIT, share=8) == pytest.approx(3 * 50e-6 + 24000 / 1.25e8)


def test_payload_bytes_is_the_wire_layout():
    # header 32 B + 25,000 int32 indices (100,000 B, already 8-aligned) + 25,000 fp32 values
    assert payload_bytes(25_000_000, 0.001) == 32 + 100_000 + 100_000
    # 3 pairs in fp16: 32 + 12 -> 48 (aligned), + 6 values + 2 whole -> 56 (aligned)
    assert payload_bytes(3000, 0.001, value_dtype=torch.float16, n_dense=2) == 64
    assert payload_bytes(10, 1.0) == 32 + 40 + 40


def test_dense_time_is_a_ring_allreduce_over_the_slow_link():
    # 2 nodes, 100 MB at 1 Gbit/s: 2 rounds of latency + 100 MB / 125 MB/s
    assert dense_time(25_000_000, Topology(2, GBIT)) == pytest.approx(2 * 50e-6 + 0.8)
    # 2 nodes x 4 ranks: the ring crosses the slow link; 2*7 rounds, 2*7/8 of the bytes
    topo = Topology(2, GBIT, local=4, intra=NVLINK)
    assert dense_time(25_000_000, topo) == pytest.approx(14 * 50e-6 + 1.75 * 1e8 / 1.25e8)
    assert dense_time(1000, Topology(1, None, local=1)) == 0.0


def test_sparse_time_by_hand():
    kernel = KernelCost(per_element_s=2e-9, per_pair_s=5e-9, fixed_s=1e-4)
    n, d, p = 10_000_000, 0.01, 4
    t = sparse_time(n, d, Topology(p, GBIT), kernel=kernel)
    payload = 32 + 100_000 * 8
    assert t["compress"] == pytest.approx(1e-4 + 2e-9 * n)
    assert t["exchange"] == pytest.approx(3 * 50e-6 + 3 * payload / 1.25e8)
    assert t["unpack"] == pytest.approx(5e-9 * p * 100_000)
    assert t["total"] == pytest.approx(t["compress"] + t["exchange"] + t["unpack"])
    # a time passed in replaces the kernel's compression estimate
    assert sparse_time(n, d, Topology(p, GBIT), kernel=kernel, compress_s=0.5)["compress"] == 0.5


def test_hierarchical_time_by_hand():
    kernel = KernelCost(per_element_s=1e-9, per_pair_s=4e-9)
    n, d, nodes, local = 12_000_000, 0.001, 3, 2
    topo = Topology(nodes, GBIT, local=local, intra=NVLINK)
    t = hierarchical_time(n, d, topo, kernel=kernel)
    dense_bytes, shard = 4 * n, n // local
    shard_payload = 32 + 6000 * 8                                    # density 0.1 % of the 6M-element shard
    assert t["reduce_scatter"] == pytest.approx(5e-6 + 0.5 * dense_bytes / 1.5e11)
    assert t["compress"] == pytest.approx(1e-9 * shard)
    # 2 other nodes' payloads; the node's 2 local ranks exchange at once over its one link
    assert t["exchange"] == pytest.approx(2 * 50e-6 + 2 * 2 * shard_payload / 1.25e8)
    assert t["unpack"] == pytest.approx(4e-9 * nodes * 6000)
    assert t["allgather"] == pytest.approx(5e-6 + 1 * (4 * shard) / 1.5e11)
    assert t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total"))


def test_hierarchical_moves_fewer_inter_node_bytes_than_flat():
    topo = Topology(4, GBIT, local=8, intra=NVLINK)
    flat = sparse_time(25_000_000, 0.001, topo)["exchange"]
    hier = hierarchical_time(25_000_000, 0.001, topo)["exchange"]
    # flat: 31 payloads of 25k pairs through each node's link; hierarchical: 8 x 3 payloads of 3,125 pairs
    assert flat / hier == pytest.approx((31 * 200_032) / (8 * 3 * 25_032), rel=0.02)


# -------------------------------------------------------------------------------------------------- choose
def test_choose_takes_the_cheapest_and_reports_every_prediction():
    topo = Topology(2, GBIT, local=2, intra=NVLINK)
    c = choose(25_000_000, 0.001, topo, compress_s=0.05)
    assert set(c.predicted) == {"dense", "sparse", "hierarchical"}
    assert c.transport == min(c.predicted, key=c.predicted.get) == "hierarchical"
    assert c.seconds == c.predicted["hierarchical"] and c.speedup_vs_dense > 10
    assert c.as_dict()["transport"] == "hierarchical"
    assert choose(25_000_000, 0.001, topo, compress_s=0.05) == c          # deterministic


def test_choose_dense_on_a_fast_link_when_compressing_costs_more():
    fast = Topology(2, LinkModel(5e-6, 5e10))
    assert choose(25_000_000, 0.001, fast, compress_s=0.01).transport == "dense"
    assert choose(25_000_000, 0.001, fast, compress_s=0.0).transport == "sparse"


def test_ties_go_to_dense():
    # at world 1 nothing moves: dense costs 0, sparse its compression 0 -> tie -> dense
    c = choose(1000, 0.5, Topology(1, None), compress_s=0.0)
    assert c.predicted == {"dense": 0.0, "sparse": 0.0} and c.transport == "dense"


@pytest.mark.parametrize("world", [8, 64, 512])
def test_sparse_stops_paying_near_density_times_world_of_one(world):
    """With free compression and no latency, an allgather of 8-byte pairs loses to a ring allreduce of fp32 once
    world * 8 * density * n > 2 * 4 * n, i.e. density * world > 1."""
    link = LinkModel(0.0, 1e9)
    n = 10_000_000
    assert choose(n, 0.5 / world, Topology(world, link)).transport == "sparse"
    assert choose(n, 2.0 / world, Topology(world, link)).transport == "dense"


def test_hierarchical_needs_nodes_of_several_ranks_and_candidates_are_checked():
    assert "hierarchical" not in transport_times(1000, 0.1, Topology(4, GBIT))
    with pytest.raises(InvalidConfigError, match="intra="):
        Topology(2, GBIT, local=2)
    with pytest.raises(InvalidConfigError, match="candidate transport"):
        choose(1000, 0.1, Topology(2, GBIT), candidates=("dense", "gossip"))
    assert choose(1000, 0.1, Topology(2, GBIT), candidates=("sparse",)).transport == "sparse"


# ------------------------------------------------------------------------------------------------------ fit
TRUE = LinkModel(latency_s=80e-6, bytes_per_s=1.1e8)


def _synthetic(seed, noise=0.05, outliers=0.2, sizes=None):
    """Allreduce and allgather timings on TRUE with multiplicative noise and a share of slow outliers."""
    rng = random.Random(seed)
    sizes = sizes or [int(10 ** (3 + 5 * i / 23)) for i in range(24)]      # 1 kB .. 100 MB
    slow = set(rng.sample(range(len(sizes)), round(outliers * len(sizes))))
    obs = []
    for i, nbytes in enumerate(sizes):
        kind, world = ("allreduce", 2) if i % 2 else ("allgather", 4)
        rounds, moved = collective_terms(kind, nbytes, world)
        t = TRUE.seconds(moved, rounds) * (1 + rng.gauss(0, noise))
        if i in slow:
            t *= rng.uniform(2, 10)                                       # a straggler or a hiccup
        obs.append(Observation.collective(kind, nbytes, world, t))
    return obs


def _err(model):
    return max(abs(model.latency_s / TRUE.latency_s - 1), abs(model.bytes_per_s / TRUE.bytes_per_s - 1))


def test_fit_recovers_exact_parameters_from_mixed_collectives():
    model = LinkModel.fit(_synthetic(0, noise=0.0, outliers=0.0))
    assert _err(model) < 1e-9


def test_fit_is_robust_to_noise_and_outliers():
    """5 % noise and 5 of 24 timings 2-10x too slow, over 10 seeds: within 10 % every time; a plain fit is worse."""
    robust, plain = [], []
    for seed in range(10):
        obs = _synthetic(seed)
        robust.append(_err(LinkModel.fit(obs)))
        plain.append(_err(LinkModel.fit(obs, robust=False)))
    assert max(robust) < 0.10, robust
    assert sum(plain) > 2 * sum(robust), (plain, robust)   # the outliers would have moved a plain least-squares fit


def test_fit_from_plain_pairs_and_bandwidth_only():
    pairs = [(n, n / 2e9) for n in (1e4, 1e6, 1e8)]                     # no latency at all
    model = LinkModel.fit(pairs)
    assert model.latency_s == pytest.approx(0.0, abs=1e-12) and model.bytes_per_s == pytest.approx(2e9)


def test_fit_refuses_what_it_cannot_tell_apart():
    with pytest.raises(InvalidConfigError, match="at least 2"):
        LinkModel.fit([(1e6, 0.01)])
    with pytest.raises(InvalidConfigError, match="two different sizes"):
        LinkModel.fit([(1e6, 0.01), (1e6, 0.011), (1e6, 0.012)])
    with pytest.raises(InvalidConfigError, match="do not grow"):
        LinkModel.fit([(1e3, 0.01), (1e6, 0.005), (1e7, 0.001)])
    with pytest.raises(InvalidConfigError):
        LinkModel(-1.0, 1e9)
    with pytest.raises(InvalidConfigError):
        Observation(1, 100, 0.0)


def test_estimator_tracks_the_last_window_and_round_trips():
    prior = LinkModel(1e-3, 1e7)
    est = LinkEstimator(window=12, prior=prior)
    assert est.model is prior
    old = LinkModel(1e-4, 1e8)
    for n in (1e4, 1e5, 1e6, 1e7) * 3:
        est.observe("allreduce", n, 2, old.seconds(*reversed(collective_terms("allreduce", n, 2))))
    assert est.model.bytes_per_s == pytest.approx(1e8)
    new = LinkModel(2e-5, 1e9)                                            # the link changed
    for n in (1e4, 1e5, 1e6, 1e7) * 3:
        est.observe("allgather", n, 3, new.seconds(*reversed(collective_terms("allgather", n, 3))))
    assert len(est) == 12
    assert est.model.bytes_per_s == pytest.approx(1e9) and est.model.latency_s == pytest.approx(2e-5)
    est.observe("allreduce", 1e6, 1, 5.0)                                # world 1 moves nothing: ignored
    assert len(est) == 12
    again = LinkEstimator(window=12)
    again.load_state_dict(est.state_dict())
    assert again.model == est.model


def test_choice_and_models_are_plain_data():
    c = Choice("dense", {"dense": 1.0})
    assert c.speedup_vs_dense == 1.0 and math.isclose(GBIT.gbit_per_s, 1.0)
    assert KernelCost(1e-9).as_dict() == {"per_element_s": 1e-9, "per_pair_s": 0.0, "fixed_s": 0.0}


def test_kernel_cost_fit_from_compression_timings():
    rng = random.Random(3)
    sizes = [2_049_000, 7_875_584, 6_563_840, 6_637_568, 2_431_040] * 4         # ResNet-50's buckets, 4 steps
    timings = [(n, (2e-4 + 3e-9 * n) * (1 + rng.gauss(0, 0.03))) for n in sizes]
    timings[7] = (timings[7][0], timings[7][1] * 6)                               # one step preempted
    k = KernelCost.fit(timings, per_pair_s=1e-9)
    assert k.per_element_s == pytest.approx(3e-9, rel=0.05) and k.fixed_s == pytest.approx(2e-4, rel=0.5)
    assert k.per_pair_s == 1e-9
    one_size = KernelCost.fit([(1e6, 0.004), (1e6, 0.005), (1e6, 0.1)])
    assert one_size.per_element_s == pytest.approx(5e-9) and one_size.fixed_s == 0.0
    with pytest.raises(InvalidConfigError):
        KernelCost.fit([])


def test_whole_tensors_and_an_exact_count():
    """n_dense of the bucket's elements go whole (not compressed); count overrides density x the rest."""
    kernel = KernelCost(per_element_s=1e-9, per_pair_s=2e-9)
    topo = Topology(2, GBIT, local=2, intra=NVLINK)
    t = sparse_time(1_000_000, 0.01, topo, kernel=kernel, n_dense=10_000)
    assert t["compress"] == pytest.approx(1e-9 * 990_000)                 # the whole tensors are not compressed
    assert t["exchange"] == pytest.approx(3 * 50e-6 + 3 * (32 + 9_900 * 4 + 9_900 * 4 + 10_000 * 4) / 1.25e8)
    assert t["unpack"] == pytest.approx(2e-9 * 4 * (9_900 + 10_000))
    exact = sparse_time(1_000_000, 0.01, topo, kernel=kernel, n_dense=10_000, count=123)
    assert exact["exchange"] == pytest.approx(3 * 50e-6 + 3 * payload_bytes(246, 0.5, n_dense=10_000) / 1.25e8)
    h = hierarchical_time(1_000_000, 0.01, topo, kernel=kernel, n_dense=10_000)
    assert h["compress"] == pytest.approx(1e-9 * 495_000)
    assert h["exchange"] == pytest.approx(50e-6 + 2 * (32 + 4_950 * 8 + 5_000 * 4) / 1.25e8)   # 2 exchanges share
    assert choose(1_000_000, 0.01, topo, kernel=kernel, n_dense=10_000, count=123).predicted["sparse"] == \
        pytest.approx(exact["total"])
    with pytest.raises(InvalidConfigError, match="n_dense"):
        sparse_time(100, 0.1, topo, n_dense=101)
    with pytest.raises(InvalidConfigError, match="count"):
        sparse_time(100, 0.1, topo, count=101)
