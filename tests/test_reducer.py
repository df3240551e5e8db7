"""SparseReducer on one process (LocalCommunicator): errors, conservation, fallback, stats."""

import pytest
import torch

from gradsparse import DGC, Threshold, TopK
from gradsparse.comm import LocalCommunicator
from gradsparse.errors import BucketError, InvalidConfigError, UnsupportedGradientError
from gradsparse.payload import PayloadLayout
from gradsparse.reducer import DESCRIPTOR_BYTES, Segment, SparseReducer


def reducer(compressor=None, **kw):
    kw.setdefault("min_compress_numel", 100)
    return SparseReducer(compressor or TopK(0.01), LocalCommunicator(), **kw)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_integer_and_complex_gradients_are_refused(dtype):
    with pytest.raises(UnsupportedGradientError):
        reducer().reduce(torch.zeros(10, dtype=dtype), None, 0)


def test_empty_bucket_is_refused():
    with pytest.raises(BucketError, match="empty"):
        reducer().reduce(torch.zeros(0), None, 0)


def test_bucket_over_int32_is_refused_without_allocating():
    huge = torch.zeros(1).expand(2**31)  # numel 2**31, one element of memory
    with pytest.raises(BucketError, match="int32"):
        reducer().reduce(huge, None, 0)


@pytest.mark.parametrize("kwargs,match", [({"op": "adasum"}, "Adasum"), ({"op": "max"}, "op"),
                                          ({"granularity": "layer"}, "granularity"),
                                          ({"nonfinite": "ignore"}, "nonfinite"),
                                          ({"min_compress_numel": 0}, "min_compress"),
                                          ({"value_dtype": torch.int8}, "value_dtype")])
def test_bad_reducer_options_are_refused(kwargs, match):
    with pytest.raises(InvalidConfigError, match=match):
        reducer(**kwargs)


def test_segments_outside_the_bucket_are_refused():
    with pytest.raises(BucketError):
        reducer().reduce(torch.zeros(100), [Segment("a", 0, 60), Segment("b", 50, 50)], 0)
    with pytest.raises(BucketError):
        reducer().reduce(torch.zeros(100), [Segment("a", 90, 20)], 0)


@pytest.mark.parametrize("compressor", [TopK(0.01), Threshold(1.5), DGC(0.01, warmup=None)], ids=["topk", "threshold", "dgc"])
@pytest.mark.parametrize("wire", [None, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["parameter", "bucket"])
def test_sent_plus_kept_equals_compensated_exactly(compressor, wire, granularity):
    r = reducer(compressor, value_dtype=wire, granularity=granularity)
    segments = [Segment("a", 0, 3000), Segment("small", 3000, 50), Segment("b", 3050, 2000)]
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        g = torch.randn(5050, generator=gen)
        big = {s.key: g[s.offset:s.offset + s.numel].clone() for s in segments if s.key != "small"}
        state = {k: {n: t.clone() for n, t in slots.items()} for k, slots in r.memory.state.items()}
        out = r.reduce(g.clone(), segments, step).wait()
        for s in segments:
            if s.key == "small":
                if isinstance(compressor, DGC):
                    continue  # whole tensors get momentum on the average: see the test below
                torch.testing.assert_close(out[s.offset:s.offset + s.numel], g[s.offset:s.offset + s.numel],
                                           rtol=0, atol=0 if wire is None else 1e-2)
                continue
            sent = out[s.offset:s.offset + s.numel]
            if isinstance(compressor, DGC):
                u_old = state.get(s.key, {}).get("momentum", torch.zeros(s.numel))
                v_old = state.get(s.key, {}).get("velocity", torch.zeros(s.numel))
                compensated = v_old + (0.9 * u_old + big[s.key])
                kept = r.memory.state[s.key]["velocity"]
            else:
                compensated = state.get(s.key, {}).get("residual", torch.zeros(s.numel)) + big[s.key]
                kept = r.memory.state[s.key]["residual"]
            assert torch.equal(kept + sent, compensated)
            assert 0 < torch.count_nonzero(sent) < s.numel


def test_per_parameter_selection_gives_each_tensor_its_own_k():
    r = reducer(TopK(0.01))
    g = torch.cat([torch.randn(1000) * 100, torch.randn(1000) * 0.01])
    out = r.reduce(g, [Segment("loud", 0, 1000), Segment("quiet", 1000, 1000)], 1).wait()
    assert torch.count_nonzero(out[:1000]) == 10 and torch.count_nonzero(out[1000:]) == 10
    r = reducer(TopK(0.01), granularity="bucket")
    g = torch.cat([torch.randn(1000) * 100, torch.randn(1000) * 0.01])
    out = r.reduce(g, [Segment("loud", 0, 1000), Segment("quiet", 1000, 1000)], 1).wait()
    assert torch.count_nonzero(out[:1000]) == 20 and torch.count_nonzero(out[1000:]) == 0


def test_dense_fallback_moves_the_same_selection_and_is_counted():
    # fp16 gradients and wire: 6 bytes per pair against 2 * 2 bytes per element for an allreduce,
    # so at world size 1 the allreduce is cheaper above a density of 2/3.
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(1000, generator=gen).half() for _ in range(4)]
    for ratio, expect_dense in ((0.3, False), (0.7, True)):
        stats, r = [], reducer(TopK(ratio))
        residual = torch.zeros(1000)
        for step, g in enumerate(grads, start=1):
            out = r.reduce(g.clone(), None, step, on_stats=stats.append).wait()
            v = residual + g.float()
            idx = TopK(ratio).select(v, 0, 0)
            sent = torch.zeros(1000).index_put_((idx,), v[idx].half().float())
            assert torch.equal(out, sent.half())  # same selection whichever transport
            residual = v - sent
        assert all(st.dense == expect_dense for st in stats)
        assert torch.equal(residual, r.memory.state["bucket"]["residual"])


def test_stats_count_the_payload_bytes():
    stats = []
    segments = [Segment("w", 0, 9_950), Segment("b", 9_950, 50)]
    expected = PayloadLayout(100, 50, torch.float32).nbytes
    reducer(TopK(0.01)).reduce(torch.randn(10_000), segments, 1, on_stats=stats.append).wait()
    assert stats[0].bytes_sent == expected + DESCRIPTOR_BYTES == stats[0].bytes_received
    reducer(TopK(0.01), verify_every=0).reduce(torch.randn(10_000), segments, 1, on_stats=stats.append).wait()
    assert stats[1].bytes_sent == expected == stats[1].bytes_received
    assert stats[0].selected == 100 and stats[0].whole == 50 and not stats[0].dense


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("how", ["force_dense", "ratio_1"])
def test_everything_sent_is_dense_momentum_sgd(how, nesterov):
    """Nothing dropped: no momentum factor masking, so the update is torch SGD's momentum buffer (in float64 here)."""
    r = reducer(DGC(1.0 if how == "ratio_1" else 0.01, nesterov=nesterov, warmup=None))
    gen = torch.Generator().manual_seed(0)
    buf = torch.zeros(1000, dtype=torch.float64)
    for step in range(20):
        g = torch.randn(1000, generator=gen)
        out = r.reduce(g.clone(), None, step, force_dense=how == "force_dense").wait()
        buf = 0.9 * buf + g.double()
        want = g.double() + 0.9 * buf if nesterov else buf
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(r.memory.state["bucket"]["velocity"]) == 0  # all of v was sent
    assert torch.count_nonzero(r.memory.state["bucket"]["momentum"]) == 1000  # and the momentum kept


def test_dgc_whole_tensors_get_momentum_on_the_averaged_gradient():
    r = reducer(DGC(0.01, warmup=None), min_compress_numel=10_000)
    u = torch.zeros(1000)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        g = torch.randn(1000, generator=gen)
        u = 0.9 * u + g
        out = r.reduce(g.clone(), [Segment("bias", 0, 1000)], step).wait()
        torch.testing.assert_close(out, u, rtol=0, atol=0)


class CountingCommunicator(LocalCommunicator):
    """World size 1 that counts descriptor exchanges."""

    def __init__(self):
        self.exchanges = 0

    def allgather_ints(self, values, device):
        self.exchanges += 1
        return super().allgather_ints(values, device)


@pytest.mark.parametrize("verify_every, expected", [(1, 6), (4, 2), (0, 0)])
def test_descriptors_are_compared_every_verify_every_calls(verify_every, expected):
    comm = CountingCommunicator()
    r = SparseReducer(TopK(0.01), comm, min_compress_numel=1, verify_every=verify_every)
    for step in range(6):
        r.reduce(torch.randn(1000), None, step).wait()
    assert comm.exchanges == expected


def test_threshold_without_verification_still_exchanges_sizes():
    comm = CountingCommunicator()
    r = SparseReducer(Threshold(0.5), comm, min_compress_numel=1, verify_every=0)
    r.reduce(torch.randn(1000), None, 0).wait()
    assert comm.exchanges == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compressor", [TopK(0.01), DGC(0.01, warmup=None)], ids=["topk", "dgc"])
def test_half_precision_gradients_keep_fp32_memory(dtype, compressor):
    """Residuals of fp16/bf16 gradients are fp32 and accumulate at fp32 precision."""
    r = reducer(compressor)
    g = torch.full((5000,), 1e-4, dtype=dtype)
    g[0] = 1.0  # the largest, so it is the coordinate sent every step
    for step in range(1, 4):
        r.reduce(g.clone(), [Segment("w", 0, 5000)], step).wait()
    slots = r.memory.state["w"]
    assert all(t.dtype == torch.float32 for t in slots.values())
    if isinstance(compressor, TopK):  # coordinates never sent hold three steps' worth, summed in fp32
        t = torch.tensor(float(g[1]))
        never_sent = int((slots["residual"] == (t + t) + t).sum())
        assert never_sent >= 5000 - 3 * 50
