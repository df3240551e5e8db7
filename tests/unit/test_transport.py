"""The transport choice: weighed in time from numbers every rank shares, the same on every rank,
never changing what is selected or kept (gradsparse/transport.py, SparseReducer._choose_transport)."""

import pytest
import torch
import torch.distributed as dist

from gradsparse import Threshold, TopK
from gradsparse.comm import LocalCommunicator
from gradsparse.comm.torch_dist import TorchDistCommunicator
from gradsparse.errors import InvalidConfigError
from gradsparse.reducer import DESCRIPTOR_BYTES, HEALTH, Segment, SparseReducer
from gradsparse.stats import ALLGATHER, ALLREDUCE
from gradsparse.transport import FIELDS, TransportModel

from ..distributed import run_world

NUMEL = 40_000
SEGMENTS = [Segment("a", 0, 30_000), Segment("b", 30_000, 10_000)]


def _fields(kind, nbytes, micros, allgather_ps, allreduce_ps):
    return [kind, nbytes, micros, allgather_ps, allreduce_ps]


def test_descriptor_carries_the_transport_fields():
    assert DESCRIPTOR_BYTES == 8 * (HEALTH + 1 + len(FIELDS))


def test_model_is_silent_until_link_and_both_local_costs_are_known():
    m = TransportModel()
    args = dict(numel=NUMEL, element_size=4, payload_bytes=1_000, received_bytes=2_000, world=2)
    m.absorb([_fields(1, 8_000, 100, 2_000, 0), _fields(1, 800_000, 1_000, 2_000, 0)], world=2)
    assert m.choose(**args) is None  # the allreduce's local work was never measured
    m.absorb([_fields(2, 160_000, 400, 0, 500), _fields(0, 0, 0, 0, 0)], world=2)
    transport, predicted = m.choose(**args)
    assert transport == ALLGATHER and set(predicted) == {ALLGATHER, ALLREDUCE}
    assert predicted[ALLGATHER] < predicted[ALLREDUCE]


def test_expensive_pairs_tip_the_choice_to_the_allreduce_and_the_slowest_rank_counts():
    m = TransportModel()
    link = [_fields(1, 8_000, 110, 0, 0), _fields(2, 4_000_000, 4_100, 0, 0)]  # about 1 GB/s, 50 us latency
    m.absorb(link, world=2)
    args = dict(numel=1_000_000, element_size=4, payload_bytes=2_000_000, received_bytes=4_000_000, world=2)
    m.absorb([_fields(0, 0, 0, 100, 1_000), _fields(0, 0, 0, 100, 1_000)], world=2)
    assert m.choose(**args)[0] == ALLGATHER
    # one slow rank unpacks at 5 ns per byte: 20 ms for the pairs against a 4 ms allreduce + 1 ms of scattering
    m.absorb([_fields(0, 0, 0, 100, 1_000), _fields(0, 0, 0, 5_000, 1_000)], world=2)
    assert m.choose(**args)[0] == ALLREDUCE


def test_a_rank_sends_each_observation_once():
    m = TransportModel()
    m.record(ALLGATHER, 1234, 0.002, local_s=0.001, units=1000)
    first = m.descriptor()
    assert first[:3] == [1, 1234, 2000] and first[3] == 1_000_000  # 1 us per byte, in ps
    assert m.descriptor()[:3] == [0, 0, 0] and m.descriptor()[3] == 1_000_000


def test_transport_option_is_validated():
    with pytest.raises(InvalidConfigError, match="transport"):
        SparseReducer(TopK(0.1), LocalCommunicator(), transport="fastest")


def _train(reducer, rank, steps, method):
    transports, outs = [], []
    for step in range(steps):
        g = torch.randn(NUMEL, generator=torch.Generator().manual_seed(1000 * rank + step))
        if method == "threshold":
            g[: 1000 * (step % 5)] *= 40  # the number of pairs changes from step to step
        stats = []
        # step 0 is a dense iteration, as the adapters' first one (by allreduce: a second kind and size to fit)
        outs.append(reducer.reduce(g, SEGMENTS, step, select_all=step == 0, on_stats=stats.append).wait().clone())
        transports.append(stats[0].transport)
    return transports, outs


def _auto_worker(rank, world, method):
    compressor = TopK(0.05) if method == "topk" else Threshold(2.0)
    auto = SparseReducer(compressor, TorchDistCommunicator(None), min_compress_numel=1, transport="auto")
    transports, outs = _train(auto, rank, 12, method)
    link = auto._transport.link.model
    mine = (transports, None if link is None else link.as_dict())
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    by_bytes = SparseReducer(compressor, TorchDistCommunicator(None), min_compress_numel=1, transport="bytes")
    _, reference = _train(by_bytes, rank, 12, method)
    return {"same_everywhere": all(g == gathered[0] for g in gathered), "transports": transports,
            "observed": len(auto._transport.link) > 0,
            # the allreduce sums in another order than the allgather's unpack: where the ranks' values (up to 40x
            # randn here) cancel, the two differ by a few ulps of the largest summand, not of the result
            "close": all(torch.allclose(a, b, rtol=1e-6, atol=1e-6 * max(1.0, float(b.abs().max())))
                         for a, b in zip(outs, reference)),
            "memory_equal": all(torch.equal(auto.memory.state[k]["residual"], by_bytes.memory.state[k]["residual"])
                                for k in ("a", "b"))}


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", ["topk", "threshold"])
def test_auto_transport_is_chosen_alike_on_every_rank_and_changes_nothing_kept(method):
    for r in run_world(_auto_worker, 3, method):
        # every rank made the same choices from the same link model (fitted from the buckets' own collectives,
        # or none yet where timings under load did not fit a latency and a bandwidth)
        assert r["same_everywhere"], r["transports"]
        assert r["observed"]  # the ranks' timings reached every rank's model
        assert r["close"] and r["memory_equal"]


def _forced_worker(rank, world):
    out = {}
    for transport in (ALLGATHER, ALLREDUCE):
        r = SparseReducer(TopK(0.05), TorchDistCommunicator(None), min_compress_numel=1, transport=transport)
        stats = []
        g = torch.randn(NUMEL, generator=torch.Generator().manual_seed(rank))
        res = r.reduce(g, SEGMENTS, 1, on_stats=stats.append).wait().clone()
        out[transport] = (stats[0].transport, res, {k: r.memory.state[k]["residual"].clone() for k in ("a", "b")})
    return out


@pytest.mark.multiprocess
def test_forced_transports_move_the_same_selection():
    for r in run_world(_forced_worker, 2):
        (t_gather, out_gather, kept_gather), (t_reduce, out_reduce, kept_reduce) = r[ALLGATHER], r[ALLREDUCE]
        assert (t_gather, t_reduce) == (ALLGATHER, ALLREDUCE)
        assert torch.allclose(out_gather, out_reduce, rtol=1e-6, atol=1e-7)
        assert all(torch.equal(kept_gather[k], kept_reduce[k]) for k in kept_gather)
