"""The DDP hook on real gloo process groups (world sizes 2 and 3)."""

import io
import logging
import pickle

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, Threshold, TopK, Warmup
from gradsparse import ddp as gddp
from gradsparse.errors import (HookAlreadyRegisteredError, IncompatibleOptimizerError, InvalidConfigError,
                               StateMismatchError)

from .. import dgc_reference
from ..distributed import run_world
from ..models import loss_of, make_model, params_hash, train_steps
from ..tolerances import close, rejects_planted_errors, tolerance

# ----------------------------------------------------------------------------------------------
# Nothing dropped: the hooked gradients equal DDP without a hook.

EQUIVALENCE = {
    "topk_ratio_1": dict(kind="mlp", compressor=lambda: TopK(1.0)),
    "topk_fewer_nonzeros_than_k": dict(kind="embed", compressor=lambda: TopK(0.05), sparse=True),
    "threshold_tiny_tau": dict(kind="embed", compressor=lambda: Threshold(1e-30), sparse=True),
    "dgc_no_momentum_ratio_1": dict(kind="mlp", compressor=lambda: DGC(1.0, momentum=0.0)),
    "bucket_view": dict(kind="embed", compressor=lambda: TopK(0.05), ddp=dict(gradient_as_bucket_view=True), sparse=True),
    "static_graph": dict(kind="embed", compressor=lambda: TopK(0.05), ddp=dict(static_graph=True), sparse=True),
    "find_unused": dict(kind="embed_unused", compressor=lambda: TopK(0.05), ddp=dict(find_unused_parameters=True), sparse=True),
    "no_sync": dict(kind="embed", compressor=lambda: TopK(0.05), no_sync=True, sparse=True),
    "per_bucket": dict(kind="embed", compressor=lambda: TopK(0.05), state=dict(granularity="bucket"), sparse=True),
    "fp16": dict(kind="mlp", compressor=lambda: TopK(1.0), dtype=torch.float16),
    "bf16": dict(kind="mlp", compressor=lambda: TopK(1.0), dtype=torch.bfloat16),
    "fp16_sparse": dict(kind="embed", compressor=lambda: TopK(0.05), dtype=torch.float16, sparse=True),
    "bf16_sparse": dict(kind="embed", compressor=lambda: TopK(0.05), dtype=torch.bfloat16, sparse=True),
}


def equivalence_worker(rank, world, names, steps=6):
    report = {}
    for name in names:
        cfg = EQUIVALENCE[name]
        kind, dtype = cfg["kind"], cfg.get("dtype", torch.float32)
        ddp_kw = dict(bucket_cap_mb=0.05, **cfg.get("ddp", {}))
        plain = DDP(make_model(kind).to(dtype), **ddp_kw)
        hooked = DDP(make_model(kind).to(dtype), **ddp_kw)
        state = gddp.register(hooked, cfg["compressor"](), **cfg.get("state", {}))
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, hooked)]
        worst, sensitive = 0.0, True  # worst: the largest difference, as a fraction of the allowed one
        for step in range(steps):
            for model, opt in zip((plain, hooked), opts):
                opt.zero_grad()
                if cfg.get("no_sync"):
                    with model.no_sync():
                        loss_of(model, kind, rank, 100 + step).backward()
                loss_of(model, kind, rank, step).backward()
            for a, b in zip(plain.parameters(), hooked.parameters()):
                if a.grad is None:  # unused parameter: DDP leaves it None in both
                    assert b.grad is None
                    continue
                # DDP sums in the gradient's dtype (a rounding per addition), the hook in fp32 (one rounding)
                close(b.grad, a.grad, dtype, what=f"{name}, step {step}")
                sensitive = sensitive and rejects_planted_errors(a.grad, dtype)
                scale = float(a.grad.abs().max())
                if scale:
                    diff = float((b.grad.double() - a.grad.double()).abs().max())
                    worst = max(worst, diff / tolerance(dtype, scale))
            for opt in opts:
                opt.step()
        stats = list(state.history)[1:]
        report[name] = {"worst": worst, "sensitive": sensitive,
                        "sparse_steps": sum(s["allreduce_buckets"] < s["buckets"] for s in stats), "steps": len(stats)}
    return report


@pytest.mark.parametrize("world", [2, 3])
def test_nothing_dropped_equals_plain_ddp(world):
    reports = run_world(equivalence_worker, world, sorted(EQUIVALENCE))
    print({name: round(max(r[name]["worst"] for r in reports), 3) for name in EQUIVALENCE})  # shown with -s
    for name, cfg in EQUIVALENCE.items():
        for report in reports:
            assert report[name]["sensitive"], name  # the tolerance rejects a halved gradient / 15 % lost
            assert report[name]["steps"] >= 4
            if cfg.get("sparse"):  # the sparse path was really used, not the dense fallback
                assert report[name]["sparse_steps"] == report[name]["steps"], name


# ----------------------------------------------------------------------------------------------
# Every rank ends bit-identical; several buckets, varying counts, ranks sending nothing. (That the
# values are right is checked against oracles: the paper reference below for DGC with Nesterov,
# clipping, per-bucket selection and fp16/bf16 wire; tests/unit/test_reducer.py for TopK and Threshold.)

METHODS = {
    "topk": lambda: TopK(0.01),
    "threshold": lambda: Threshold(0.02),
    "dgc": lambda: DGC(0.01, warmup=Warmup(ratios=(0.25, 0.05), length=3, unit="step")),
    "dgc_per_bucket_fp16_wire": lambda: DGC(0.01, nesterov=True, clip_norm=1.0, warmup=None),
}


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def identical_worker(rank, world, steps=15):
    out = {}
    handler = ListHandler()
    logging.getLogger("gradsparse").addHandler(handler)
    logging.getLogger("gradsparse").setLevel(logging.INFO)
    for name, factory in METHODS.items():
        model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
        kw = dict(granularity="bucket", value_dtype=torch.float16) if name.endswith("fp16_wire") else {}
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        state = gddp.register(model, factory(), optimizer=opt, log_every=5, **kw)
        for step in range(steps):
            opt.zero_grad()
            scale = 0.0 if (name == "threshold" and rank == world - 1) else 1.0  # last rank sends nothing
            (scale * loss_of(model, "mlp", rank, step)).backward()
            opt.step()
        out[name] = {"hash": params_hash(model), "history": list(state.history)}
    out["log_lines"] = [line for line in handler.lines if line.startswith("gradsparse step")]
    return out


def test_ranks_end_bit_identical_world_3():
    results = run_world(identical_worker, 3)
    for name in METHODS:
        hashes = {r[name]["hash"] for r in results}
        assert len(hashes) == 1, name
        last = results[0][name]["history"][-1]
        assert last["buckets"] > 1 and last["allreduce_buckets"] == 0, (name, last)
        for r in results:
            assert [h["step"] for h in r[name]["history"]] == list(range(15))
    silent = results[2]["threshold"]["history"][-1]
    assert silent["selected"] == 0
    assert len(results[0]["log_lines"]) == 3 * len(METHODS)  # steps 0, 5, 10 of each run
    assert "ratio" in results[0]["log_lines"][-1] and "sent" in results[0]["log_lines"][-1]


# ----------------------------------------------------------------------------------------------
# DGC through the hook equals a hand-written, step-by-step version of the paper's algorithm.

DGC_CFG = dict(ratio=0.02, momentum=0.9, warmup=Warmup(ratios=(0.3, 0.1), length=2, unit="step"))
DGC_STEPS, MIN_NUMEL, LR = 8, 4096, 0.1


def dgc_worker(rank, world):
    model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gddp.register(model, DGC(**DGC_CFG), optimizer=opt, min_compress_numel=MIN_NUMEL)
    for step in range(DGC_STEPS):
        opt.zero_grad()
        loss_of(model, "mlp", rank, step).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def reference_dgc(world):
    """Lin et al. 2017, Algorithm 1 with momentum correction and factor masking, per parameter.

    Where every coordinate is sent (the dense step 0) the momentum is not masked: that is
    dense momentum SGD, as the DGC authors do for tensors they do not compress.
    """
    torch.set_num_threads(1)
    model = make_model("mlp")
    params = list(model.parameters())
    u = [[torch.zeros_like(p) for p in params] for _ in range(world)]
    v = [[torch.zeros_like(p) for p in params] for _ in range(world)]
    dense_u = [torch.zeros_like(p) for p in params]
    m = DGC_CFG["momentum"]
    for step in range(DGC_STEPS):
        ratio = DGC_CFG["warmup"].ratio(DGC_CFG["ratio"], step, 0)
        local = []
        for r in range(world):
            model.zero_grad()
            loss_of(model, "mlp", r, step).backward()
            local.append([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            if p.numel() < MIN_NUMEL:  # sent whole; momentum on the average
                avg = sum(local[r][i] for r in range(world)) / world
                dense_u[i] = m * dense_u[i] + avg
                update = dense_u[i]
            else:
                total = torch.zeros(p.numel())
                for r in range(world):
                    u[r][i] = m * u[r][i] + local[r][i]
                    v[r][i] = v[r][i] + u[r][i]
                    flat = v[r][i].reshape(-1)
                    k = p.numel() if step == 0 else max(1, -(-int(ratio * p.numel() * 1e9) // 10**9))
                    k = min(k, p.numel())
                    mags = flat.abs().tolist()
                    chosen = sorted(sorted(range(len(mags)), key=lambda j: (-mags[j], j))[:k])
                    mask = torch.zeros(p.numel(), dtype=torch.bool)
                    mask[chosen] = True
                    total = total + torch.where(mask, flat, 0.0)
                    if k < p.numel():  # factor masking; with every coordinate sent the momentum carries on
                        u[r][i] = u[r][i] * ~mask.view_as(p)
                    v[r][i] = v[r][i] * ~mask.view_as(p)
                update = (total / world).view_as(p)
            with torch.no_grad():
                p -= LR * update
    return [p.detach() for p in params]


def test_dgc_hook_equals_step_by_step_reference():
    results = run_world(dgc_worker, 2)
    expected = reference_dgc(2)
    for rank_params in results:
        for got, want in zip(rank_params, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# DGC through the hook at worlds 2 and 3 against the paper written out (tests/dgc_reference.py):
# Nesterov, local clipping, per-bucket selection, fp16/bf16 wire, tensors sent whole, a warm-up
# stage that sends every coordinate (no masking there), masking after it.

PAPER_STEPS, PAPER_BUCKET_MB = 10, 0.3
PAPER_CASES = {
    "nesterov_clip_bucket_fp16": dgc_reference.Config(
        ratio=0.02, nesterov=True, clip_norm=0.3, warmup=(0.3, 0.1), granularity="bucket", wire=torch.float16),
    "nesterov_clip_parameter_bf16": dgc_reference.Config(
        ratio=0.02, nesterov=True, clip_norm=0.3, warmup=(0.3, 0.1), granularity="parameter", wire=torch.bfloat16),
    "momentum_bucket_fp32_complete_stage": dgc_reference.Config(
        ratio=0.05, warmup=(1.0, 0.25), granularity="bucket", min_compress_numel=1),
    "momentum_clip_parameter_fp16": dgc_reference.Config(
        ratio=0.01, clip_norm=0.25, warmup=(), granularity="parameter", wire=torch.float16),
}


def _bucket_layout(model, bucket):
    """DDP's own view of a bucket: [(name, numel)] in memory order (from its gradients' addresses)."""
    names = {id(p): n for n, p in model.module.named_parameters()}
    base, size = bucket.buffer().data_ptr(), bucket.buffer().element_size()
    placed = sorted(((g.data_ptr() - base) // size, names[id(p)], g.numel())
                    for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True))
    return [(name, numel) for _, name, numel in placed]


def paper_worker(rank, world):
    out = {}
    for name, cfg in PAPER_CASES.items():
        model = DDP(make_model("mlp"), bucket_cap_mb=PAPER_BUCKET_MB)
        warmup = Warmup(ratios=cfg.warmup, length=cfg.stage_steps, unit="step") if cfg.warmup else None
        compressor = DGC(cfg.ratio, momentum=cfg.momentum, nesterov=cfg.nesterov, clip_norm=cfg.clip_norm,
                         warmup=warmup)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        state = gddp.GradSparseState(compressor, model=model, granularity=cfg.granularity,
                                     value_dtype=cfg.wire, min_compress_numel=cfg.min_compress_numel,
                                     start_iter=cfg.start_iter)
        layouts = {}

        def recording_hook(state, bucket, model=model, layouts=layouts):
            layouts.setdefault(state.iter, []).append(_bucket_layout(model, bucket))
            return gddp.sparse_hook(state, bucket)

        model.register_comm_hook(state, recording_hook)
        for step in range(PAPER_STEPS):
            opt.zero_grad()
            loss_of(model, "mlp", rank, step).backward()
            opt.step()
        out[name] = {"params": {n: p.detach().clone() for n, p in model.module.named_parameters()},
                     "layouts": layouts, "history": list(state.history)}
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_dgc_hook_equals_the_paper_at_world(world):
    results = run_world(paper_worker, world)
    start = make_model("mlp").state_dict()
    for name, cfg in PAPER_CASES.items():
        layouts = results[0][name]["layouts"]
        assert all(r[name]["layouts"] == layouts for r in results), name
        # the sparse transport carried every step after the dense one (the reference sums in rank order)
        sparse_steps = [h["allreduce_buckets"] == 0 for h in results[0][name]["history"][cfg.start_iter:]]
        if cfg.warmup and cfg.warmup[0] == 1.0:  # a ratio-1.0 stage is moved by allreduce: a transport choice
            sparse_steps = sparse_steps[cfg.stage_steps - cfg.start_iter:]
        assert all(sparse_steps), (name, results[0][name]["history"])
        expected, trace = dgc_reference.run(world, cfg, PAPER_STEPS, layouts)
        # the case exercises what its name says
        if cfg.clip_norm is not None:
            assert trace.clipped > 0 and trace.unclipped > 0, (name, trace)
        if cfg.granularity == "bucket":
            assert trace.multi_tensor_groups > 0, (name, layouts)
        if cfg.warmup and cfg.warmup[0] == 1.0:
            assert trace.complete_groups > 0 and trace.masked_groups > 0, (name, trace)
        assert any(numel < cfg.min_compress_numel for bucket in layouts[1] for _, numel in bucket) or \
            cfg.min_compress_numel == 1, name
        # At world 3 gloo's dense sums (the first step, the ratio-1.0 stage) may associate differently from the
        # reference's rank order: an fp32 ulp per step, which momentum carries on (up to 1/(1-m) = 10x); with an
        # fp16/bf16 wire a value may then round to the neighbouring fp16/bf16 number: the wire is the coarsest
        # precision on the way, and its 8 ulps cover both.
        precision = cfg.wire or torch.float32
        ulps = 8 if cfg.wire else 8 / (1 - cfg.momentum)
        worst = 0.0  # in fp32 ulps of each update's scale (shown with -s)
        for rank, r in enumerate(results):
            for pname, want in expected.items():
                moved = want - start[pname]
                diff = float((r[name]["params"][pname] - start[pname] - moved).abs().max())
                worst = max(worst, diff / tolerance(torch.float32, float(moved.abs().max()), ulps=1))
                close(r[name]["params"][pname] - start[pname], moved, precision, ulps=ulps,
                      what=f"{name}, rank {rank}, {pname}: parameter update after {PAPER_STEPS} steps")
                assert rejects_planted_errors(moved, precision, ulps=ulps)
        print(f"world {world}, {name}: worst difference {worst:.3g} fp32 ulps of the update's scale")


# ----------------------------------------------------------------------------------------------
# Checkpoint: save at step 4, resume in a fresh model and state, match the uninterrupted run.

def checkpoint_worker(rank, world, compressor_name):
    factory = {"dgc": lambda: DGC(0.02, warmup=Warmup(ratios=(0.2,), length=3, unit="step")),
               "threshold": lambda: Threshold(0.01)}[compressor_name]

    def build():
        model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        return model, opt, gddp.register(model, factory(), optimizer=opt)

    def train(model, opt, steps):
        train_steps(model, opt, rank, steps)

    model, opt, state = build()
    train(model, opt, range(1))
    # pickled at step 1, before DDP rebuilds its buckets (the memory's arena is then built again at step 1)
    early = pickle.dumps({"model": model.state_dict(), "opt": opt.state_dict(), "state": state})
    train(model, opt, range(1, 4))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gradsparse": state.state_dict()}, buf)
    pickled = pickle.loads(pickle.dumps(state))
    train(model, opt, range(4, 12))
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, state2 = build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    state2.load_state_dict(ckpt["gradsparse"])
    train(model2, opt2, range(4, 12))
    resumed = [p.detach().clone() for p in model2.parameters()]

    def from_pickle(bind: bool):  # PyTorch's own hook API, as docs/ddp.md shows for pickle
        saved = pickle.loads(early)
        model3 = DDP(make_model("mlp"), bucket_cap_mb=0.05)
        model3.load_state_dict(saved["model"])
        opt3 = torch.optim.SGD(model3.parameters(), lr=0.05)
        opt3.load_state_dict(saved["opt"])
        if bind:
            saved["state"].bind(model3)
        model3.register_comm_hook(saved["state"], gddp.sparse_hook)
        train(model3, opt3, range(1, 12))
        return [p.detach().clone() for p in model3.parameters()]

    try:
        from_pickle(bind=False)
        unbound = "no error"
    except StateMismatchError as err:
        unbound = str(err)
    repickled = from_pickle(bind=True)
    return {"equal": all(torch.equal(a, b) for a, b in zip(uninterrupted, resumed)),
            "pickled_iter": pickled.iter, "pickled_pg": pickled.process_group,
            "pickle_equal": all(torch.equal(a, b) for a, b in zip(uninterrupted, repickled)), "unbound": unbound,
            "pickle_bytes": len(pickle.dumps(state)), "state_dict_bytes": len(pickle.dumps(state.state_dict()))}


@pytest.mark.parametrize("compressor_name", ["dgc", "threshold"])
def test_checkpoint_resume_matches_uninterrupted_run(compressor_name):
    for r in run_world(checkpoint_worker, 2, compressor_name):
        assert r["equal"]
        assert r["pickled_iter"] == 4 and r["pickled_pg"] is None
        # pickled, then bound to the new model: the same run bit for bit (before: the loaded memory's views no longer
        # shared the arena's buffer, and the resumed run drifted); unbound: refused, naming bind()
        assert r["pickle_equal"], r
        assert "unpickled" in r["unbound"] and "state.bind(model)" in r["unbound"], r["unbound"]
        assert r["pickle_bytes"] < 1.5 * r["state_dict_bytes"], r  # the memory, not its buffers and caches


# ----------------------------------------------------------------------------------------------
# Errors: clear, typed, on every rank, never a hang.

def _memory_equal(state, before) -> bool:
    now = state.reducer.memory.state
    return now.keys() == before.keys() and all(torch.equal(t, before[k][n]) for k, s in now.items()
                                               for n, t in s.items())


def errors_worker(rank, world):
    seen = {"rank": rank}
    model = DDP(make_model("mlp"))
    gddp.register(model, TopK(0.01))
    try:
        gddp.register(model, TopK(0.01))
    except HookAlreadyRegisteredError as e:
        seen["twice"] = str(e)
    try:
        model.register_comm_hook(gddp.GradSparseState(TopK(0.01)), gddp.sparse_hook)
    except Exception as e:  # DDP's own refusal
        seen["twice_raw"] = type(e).__name__
    fresh = DDP(make_model("mlp"))
    try:
        gddp.register(fresh, DGC(0.001), optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    except IncompatibleOptimizerError as e:
        seen["momentum"] = str(e)
    gddp.register(fresh, DGC(0.001, momentum=0.0), optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    try:
        gddp.register(DDP(make_model("mlp")), TopK(0.01), op="adasum")
    except ValueError as e:
        seen["adasum"] = str(e)

    for policy in ("raise", "skip", "unverified"):  # unverified: the bad rank flags its payload instead
        model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
        state = gddp.register(model, DGC(0.01, warmup=None), nonfinite="raise" if policy == "raise" else "skip",
                              verify_every=0 if policy == "unverified" else 1)
        for step in range(3):
            model.zero_grad()
            loss = loss_of(model, "mlp", rank, step)
            if step == 2 and rank == 1:
                loss = loss * float("nan")
            memory_before = {k: {n: t.clone() for n, t in s.items()} for k, s in state.reducer.memory.state.items()}
            try:
                loss.backward()
            except Exception as e:  # raised by the hook itself on every rank (the descriptors carry "finite")
                seen[policy] = f"{type(e).__name__}: {e}"
                seen[f"{policy}_memory_unchanged"] = _memory_equal(state, memory_before)
                continue
        if policy != "raise":
            seen[f"{policy}_grads_nan"] = all(torch.isnan(p.grad).all() for p in model.parameters())
            seen[f"{policy}_memory_unchanged"] = _memory_equal(state, memory_before)
            seen[f"{policy}_memory_finite"] = all(torch.isfinite(t).all() for s in state.reducer.memory.state.values()
                                                  for t in s.values())
    return seen


def test_errors_are_typed_and_reach_every_rank():
    for seen in run_world(errors_worker, 2, timeout=120):
        assert "only one" in seen["twice"]
        assert seen["twice_raw"] == "RuntimeError"
        assert "momentum" in seen["momentum"] and "SGD" in seen["momentum"]
        assert "Adasum" in seen["adasum"]
        assert "NonFiniteGradientError" in seen["raise"] and "NaN/Inf" in seen["raise"], seen["raise"]
        assert "skip" not in seen
        assert seen["raise_memory_unchanged"]
        assert seen["skip_grads_nan"] and seen["skip_memory_unchanged"] and seen["skip_memory_finite"]
        # not verified: the NaN rank's flagged payload makes every rank skip; the NaN rank's memory is
        # unchanged (the finite one keeps that step's gradient), and no memory holds a NaN
        assert seen["unverified_grads_nan"] and seen["unverified_memory_finite"]
        assert seen["unverified_memory_unchanged"] == (seen["rank"] == 1)


def test_state_refuses_bad_start_iter_and_register_needs_ddp():
    with pytest.raises(ValueError):
        gddp.GradSparseState(TopK(0.1), start_iter=0)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        gddp.register(nn.Linear(2, 2), TopK(0.1))


def wrong_arguments_worker(rank, world):
    state = gddp.GradSparseState(TopK(0.1))
    out = {}
    for bad in (-1, 1.5, None, "2"):
        try:
            state.set_epoch(bad)
            out[repr(bad)] = "no error"
        except InvalidConfigError as err:
            out[repr(bad)] = str(err)
    state.set_epoch(3)
    for name, given in (("whole", {"model": {}, "opt": {}, "gradsparse": state.state_dict()}), ("empty", {}),
                        ("none", None)):
        try:
            state.load_state_dict(given)
            out[name] = "no error"
        except (StateMismatchError, InvalidConfigError) as err:
            out[name] = f"{type(err).__name__}: {err}"
    out["epoch"] = state.epoch
    return out


def test_a_wrong_epoch_or_checkpoint_is_refused_when_given_naming_what_to_pass():
    """Before: set_epoch(-1) was taken, and the hook then raised inside DDP's backward, which left DDP unable to
    train at all ('unmarked_param_indices' assert); set_epoch(1.5) became 1; load_state_dict of a whole training
    checkpoint raised KeyError: 'world_size', and of None a TypeError."""
    for out in run_world(wrong_arguments_worker, 2):
        assert all("epoch" in out[repr(bad)] for bad in (-1, 1.5, None, "2")), out
        assert "whole checkpoint; pass its ['gradsparse'] entry" in out["whole"], out["whole"]
        assert out["empty"].startswith("StateMismatchError") and out["none"].startswith("ConfigTypeError"), out
        assert out["epoch"] == 3


def fsdp_worker(rank, world):
    from torch.distributed.fsdp import fully_shard

    refusals = {}
    for way in ("register", "state"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        fully_shard(model)  # FSDP2; FullyShardedDataParallel (FSDP1) needs an accelerator in torch 2.13
        try:
            if way == "register":
                gddp.register(model, TopK(0.01))
            else:
                gddp.GradSparseState(TopK(0.01), model=model)
        except TypeError as err:
            refusals[way] = (type(err).__name__, str(err))
    return refusals


def test_an_fsdp_model_is_refused_naming_ddp():
    """register() said only 'model must be a DistributedDataParallel instance'; GradSparseState(model=) accepted it."""
    for refusals in run_world(fsdp_worker, 2):
        for way in ("register", "state"):
            assert way in refusals, refusals
            kind, message = refusals[way]
            assert kind == "ConfigTypeError" and "sharded by FSDP (fully_shard)" in message, refusals
            assert "DistributedDataParallel(net)" in message, refusals


# ----------------------------------------------------------------------------------------------
# Several synchronised backward passes per optimizer step (no no_sync): DDP hands the hook the
# averaged gradient it delivered last time plus the new one.

def _gan():
    torch.manual_seed(0)
    gen = DDP(nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 128)))
    disc = DDP(nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1)))
    return gen, disc


def accumulation_worker(rank, world, scenario):
    from ..logs import LogLines

    lines = LogLines(logging.WARNING)
    logging.getLogger("gradsparse.ddp").addHandler(lines)
    bce = nn.functional.binary_cross_entropy_with_logits
    gen, disc = _gan()
    compressor = TopK(0.05) if scenario.startswith("topk") else DGC(0.01, warmup=None)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.05)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.05)
    state = gddp.register(disc, compressor, optimizer=opt_d, log_every=0)
    gddp.register(gen, TopK(0.05), optimizer=opt_g, log_every=0)
    outcome = "ran"
    for step in range(3):
        g = torch.Generator().manual_seed(10 * rank + step)
        real, z = torch.randn(16, 128, generator=g), torch.randn(16, 8, generator=g)
        try:
            # the discriminator's step, as PyTorch's DCGAN example writes it: two backward passes
            phase = "discriminator"
            opt_d.zero_grad(set_to_none=scenario != "dgc_zeroed_in_place")
            fake = gen(z)
            if scenario in ("dgc_no_sync", "dgc_zeroed_in_place", "dgc_generator_through_disc"):
                with disc.no_sync():
                    bce(disc(real), torch.ones(16, 1)).backward()
            else:
                bce(disc(real), torch.ones(16, 1)).backward()
            before = {k: {n: t.clone() for n, t in s.items()} for k, s in state.reducer.memory.state.items()}
            bce(disc(fake.detach()), torch.zeros(16, 1)).backward()
            opt_d.step()
            before = {k: {n: t.clone() for n, t in s.items()} for k, s in state.reducer.memory.state.items()}
            # the generator's step through the discriminator, whose gradients are discarded
            phase = "generator"
            opt_g.zero_grad()
            if scenario in ("dgc_no_sync", "dgc_zeroed_in_place"):
                with disc.no_sync():
                    bce(disc(fake), torch.ones(16, 1)).backward()
            else:
                bce(disc(fake), torch.ones(16, 1)).backward()
            opt_g.step()
        except InvalidConfigError as err:
            unchanged = _memory_equal(state, before)
            outcome = f"refused at step {step}, {phase} (memory unchanged: " \
                      f"{unchanged}): {err}"
            break
    return {"outcome": outcome, "warnings": [m for m in lines.messages if "already averaged" in m]}


@pytest.mark.parametrize("scenario", ["dgc_two_backwards", "dgc_generator_through_disc", "dgc_no_sync",
                                      "dgc_zeroed_in_place", "topk_two_backwards"])
def test_a_backward_onto_the_delivered_average_is_refused_for_dgc(scenario):
    """DGC put the average of the first backward through its momentum again (conservation off by 95 %,
    DGC(1.0) 0.25 from momentum SGD): refused on every rank, memory unchanged. TopK conserves it (warned once)."""
    for r in run_world(accumulation_worker, 2, scenario):
        if scenario in ("dgc_two_backwards", "dgc_generator_through_disc"):
            where = "discriminator" if scenario == "dgc_two_backwards" else "generator"
            assert r["outcome"].startswith(f"refused at step 0, {where} (memory unchanged: True)"), r
            assert "with model.no_sync():" in r["outcome"] and "discriminator.no_sync()" in r["outcome"], r
        else:
            assert r["outcome"] == "ran", r
            assert len(r["warnings"]) == (1 if scenario == "topk_two_backwards" else 0), r
