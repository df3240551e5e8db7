"""AMP's GradScaler (real, on CPU): residuals and momentum never mix loss scales.

GradScaler's scales are powers of two, so a run whose scale grows, is cut, and
skips an overflowing step must end bit-identical to a run without scaling that
skips the same step.
"""

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, Threshold, TopK
from gradsparse import ddp as gddp

from ..distributed import run_world
from ..models import loss_of, make_model, params_hash

COMPRESSORS = {
    "dgc": lambda: DGC(0.01, warmup=None),
    "dgc_clipped": lambda: DGC(0.01, warmup=None, clip_norm=0.5),
    "topk": lambda: TopK(0.02),
    "threshold": lambda: Threshold(2e-3),
}
STEPS, OVERFLOW_STEP, CUT_STEP = 8, 5, 3


def amp_worker(rank, world, scaled, tell_hook=True, names=tuple(COMPRESSORS)):
    return {name: train(rank, name, scaled, tell_hook) for name in names}


def train(rank, name, scaled, tell_hook):
    model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1) if scaled else None
    gddp.register(model, COMPRESSORS[name](), grad_scaler=scaler if tell_hook else None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scales = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = loss_of(model, "mlp", rank, step)
        if step == OVERFLOW_STEP and rank == 1:
            loss = loss * float("inf")  # one rank overflows: every rank must skip the step
        if scaler is None:
            loss.backward()
            if step != OVERFLOW_STEP:
                opt.step()
            continue
        scaler.scale(loss).backward()
        scaler.step(opt)
        scales.append(scaler.get_scale())
        scaler.update(2.0**4 if step == CUT_STEP else None)
    return {"hash": params_hash(model), "scales": scales}


@pytest.fixture(scope="module")
def plain():
    return run_world(amp_worker, 2, False)


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_grad_scaler_run_equals_unscaled_run_bit_for_bit(plain, scaled, name):
    scales = scaled[0][name]["scales"]
    assert len(set(scales)) >= 4 and min(scales) < max(scales)  # the scale grew and was cut
    assert [r[name]["hash"] for r in scaled] == [r[name]["hash"] for r in plain]


@pytest.fixture(scope="module")
def scaled():
    return run_world(amp_worker, 2, True)


def test_without_telling_the_hook_the_scales_mix(plain):
    """The same run with the hook unaware of the scaler drifts: the test above can fail."""
    unaware = run_world(amp_worker, 2, True, False, ("dgc",))
    assert unaware[0]["dgc"]["hash"] != plain[0]["dgc"]["hash"]
