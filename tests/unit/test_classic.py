"""The classic routes to sparsity as published: PerSignTopK (Dryden et al. 2016), GradientDropping (Aji and
Heafield 2017).

Each compressor is compared with a by-definition oracle of its paper's rule (tests/oracles.py), alone and
through the one pipeline: one process, a gloo world of 2, the DDP hook (nothing dropped equals DDP; a
sparse run whose ranks agree bit for bit and resumes from a checkpoint bit for bit) and ``mpirun``.
"""

import io
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import GradientDropping, PerSignTopK, Segment, SparseReducer
from gradsparse import ddp as gddp
from gradsparse.comm import LocalCommunicator
from gradsparse.errors import ConfigTypeError, InvalidConfigError, StateMismatchError

from ..distributed import run_world
from ..models import loss_of, make_model, params_hash, train_steps
from ..oracles import count_for, gradient_dropping_oracle, heavy_tailed, per_sign_oracle, topk_oracle, with_ties
from ..tolerances import close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def skewed(n: int, seed: int) -> torch.Tensor:
    """Mass mostly on the positive side: large positives, many small negatives, some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g) * 10.0
    negative = torch.rand(n, generator=g) < 0.4
    x[negative] = -torch.rand(int(negative.sum()), generator=g) * 1e-3
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    return x


INPUTS = {"heavy_tailed": lambda n, s: heavy_tailed(n, torch.float32, s),
          "ties": lambda n, s: with_ties(n, torch.float32, s), "skewed": skewed}


# ------------------------------------------------------------------------------------------------
# The rules alone, against the oracles.

@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize("ratio", [0.003, 0.25, 1.0])
@pytest.mark.parametrize("quantize", [True, False])
def test_per_sign_topk_is_the_papers_rule(kind, ratio, quantize):
    for n, seed in ((3001, 0), (12_000, 1)):
        v = INPUTS[kind](n, seed)
        c = PerSignTopK(ratio, quantize=quantize)
        chosen = c.select(v, step=0, epoch=0)
        positions, values = per_sign_oracle(v, ratio, quantize)
        assert torch.equal(chosen, positions), (kind, n)
        assert torch.equal(c.sent_values(v, chosen), values), (kind, n)


def test_per_sign_topk_sends_both_signs_where_top_k_by_magnitude_sends_one():
    v = skewed(10_000, 3)
    n_pos, n_neg = int((v > 0).sum()), int((v < 0).sum())
    chosen = PerSignTopK(0.01, quantize=False).select(v, 0, 0)
    assert int((v[chosen] > 0).sum()) == count_for(0.01, n_pos)
    assert int((v[chosen] < 0).sum()) == count_for(0.01, n_neg) > 0
    by_magnitude = topk_oracle(v, chosen.numel())
    assert int((v[by_magnitude] < 0).sum()) == 0  # the same budget by |v| sends no negative value at all


@pytest.mark.parametrize("kind", sorted(INPUTS))
@pytest.mark.parametrize("drop_ratio,sample_size", [(0.99, 100_000), (0.999, 100_000), (0.9, 1000), (0.5, 7),
                                                    (0.0, 100_000), (0.0001, 1000)])
def test_gradient_dropping_is_the_authors_rule(kind, drop_ratio, sample_size):
    for n, seed in ((3001, 0), (12_000, 1)):
        v = INPUTS[kind](n, seed)
        chosen = GradientDropping(drop_ratio, sample_size=sample_size).select(v, step=0, epoch=0)
        assert torch.equal(chosen, gradient_dropping_oracle(v, drop_ratio, sample_size)), (kind, n)


def test_gradient_dropping_with_the_whole_tensor_sampled_keeps_the_exact_quantile():
    v = heavy_tailed(20_000, torch.float32, 5)  # distinct magnitudes
    for drop_ratio in (0.99, 0.9, 0.5):
        sent = GradientDropping(drop_ratio).select(v, 0, 0).numel()
        assert sent == 20_000 - math.floor(20_000 * drop_ratio)


def test_options_are_checked():
    for bad, error in ((lambda: PerSignTopK(0.0), InvalidConfigError), (lambda: PerSignTopK(1.5), InvalidConfigError),
                       (lambda: PerSignTopK(0.1, quantize="yes"), ConfigTypeError),
                       (lambda: GradientDropping(1.0), InvalidConfigError),
                       (lambda: GradientDropping(-0.1), InvalidConfigError),
                       (lambda: GradientDropping(0.9, sample_size=0), InvalidConfigError),
                       (lambda: GradientDropping("0.9"), ConfigTypeError)):
        with pytest.raises(error):
            bad()


# ------------------------------------------------------------------------------------------------
# Through the pipeline: the test keeps its own residuals and selects with the oracles.

SEGMENTS = [Segment("a", 0, 3000), Segment("small", 3000, 50), Segment("b", 3050, 2000)]
NUMEL = 5050
MIN_NUMEL = 100
COMPRESSORS = {
    "per_sign_mean": (lambda: PerSignTopK(0.01), lambda v: per_sign_oracle(v, 0.01, True)),
    "per_sign_values": (lambda: PerSignTopK(0.01, quantize=False), lambda v: per_sign_oracle(v, 0.01, False)),
    "gradient_dropping": (lambda: GradientDropping(0.99, sample_size=1000),
                          lambda v: (lambda p: (p, v[p]))(gradient_dropping_oracle(v, 0.99, 1000))),
}


class OwnMemory:
    """One rank's residuals, kept by the test: oracle selection per tensor or per bucket, the sent values rounded
    to the wire dtype, ``kept = compensated - sent``. ``step(g)`` returns this rank's dense contribution."""

    def __init__(self, name, granularity, wire):
        self.oracle = COMPRESSORS[name][1]
        self.quantized = name == "per_sign_mean"
        self.wire = wire or torch.float32
        compressed = [s for s in SEGMENTS if s.numel >= MIN_NUMEL]
        self.groups = [[s] for s in compressed] if granularity == "parameter" else [compressed]
        self.kept = {s.key: torch.zeros(s.numel) for s in compressed}

    def step(self, g):
        contribution = g.to(self.wire).float()  # the whole tensor's part; compressed parts overwritten below
        for group in self.groups:
            compensated = torch.cat([self.kept[s.key] + g[s.offset:s.offset + s.numel] for s in group])
            positions, values = self.oracle(compensated)
            sent = torch.zeros_like(compensated)
            sent[positions] = values.to(self.wire).float()
            kept = compensated - sent
            if self.quantized:  # kept is v - mean rounded once to fp32
                close(kept + sent, compensated, torch.float32, scale=float(kept.abs().max()), ulps=1)
            else:
                assert torch.equal(kept + sent, compensated)  # conservation, exactly
            start = 0
            for s in group:
                self.kept[s.key] = kept[start:start + s.numel]
                contribution[s.offset:s.offset + s.numel] = sent[start:start + s.numel]
                start += s.numel
        return contribution

    def assert_library_kept(self, memory, what):
        for key, kept in self.kept.items():
            assert torch.equal(memory.state[key]["residual"], kept), (what, key)


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
@pytest.mark.parametrize("granularity,wire", [("parameter", None), ("bucket", None), ("parameter", torch.float16)],
                         ids=str)
def test_pipeline_sends_and_keeps_what_the_paper_says(name, granularity, wire):
    r = SparseReducer(COMPRESSORS[name][0](), LocalCommunicator(), min_compress_numel=MIN_NUMEL,
                      granularity=granularity, value_dtype=wire)
    own = OwnMemory(name, granularity, wire)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        g = torch.randn(NUMEL, generator=gen) * torch.rand(NUMEL, generator=gen) ** 2
        out = r.reduce(g.clone(), SEGMENTS, step).wait()
        assert torch.equal(out, own.step(g)), step
        own.assert_library_kept(r.memory, step)


def test_what_quantization_keeps_counts_in_the_next_overflow_check():
    """Ratio 1 with means sends every coordinate but keeps v - mean; a gradient that would take that
    past the wire's range on the next step skips the bucket and leaves the memory as it was."""
    r = SparseReducer(PerSignTopK(1.0), LocalCommunicator(), min_compress_numel=1, value_dtype=torch.float16)
    v = torch.tensor([1.0, 2.0, 9.0, -4.0])
    r.reduce(v.clone(), None, 1).wait()
    kept = r.memory.state["bucket"]["residual"].clone()
    assert torch.equal(kept, v - torch.tensor([4.0, 4.0, 4.0, -4.0]))
    g = torch.tensor([0.0, 0.0, 65_500.0, 0.0])  # itself below float16's 65,504; kept + g is not
    out = r.reduce(g.clone(), None, 2).wait()
    assert out.isnan().all()
    assert torch.equal(r.memory.state["bucket"]["residual"], kept)


# ------------------------------------------------------------------------------------------------
# A gloo world of 2: outputs are the rank-order average of what the oracles say each rank sent;
# nothing dropped is allreduce-average.

def world_worker(rank, world, steps=4):
    import torch.distributed as dist

    from gradsparse.comm.torch_dist import TorchDistCommunicator

    outs = {}
    for name, (make, _) in COMPRESSORS.items():
        r = SparseReducer(make(), TorchDistCommunicator(), min_compress_numel=MIN_NUMEL)
        outs[name] = [r.reduce(world_grad(rank, step), SEGMENTS, step).wait().clone() for step in range(steps)]
    dense = {}
    for name, c in {"per_sign_ratio_1": PerSignTopK(1.0, quantize=False), "no_drop": GradientDropping(0.0)}.items():
        r = SparseReducer(c, TorchDistCommunicator(), min_compress_numel=MIN_NUMEL)
        got = r.reduce(world_grad(rank, 0), SEGMENTS, 0).wait()
        want = world_grad(rank, 0)
        dist.all_reduce(want)
        dense[name] = torch.equal(got, want / world)
    return {"outs": outs, "dense": dense}


def world_grad(rank, step):
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(100 * rank + step))


@pytest.mark.multiprocess
def test_world_of_two_averages_what_each_rank_sent():
    results = run_world(world_worker, 2)
    for r in results:
        assert r["dense"] == {"per_sign_ratio_1": True, "no_drop": True}
    for name in COMPRESSORS:
        own = [OwnMemory(name, "parameter", None) for _ in range(2)]
        for step in range(len(results[0]["outs"][name])):
            contributions = [own[rank].step(world_grad(rank, step)) for rank in range(2)]
            expected = torch.zeros(NUMEL)
            for c in contributions:
                expected = expected + c * 0.5
            for rank in range(2):
                assert torch.equal(results[rank]["outs"][name][step], expected), (name, step, rank)


# ------------------------------------------------------------------------------------------------
# The DDP hook: nothing dropped equals DDP; a sparse run agrees across ranks and resumes from a
# checkpoint bit for bit.

def ddp_worker(rank, world):
    report = {}
    nothing_dropped = {"per_sign": lambda: PerSignTopK(1.0, quantize=False), "dropping": lambda: GradientDropping(0.0)}
    for name, make in nothing_dropped.items():
        plain, hooked = DDP(make_model("mlp"), bucket_cap_mb=0.05), DDP(make_model("mlp"), bucket_cap_mb=0.05)
        gddp.register(hooked, make())
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, hooked)]
        for step in range(4):
            for model, opt in zip((plain, hooked), opts):
                opt.zero_grad()
                loss_of(model, "mlp", rank, step).backward()
            for a, b in zip(plain.parameters(), hooked.parameters()):
                close(b.grad, a.grad, torch.float32, what=f"{name} step {step}")
            for opt in opts:
                opt.step()
        report[f"{name}_equal_to_ddp"] = True

    def build(make):
        model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, gddp.register(model, make(), optimizer=opt)

    def train(model, opt, steps):
        train_steps(model, opt, rank, steps)

    for name, make in {"per_sign": lambda: PerSignTopK(0.02), "dropping": lambda: GradientDropping(0.98)}.items():
        model, opt, state = build(make)
        train(model, opt, range(4))
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gradsparse": state.state_dict()}, buf)
        train(model, opt, range(4, 10))
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        model2, opt2, state2 = build(make)
        model2.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["opt"])
        state2.load_state_dict(ckpt["gradsparse"])
        train(model2, opt2, range(4, 10))
        report[f"{name}_resumed_equal"] = all(torch.equal(a, b)
                                              for a, b in zip(model.parameters(), model2.parameters()))
        report[f"{name}_hash"] = params_hash(model)
        history = list(state.history)[1:]
        report[f"{name}_sparse_steps"] = sum(h["allreduce_buckets"] < h["buckets"] for h in history)
        report[f"{name}_density"] = max(h["selected"] / h["numel"] for h in history)
    return report


@pytest.mark.multiprocess
def test_ddp_hook_nothing_dropped_sparse_run_and_checkpoint():
    reports = run_world(ddp_worker, 2)
    for r in reports:
        for name in ("per_sign", "dropping"):
            assert r[f"{name}_equal_to_ddp"]
            assert r[f"{name}_resumed_equal"], name
            assert r[f"{name}_sparse_steps"] == 9, name  # every step after the dense first one went sparse
            assert 0 < r[f"{name}_density"] < 0.1, name
    for name in ("per_sign", "dropping"):
        assert reports[0][f"{name}_hash"] == reports[1][f"{name}_hash"], name  # the ranks agree bit for bit


def test_checkpoint_of_another_rule_or_option_is_refused():
    for saved, loading in ((PerSignTopK(0.01), GradientDropping(0.99)), (PerSignTopK(0.01), PerSignTopK(0.01, False)),
                           (GradientDropping(0.99), GradientDropping(0.99, sample_size=10))):
        r = SparseReducer(saved, LocalCommunicator(), min_compress_numel=1)
        r.reduce(torch.randn(1000), None, 1).wait()
        state = torch.load(_saved(r.state_dict()), weights_only=True)
        with pytest.raises(StateMismatchError):
            SparseReducer(loading, LocalCommunicator(), min_compress_numel=1).load_state_dict(state)
        again = SparseReducer(type(saved)(**{k: v for k, v in saved.config().items() if k != "name"}),
                              LocalCommunicator(), min_compress_numel=1)
        again.load_state_dict(state)
        assert torch.equal(again.memory.state["bucket"]["residual"], r.memory.state["bucket"]["residual"])


def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ------------------------------------------------------------------------------------------------
# mpirun: the same pipeline over MPICommunicator (no torch.distributed).

MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
if not os.path.exists(MPIRUN):
    MPIRUN = shutil.which("mpirun") or MPIRUN


@pytest.mark.multiprocess
def test_mpirun_world_of_two_averages_what_each_rank_sent(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-m",
           "tests.classic_mpi_worker", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name in ("per_sign_mean", "gradient_dropping"):
        own = [OwnMemory(name, "bucket", None) for _ in range(2)]
        for step in range(len(results[0][name])):
            expected = own[0].step(world_grad(0, step)) * 0.5 + own[1].step(world_grad(1, step)) * 0.5
            for rank in range(2):
                assert torch.equal(results[rank][name][step], expected), (name, step, rank)


# ------------------------------------------------------------------------------------------------
# docs/algorithms.md: the side-by-side example prints what the page says it prints.

def test_algorithms_doc_example_prints_what_the_page_shows():
    import contextlib
    import re

    from ..docblocks import ROOT as DOCS_ROOT
    from ..docblocks import block_with

    block = block_with("docs/algorithms.md", "PerSignTopK(0.01)")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "docs/algorithms.md", "exec"), {})
    with open(os.path.join(DOCS_ROOT, "docs", "algorithms.md")) as f:
        page = f.read()
    shown = re.search(r"prints \(.*?\):\n\n```\n(.*?)```", page, flags=re.S).group(1)
    assert printed.getvalue() == shown
