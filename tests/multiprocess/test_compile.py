"""torch.compile of a DDP model with the gradsparse hook (docs/ddp.md, "torch.compile").

``register`` accepts the DDP model or ``torch.compile(ddp_model)`` (the hook goes on the DDP model inside).
With torch's default ``optimize_ddp`` (DDPOptimizer: the compiled graph split at DDP's buckets)
DDP's own reducer still calls the hook with its buckets: nothing dropped equals plain DDP
compiled the same way, bit for bit. Under ``optimize_ddp="python_reducer"`` DDP calls comm
hooks per parameter with ``(grad, param)`` and discards their result: refused, typed, naming the fix.
"""

import torch
import torch._dynamo
from torch.nn.parallel import DistributedDataParallel as DDP

import gradsparse
from gradsparse.errors import InvalidConfigError

from ..distributed import run_world
from ..models import loss_of, make_model


def _train(model, opt, steps, forward):
    for step in range(steps):
        opt.zero_grad()
        loss_of(forward, "mlp", torch.distributed.get_rank(), step).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def compile_worker(rank, world):
    out = {}
    plain = DDP(make_model("mlp"))
    ref = _train(plain, torch.optim.SGD(plain.parameters(), lr=0.1), 4, torch.compile(plain))
    model = DDP(make_model("mlp"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = gradsparse.ddp.register(model, gradsparse.TopK(1.0), optimizer=opt, log_every=0)
    got = _train(model, opt, 4, torch.compile(model))
    out["topk_equal"] = all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    out["topk_steps"] = state.step
    # compiled first, registered on the compiled wrapper: the hook goes on the DDP model inside it
    model = DDP(make_model("mlp"))
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = gradsparse.ddp.register(compiled, gradsparse.DGC(0.01, warmup=None), optimizer=opt, log_every=0)
    _train(model, opt, 4, compiled)
    out["dgc_density"] = state.last_stats.density
    out["dgc_keys"] = sorted(state.state_dict()["memory"]["state"])
    out["names"] = sorted(name for name, _ in model.module.named_parameters())
    out["dgc_params"] = [p.detach().clone() for p in model.parameters()]

    previous = torch._dynamo.config.optimize_ddp
    torch._dynamo.config.optimize_ddp = "python_reducer"
    try:
        model = DDP(make_model("mlp"))
        try:
            gradsparse.ddp.register(model, gradsparse.TopK(0.01))
        except InvalidConfigError as err:
            out["register"] = str(err)
        model.register_comm_hook(gradsparse.ddp.GradSparseState(gradsparse.TopK(0.01)), gradsparse.ddp.sparse_hook)
        try:
            loss_of(model, "mlp", rank, 0).backward()
        except InvalidConfigError as err:
            out["raw_hook"] = str(err)
    finally:
        torch._dynamo.config.optimize_ddp = previous
        torch._dynamo.reset()
    return out


def test_compiled_ddp_runs_the_hook_and_python_reducer_is_refused():
    results = run_world(compile_worker, 2, timeout=400)
    for r in results:
        assert r["topk_equal"], "compiled DDP with TopK(1.0) must equal compiled plain DDP bit for bit"
        assert r["topk_steps"] == 4
        assert 0 < r["dgc_density"] < 0.1
        assert r["dgc_keys"] == r["names"]  # keyed as without torch.compile: no "_orig_mod." prefix
        for name in ("register", "raw_hook"):
            assert "python_reducer" in r[name] and "ddp_optimizer" in r[name], r.get(name)
    assert all(torch.equal(a, b) for a, b in zip(results[0]["dgc_params"], results[1]["dgc_params"], strict=True))
