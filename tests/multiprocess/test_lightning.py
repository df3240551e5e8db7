"""gradsparse.lightning.GradSparseStrategy under a real Lightning Trainer (CPU, 2 processes Lightning starts).

Two launches of tests/lightning_worker.py: ``train`` (several fits in the same 2 processes)
and ``resume`` (new processes resuming from a checkpoint the first launch wrote).
"""

import importlib.util
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="needs lightning (pip install -e '.[integrations]')")

from ..docblocks import ROOT
from ..subprocesses import run_group


def launch(scenario, folder, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = run_group([sys.executable, "-m", "tests.lightning_worker", scenario, str(folder)], timeout, cwd=ROOT,
                     env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lightning")
    launch("train", folder)
    return folder


def result(folder, tag, rank):
    return torch.load(folder / f"{tag}-rank{rank}.pt", weights_only=True)


def equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def test_dgc_trains_under_the_lightning_trainer_on_cpu(trained):
    runs = [result(trained, "dgc", r) for r in range(2)]
    for run in runs:
        assert "error" not in run and run["global_step"] == 32
        assert run["state"]["step"] == 32 and len(run["history"]) == 32  # the hook ran every optimizer step
        last = run["history"][-1]
        assert last["allreduce_buckets"] == 0 and last["density"] < 0.1 and last["compression_ratio"] > 5
        assert sum(run["losses"][-4:]) < 0.6 * sum(run["losses"][:4])
    assert equal(runs[0]["params"], runs[1]["params"])  # every rank applied the same update
    for rank in range(2):  # DGC's momentum rule meets configure_optimizers: SGD(momentum=0.9) is refused
        error = result(trained, "refused", rank)["error"]
        assert error.startswith("IncompatibleOptimizerError: param group 0: DGC applies momentum 0.9 itself"), error


def test_topk_ratio_1_equals_lightning_without_the_hook(trained):
    for rank in range(2):
        sparse, dense = result(trained, "topk1", rank), result(trained, "dense", rank)
        # accumulate_grad_batches=2: Lightning's no_sync on the other micro-batch, the hook once per optimizer step
        assert sparse["global_step"] == dense["global_step"] == 16 and sparse["state"]["step"] == 16
        assert equal(sparse["params"], dense["params"])


def test_ddp_comm_hook_dropped_by_lightning_on_cpu_is_reported(trained):
    for rank in range(2):
        warnings = result(trained, "dropped", rank)["warnings"]
        assert len(warnings) == 1 and "hook of GradSparseState(TopK(" in warnings[0] and "never ran" in warnings[0]


def test_checkpoint_resume_equals_uninterrupted_run_per_rank(trained):
    ckpt = torch.load(trained / "ckpt" / "epoch=1.ckpt", weights_only=True)  # plain tensors and numbers
    saved = ckpt["gradsparse"]
    assert saved["world_size"] == 2 and [s["rank"] for s in saved["ranks"]] == [0, 1]
    memories = [s["memory"]["state"] for s in saved["ranks"]]
    assert memories[0].keys() == memories[1].keys() and memories[0]
    assert not equal(memories[0], memories[1])  # each rank's own residuals, not rank 0's twice
    launch("resume", trained)
    for rank in range(2):
        whole, resumed = result(trained, "uninterrupted", rank), result(trained, "resumed", rank)
        assert "error" not in resumed and resumed["warnings"] == []
        assert resumed["global_step"] == whole["global_step"] == 32
        assert equal(resumed["params"], whole["params"])
        assert equal(resumed["state"], whole["state"])  # residuals, momentum, step: bit for bit on every rank
        # gathering state into checkpoints changed nothing: the same run without checkpoints ends the same
        assert equal(whole["params"], result(trained, "dgc", rank)["params"])


def test_strategy_refuses_a_second_hook():
    from gradsparse import TopK, ddp
    from gradsparse.errors import InvalidConfigError
    from gradsparse.lightning import GradSparseStrategy

    with pytest.raises(InvalidConfigError, match=r"\['ddp_comm_hook'\] cannot be combined"):
        GradSparseStrategy(TopK(0.01), ddp_comm_hook=ddp.sparse_hook)
    strategy = GradSparseStrategy(TopK(0.01), state_kwargs={"start_iter": 2}, find_unused_parameters=True)
    assert strategy.state is None and strategy._ddp_kwargs == {"find_unused_parameters": True}
