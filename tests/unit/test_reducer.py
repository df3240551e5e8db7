"""SparseReducer on one process (LocalCommunicator): errors, conservation, fallback, stats."""

import re

import pytest
import torch

from gradsparse import DGC, PerSignTopK, Threshold, TopK
from gradsparse.comm import LocalCommunicator
from gradsparse.comm.base import completed_future
from gradsparse.errors import BucketError, ConfigTypeError, InvalidConfigError, UnsupportedGradientError
from gradsparse.payload import PayloadLayout, parse
from gradsparse.reducer import DESCRIPTOR_BYTES, Segment, SparseReducer
from gradsparse.stats import ALLGATHER, ALLREDUCE

from ..oracles import count_for, threshold_oracle, topk_oracle
from ..tolerances import close, rejects_planted_errors


def reducer(compressor=None, **kw):
    kw.setdefault("min_compress_numel", 100)
    return SparseReducer(compressor or TopK(0.01), LocalCommunicator(), **kw)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8])
def test_integer_and_complex_gradients_are_refused(dtype):
    with pytest.raises(UnsupportedGradientError):
        reducer().reduce(torch.zeros(10, dtype=dtype), None, 0)


def test_a_float64_bucket_is_rounded_to_float32_and_says_so_once(caplog):
    """The memory and the selection are float32: a float64 model's compressed gradients lose their low bits
    (TopK(1.0) is then dense DDP to float32 rounding, not bit for bit), and the reducer warns once."""
    r = reducer(TopK(1.0))
    g = torch.randn(1000, dtype=torch.float64) / 3
    with caplog.at_level("WARNING", logger="gradsparse.reducer"):
        for step in range(2):
            out = r.reduce(g.clone(), None, step).wait()
    assert [m for m in caplog.messages if "float64" in m and "rounded to float32" in m] != []
    assert len([m for m in caplog.messages if "float64" in m]) == 1
    assert torch.equal(out, g.float().double()) and not torch.equal(out, g)
    caplog.clear()
    with caplog.at_level("WARNING", logger="gradsparse.reducer"):
        reducer(TopK(1.0)).reduce(torch.randn(1000), None, 0).wait()
        reducer(TopK(1.0)).reduce(torch.randn(50, dtype=torch.float64), None, 0).wait()  # sent whole: exact
    assert not [m for m in caplog.messages if "float64" in m]


def test_an_empty_bucket_comes_back_as_it_is_with_no_collective_and_no_memory():
    """A parameter of zero elements (Horovod and MPI reduce each gradient on its own): nothing to reduce. Every
    rank's is empty alike (DDP and Horovod check the shapes), so no rank waits in a collective for another."""
    comm = CountingCommunicator()
    r = SparseReducer(DGC(0.01), comm)
    empty = torch.zeros(0)
    assert r.reduce(empty, None, 0).wait() is empty
    assert r.reduce(torch.zeros(0, 3), [Segment("w", 0, 0)], 1).wait().shape == (0, 3)
    assert comm.exchanges == 0 and not r.memory.state


def test_none_or_a_sparse_gradient_is_refused_naming_the_fix():
    """The docs' MPI loop hands reduce() each p.grad: None for a frozen parameter, sparse for
    nn.Embedding(sparse=True). Before: AttributeError ('NoneType' object has no attribute 'layout') and
    'the bucket must be a contiguous tensor'."""
    with pytest.raises(ConfigTypeError, match="requires_grad.*zeros_like"):
        reducer().reduce(None, None, 0)
    sparse = torch.sparse_coo_tensor(torch.tensor([[1, 5]]), torch.tensor([1.0, 2.0]), (10,), check_invariants=True)
    with pytest.raises(UnsupportedGradientError, match="sparse.*all_reduce"):
        reducer().reduce(sparse, None, 0)


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


@pytest.mark.parametrize("step,epoch,error", [("3", 0, ConfigTypeError), (2.5, 0, ConfigTypeError),
                                              (-1, 0, InvalidConfigError), (3, None, ConfigTypeError)])
def test_a_step_or_epoch_that_is_not_a_count_is_refused(step, epoch, error):
    """DGC's warm-up compares the step with integers: a string step failed there with a bare TypeError."""
    with pytest.raises(error, match="step" if epoch == 0 else "epoch"):
        reducer(DGC(0.01)).reduce(torch.randn(5000), None, step, epoch)


def test_segments_outside_the_bucket_are_refused():
    with pytest.raises(BucketError):
        reducer().reduce(torch.zeros(100), [Segment("a", 0, 60), Segment("b", 50, 50)], 0)
    with pytest.raises(BucketError):
        reducer().reduce(torch.zeros(100), [Segment("a", 90, 20)], 0)


METHODS = {"topk": lambda: TopK(0.01), "threshold": lambda: Threshold(1.5), "dgc": lambda: DGC(0.01, warmup=None),
           "dgc_nesterov": lambda: DGC(0.01, nesterov=True, warmup=None)}
SEGMENTS = [Segment("a", 0, 3000), Segment("small", 3000, 50), Segment("b", 3050, 2000)]
NUMEL = 5050


class OwnMemory:
    """One rank's compensation state kept by the test, never read from the library.

    Residual (or DGC momentum ``u`` and velocity ``v``, Nesterov in the authors' form),
    selection by the oracle per tensor or per bucket, the sent value rounded to the wire
    dtype and the rounding kept, momentum factor masking. ``step(g)`` returns this rank's
    contribution as a dense vector: the sent values of compressed tensors (zeros
    elsewhere) and the wire-rounded gradient of the tensor sent whole.
    """

    def __init__(self, method, granularity, wire, m=0.9):
        self.method, self.m, self.wire = method, m, wire or torch.float32
        self.dgc = method.startswith("dgc")
        self.compressed = [s for s in SEGMENTS if s.key != "small"]
        self.groups = [[s] for s in self.compressed] if granularity == "parameter" else [self.compressed]
        self.kept = {s.key: torch.zeros(s.numel) for s in SEGMENTS}
        self.momentum = {s.key: torch.zeros(s.numel) for s in SEGMENTS}

    def step(self, g):
        contribution = torch.zeros(NUMEL)
        compensated = {}
        for s in self.compressed:
            grad = g[s.offset:s.offset + s.numel]
            if self.method == "dgc":
                self.momentum[s.key] = self.m * self.momentum[s.key] + grad
                compensated[s.key] = self.kept[s.key] + self.momentum[s.key]
            elif self.method == "dgc_nesterov":
                self.momentum[s.key] = (self.momentum[s.key] + grad) * self.m
                compensated[s.key] = self.kept[s.key] + self.momentum[s.key] + grad
            else:
                compensated[s.key] = self.kept[s.key] + grad
        for group in self.groups:
            joined = torch.cat([compensated[s.key] for s in group])
            chosen = threshold_oracle(joined, 1.5) if self.method == "threshold" else \
                topk_oracle(joined, count_for(0.01, joined.numel()))
            mask = torch.zeros(joined.numel(), dtype=torch.bool)
            mask[chosen] = True
            complete = bool(mask.all())  # every coordinate of the group sent: no masking (dense momentum SGD)
            start = 0
            for s in group:
                picked = mask[start:start + s.numel]
                start += s.numel
                sent = torch.where(picked, compensated[s.key].to(self.wire).float(), 0.0)
                self.kept[s.key] = compensated[s.key] - sent
                assert torch.equal(self.kept[s.key] + sent, compensated[s.key])  # conservation, exactly
                if self.dgc and not complete:
                    self.momentum[s.key] = torch.where(picked, 0.0, self.momentum[s.key])  # factor masking
                contribution[s.offset:s.offset + s.numel] = sent
        small = SEGMENTS[1]
        contribution[small.offset:small.offset + small.numel] = g[small.offset:small.offset + small.numel].to(
            self.wire).float()
        return contribution

    def whole_update(self, averaged):
        """Momentum SGD on the averaged tensor sent whole (DGC), written as torch.optim.SGD writes it."""
        if not self.dgc:
            return averaged
        self.momentum["small"] = self.momentum["small"] * self.m + averaged
        return averaged.add(self.momentum["small"], alpha=self.m) if self.method == "dgc_nesterov" \
            else self.momentum["small"]

    def assert_library_kept(self, memory, what):
        for s in self.compressed:
            slots = memory.state[s.key]
            assert torch.equal(slots["velocity" if self.dgc else "residual"], self.kept[s.key]), (what, s.key)
            if self.dgc:
                assert torch.equal(slots["momentum"], self.momentum[s.key]), (what, s.key)


def _expected_out(contributions, own):
    """Every rank's contribution scaled by 1/world, added in rank order; whole tensors post-processed."""
    world = len(contributions)
    out = torch.zeros(NUMEL)
    for c in contributions:
        out = out + c * (1.0 / world)
    small = SEGMENTS[1]
    out[small.offset:small.offset + small.numel] = own.whole_update(out[small.offset:small.offset + small.numel])
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("wire", [None, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("granularity", ["parameter", "bucket"])
def test_sent_plus_kept_equals_compensated_exactly(method, wire, granularity):
    """The test keeps its own residual / DGC momentum and velocity (never reading the library's),
    selects with the oracle and checks, every step and exactly: what the reducer sent, what its
    memory kept, and kept + sent == the compensated gradient."""
    r = reducer(METHODS[method](), value_dtype=wire, granularity=granularity)
    own = OwnMemory(method, granularity, wire)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        g = torch.randn(NUMEL, generator=gen)
        out = r.reduce(g.clone(), SEGMENTS, step).wait()
        assert torch.equal(out, _expected_out([own.step(g)], own)), step
        own.assert_library_kept(r.memory, step)


def conservation_worker(rank, world, method, wire, granularity, steps=5):
    """One rank of the world > 1 conservation test: the library's memory equals the test's own after every
    step (asserted here), and this rank's contributions and outputs go back to the test."""
    from gradsparse.comm.torch_dist import TorchDistCommunicator

    r = SparseReducer(METHODS[method](), TorchDistCommunicator(), value_dtype=wire, granularity=granularity,
                      min_compress_numel=100)
    own = OwnMemory(method, granularity, wire)
    contributions, outs, transports = [], [], []
    for step in range(1, steps + 1):
        g = torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * rank + step))
        if method == "threshold" and rank == world - 1:
            g.mul_(1e-3)  # below tau everywhere: this rank sends no pair, its residual grows
        stats = []
        outs.append(r.reduce(g.clone(), SEGMENTS, step, on_stats=stats.append).wait().clone())
        transports.append(stats[0].transport == ALLREDUCE)
        contributions.append(own.step(g))
        own.assert_library_kept(r.memory, (rank, step))
    return {"contributions": contributions, "outs": outs, "dense": transports}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", [("dgc_nesterov", torch.bfloat16, "bucket"), ("topk", torch.float16, "parameter"),
                                  ("threshold", None, "bucket")], ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("world", [2, 3])
def test_conservation_across_ranks(world, case):
    """At world > 1: every rank's memory kept exactly what the test's own copy says it must (checked on the
    ranks), and every rank's output is the rank-order average of what the test computed each rank sent."""
    from ..distributed import run_world

    method, wire, granularity = case
    results = run_world(conservation_worker, world, method, wire, granularity)
    own = OwnMemory(method, granularity, wire)  # for the whole tensor's momentum on the average
    for step in range(len(results[0]["outs"])):
        expected = _expected_out([r["contributions"][step] for r in results], own)
        for rank, r in enumerate(results):
            assert not r["dense"][step], "the sparse transport (rank-order sum) carried the step"
            assert torch.equal(r["outs"][step], expected), (rank, step)
    if method == "threshold":  # the silent rank really sent nothing
        assert all(int(c.count_nonzero()) == 50 for c in results[-1]["contributions"])


def test_per_parameter_selection_gives_each_tensor_its_own_k():
    gen = torch.Generator().manual_seed(0)
    r = reducer(TopK(0.01))
    g = torch.cat([torch.randn(1000, generator=gen) * 100, torch.randn(1000, generator=gen) * 0.01])
    out = r.reduce(g, [Segment("loud", 0, 1000), Segment("quiet", 1000, 1000)], 1).wait()
    assert torch.count_nonzero(out[:1000]) == 10 and torch.count_nonzero(out[1000:]) == 10
    r = reducer(TopK(0.01), granularity="bucket")
    g = torch.cat([torch.randn(1000, generator=gen) * 100, torch.randn(1000, generator=gen) * 0.01])
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
        assert all((st.transport == ALLREDUCE) == expect_dense for st in stats)
        assert torch.equal(residual, r.memory.state["bucket"]["residual"])


@pytest.mark.parametrize("transport", [ALLGATHER, ALLREDUCE])
@pytest.mark.parametrize("wire", [torch.float32, torch.float16])
def test_every_transport_carries_a_dense_iteration_and_empties_the_memory(transport, wire):
    # a dense iteration (select_all) forced through either transport: the sent values must not be the
    # memory's own buffer (the update subtracts them from it), and nothing but the wire's rounding stays
    segments = [Segment("w", 0, 9_950), Segment("b", 9_950, 50)]
    for compressor in (TopK(0.01), DGC(0.01, warmup=None)):
        r = reducer(compressor, transport=transport, value_dtype=wire)
        g = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
        stats = []
        out = r.reduce(g.clone(), segments, 0, select_all=True, on_stats=stats.append).wait()
        assert stats[0].transport == transport and stats[0].selected == 9_950
        expected = g[:9_950].to(wire).float()
        # whole tensors travel in the payload at the wire dtype, in the bucket's dtype by allreduce
        whole = g[9_950:].to(wire).float() if transport == ALLGATHER else g[9_950:]
        assert torch.equal(out[:9_950], expected) and torch.equal(out[9_950:], whole)
        kept = r.memory.state["w"]["residual" if "residual" in r.memory.state["w"] else "velocity"]
        assert torch.equal(kept, g[:9_950] - expected)


def test_stats_count_the_payload_bytes():
    stats = []
    segments = [Segment("w", 0, 9_950), Segment("b", 9_950, 50)]
    expected = PayloadLayout(100, 50, torch.float32).nbytes
    gen = torch.Generator().manual_seed(0)
    reducer(TopK(0.01)).reduce(torch.randn(10_000, generator=gen), segments, 1, on_stats=stats.append).wait()
    assert stats[0].bytes_sent == expected + DESCRIPTOR_BYTES == stats[0].bytes_received
    reducer(TopK(0.01), verify_every=0).reduce(torch.randn(10_000, generator=gen), segments, 1,
                                               on_stats=stats.append).wait()
    assert stats[1].bytes_sent == expected == stats[1].bytes_received
    assert stats[0].selected == 100 and stats[0].whole == 50 and stats[0].transport == ALLGATHER


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("how", ["select_all", "ratio_1"])
def test_everything_sent_is_dense_momentum_sgd(how, nesterov):
    """Nothing dropped: no momentum factor masking, so the update is torch SGD's momentum buffer (in float64 here)."""
    r = reducer(DGC(1.0 if how == "ratio_1" else 0.01, nesterov=nesterov, warmup=None))
    gen = torch.Generator().manual_seed(0)
    buf = torch.zeros(1000, dtype=torch.float64)
    for step in range(20):
        g = torch.randn(1000, generator=gen)
        out = r.reduce(g.clone(), None, step, select_all=how == "select_all").wait()
        buf = 0.9 * buf + g.double()
        want = g.double() + 0.9 * buf if nesterov else buf
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(r.memory.state["bucket"]["velocity"]) == 0  # all of v was sent
    assert torch.count_nonzero(r.memory.state["bucket"]["momentum"]) == 1000  # and the momentum kept


@pytest.mark.parametrize("nesterov", [False, True])
def test_dgc_whole_tensors_get_momentum_on_the_averaged_gradient(nesterov):
    """Tensors sent whole (here two, around a compressed one) get torch.optim.SGD's momentum (and Nesterov) on
    their averaged gradient, each its own, kept per parameter name."""
    r = reducer(DGC(0.01, nesterov=nesterov, warmup=None), min_compress_numel=10_000)
    segments = [Segment("bias", 0, 1000), Segment("w", 1000, 20_000), Segment("gain", 21_000, 300)]
    whole = [segments[0], segments[2]]
    params = [torch.nn.Parameter(torch.zeros(s.numel, dtype=torch.float64)) for s in whole]
    sgd = torch.optim.SGD(params, lr=1.0, momentum=0.9, nesterov=nesterov)  # the oracle, in float64
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        g = torch.randn(21_300, generator=gen)
        out = r.reduce(g.clone(), segments, step).wait()
        before = [p.detach().clone() for p in params]
        for p, s in zip(params, whole):
            p.grad = g[s.offset:s.offset + s.numel].double()
        sgd.step()
        for p, b, s in zip(params, before, whole):
            close(out[s.offset:s.offset + s.numel], b - p.detach(), torch.float32, what=f"{s.key} step {step}")
            assert rejects_planted_errors(b - p.detach(), torch.float32)
            close(r.memory.state[s.key]["momentum"], sgd.state[p]["momentum_buffer"], torch.float32)


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
        r.reduce(torch.randn(1000, generator=torch.Generator().manual_seed(step)), None, step).wait()
    assert comm.exchanges == expected


def test_threshold_without_verification_still_exchanges_sizes():
    comm = CountingCommunicator()
    r = SparseReducer(Threshold(0.5), comm, min_compress_numel=1, verify_every=0)
    r.reduce(torch.randn(1000, generator=torch.Generator().manual_seed(0)), None, 0).wait()
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


class _ResetCommunicator(LocalCommunicator):
    """A transport whose payload exchange fails as a dead peer's socket does: when issued (blocking backends)
    or through its future (gloo, NCCL)."""

    timeout_hint = "the hint of this transport"

    def __init__(self, when):
        super().__init__()
        self.when = when

    def _fail(self):
        if self.when == "issue":
            raise ConnectionResetError("Connection reset by peer")
        fut = torch.futures.Future()
        fut.set_exception(ConnectionResetError("Connection reset by peer"))
        return fut

    def allgather(self, payload, sizes=None):
        return self._fail()

    def allreduce_sum(self, tensor):
        return self._fail()


@pytest.mark.parametrize("transport", ["allgather", "allreduce"])
@pytest.mark.parametrize("when", ["issue", "future"])
def test_a_transport_failure_names_the_bucket_the_step_and_the_backends_timeout(when, transport):
    from gradsparse.comm.horovod import HorovodCommunicator
    from gradsparse.comm.mpi import MPICommunicator
    from gradsparse.comm.torch_dist import TorchDistCommunicator
    from gradsparse.errors import CommunicationError

    r = SparseReducer(TopK(0.01), _ResetCommunicator(when), min_compress_numel=1, transport=transport)
    # through a future, torch's Future.wait re-raises the callback's CommunicationError as a RuntimeError naming it
    expected = CommunicationError if when == "issue" else RuntimeError
    with pytest.raises(expected, match=r"CommunicationError|1000-element bucket") as info:
        r.reduce(torch.randn(1000), [Segment("w", 0, 1000)], step=7).wait()
    assert re.search(r"1000-element bucket at step 7 failed on rank 0.*\(the hint of this transport\)\. "
                     r"Cause: Connection reset by peer", str(info.value)), str(info.value)
    if when == "issue":
        assert isinstance(info.value.__cause__, ConnectionResetError)
    hints = {c.timeout_hint for c in (TorchDistCommunicator, HorovodCommunicator, MPICommunicator)}
    assert len(hints) == 3 and any("init_process_group" in h for h in hints)


class _Recording(LocalCommunicator):
    """World size 3 as seen from rank 0, every rank alike: records what rank 0 hands each collective."""

    world_size = 3

    def __init__(self):
        super().__init__()
        self.handed = []

    def allgather_ints(self, values, device):
        return [list(values)] * 3

    def allgather(self, payload, sizes=None):
        self.handed.append(payload.clone())
        return completed_future([payload] * 3)

    def allreduce_sum(self, tensor):
        self.handed.append(tensor.clone())
        return completed_future(tensor)


@pytest.mark.parametrize("op", ["average", "sum"])
@pytest.mark.parametrize("make", [lambda: TopK(0.25), lambda: TopK(0.002), lambda: DGC(0.25, warmup=None),
                                  lambda: DGC(0.002, warmup=None), lambda: PerSignTopK(0.01),
                                  lambda: Threshold(1.5)],
                         ids=["topk25", "topk0.2", "dgc25", "dgc0.2", "persign", "threshold"])
def test_the_allreduce_hands_over_the_allgathers_pairs_scattered_and_scaled(make, op):
    """The dense transport of an fp32 bucket is the allgather's payload scattered over zeros and times the
    average's factor in fp32, whichever way the pairs were written (by the selection at large k, gathered after
    it at small k, quantized, a variable count, a dense iteration), and both transports leave the compressed tensors
    the same memory."""
    segments = [Segment("w", 0, 60_000), Segment("b", 60_000, 50), Segment("v", 60_050, 40_000)]
    whole = torch.arange(60_000, 60_050)
    comms = {t: _Recording() for t in (ALLGATHER, ALLREDUCE)}
    reducers = {t: SparseReducer(make(), comms[t], min_compress_numel=100, transport=t, op=op, verify_every=0)
                for t in comms}
    factor = torch.tensor(1 / 3 if op == "average" else 1.0, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        g = torch.randn(100_050, generator=gen) * (1 + step)
        for r in reducers.values():
            r.reduce(g.clone(), segments, step, select_all=step == 0).wait()
        _, indices, values, dense = parse(comms[ALLGATHER].handed[-1], 100_050, torch.float32, 50)
        expected = torch.zeros(100_050)
        expected[indices.long()] = values * factor
        expected[whole] = dense * factor
        assert torch.equal(comms[ALLREDUCE].handed[-1], expected), step
        for key in ("w", "v"):  # what a tensor sent whole keeps follows the sum, which the two transports order
            for name, kept in reducers[ALLGATHER].memory.state[key].items():
                assert torch.equal(kept, reducers[ALLREDUCE].memory.state[key][name]), (step, key, name)


@pytest.mark.parametrize("compressor", [lambda: TopK(0.01), lambda: DGC(0.01, warmup=None)], ids=["topk", "dgc"])
def test_a_channels_last_gradient_is_reduced_in_place_with_its_memory_in_logical_order(compressor):
    """The MPI recipe reduces p.grad per parameter: a channels_last convolution's gradient is not contiguous, so
    p.grad.view(-1) fails and the reshape(-1) torch suggests hands over a copy (2 mpirun ranks: the ranks then
    drifted 2e-3 apart, unreduced). reduce(p.grad) works in place; before, it raised BucketError."""
    torch.manual_seed(0)
    cl, plain = reducer(compressor()), reducer(compressor())
    for step in range(3):
        g = torch.randn(32, 16, 3, 3)
        g_cl = g.contiguous(memory_format=torch.channels_last)
        assert not g_cl.is_contiguous()
        out = cl.reduce(g_cl, None, step).wait()
        expected = plain.reduce(g.clone(), None, step).wait().view(g.shape)
        assert out is g_cl and torch.equal(g_cl, expected) and g_cl.stride() == (144, 1, 48, 16)
        assert 0 < int((expected != 0).sum()) < g.numel()  # something was dropped: a permutation would show
    for name, buf in plain.memory.state["bucket"].items():
        assert torch.equal(cl.memory.state["bucket"][name], buf), name
