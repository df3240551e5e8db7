"""The documentation's runnable examples run."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from ..docblocks import ROOT, block_with
from ..subprocesses import run_group


def test_ddp_doc_script_runs_under_torchrun(tmp_path):
    script = block_with("docs/ddp.md", "init_process_group")
    path = tmp_path / "train.py"
    path.write_text("import torch\ntorch.set_num_threads(1)\n" + script)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(path)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    # the two ranks print concurrently: their lines may interleave, so match records, not lines
    reports = re.findall(r"rank (\d): step 1000: .*?ratio ([\d.]+)x, allreduce buckets 0/", proc.stdout)
    assert sorted(rank for rank, _ in reports) == ["0", "1"], proc.stdout + proc.stderr[-3000:]
    assert all(float(ratio) > 100 for _, ratio in reports), proc.stdout
    if proc.returncode != 0:
        # Both ranks finished their work (checked above). The one failure tolerated after that is
        # torch 2.13 + gloo aborting in interpreter teardown (docs/ddp.md, "Shutting down"; it
        # happens without gradsparse too): a -6 exit carrying exactly that message, no traceback.
        assert "terminate called without an active exception" in proc.stderr, proc.stderr[-3000:]
        assert "exitcode: -6" in proc.stderr and "Traceback (most recent call last)" not in proc.stderr.split(
            "terminate called")[0], proc.stderr[-3000:]


def _assert_ran_on_both_ranks(proc, step):
    """Both ranks printed their statistics of step ``step`` with DGC compressing (density 1 %)."""
    out = proc.stdout + proc.stderr
    reports = re.findall(rf"rank (\d): step {step}: .*?density ([\d.]+), ratio", out)
    assert sorted(rank for rank, _ in reports) == ["0", "1"], out[-5000:]
    assert all(float(density) < 0.05 for _, density in reports), reports
    if proc.returncode != 0:  # only torch 2.13 + gloo's abort at interpreter exit is tolerated (see above)
        assert "terminate called without an active exception" in proc.stderr, proc.stderr[-3000:]
        before, _, after = proc.stderr.partition("terminate called")
        assert "Traceback (most recent call last)" not in before, proc.stderr[-3000:]
        # after the abort, only a launcher reporting it (accelerate's mpirun: exit status 134 = SIGABRT)
        if "Traceback (most recent call last)" in after:
            assert "returned non-zero exit status 134" in after and after.count("Traceback (most recent") == 1, \
                proc.stderr[-3000:]


def _integration_env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs the 'integrations' extra")
def test_integrations_doc_lightning_script_runs(tmp_path):
    script = block_with("docs/integrations.md", "GradSparseStrategy(")
    (tmp_path / "train.py").write_text(script)
    proc = run_group([sys.executable, "train.py"], 240, cwd=tmp_path, env=_integration_env())
    _assert_ran_on_both_ranks(proc, 31)  # 512 samples, batch 16, 2 ranks: 16 steps per epoch, 2 epochs


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="needs the 'integrations' extra")
def test_integrations_doc_accelerate_script_runs_under_accelerate_launch(tmp_path):
    from ..multiprocess.test_accelerate import accelerate_launch

    script = block_with("docs/integrations.md", "accelerator.prepare")
    (tmp_path / "train.py").write_text(script)
    proc = accelerate_launch(tmp_path, str(tmp_path / "train.py"), cwd=tmp_path)
    _assert_ran_on_both_ranks(proc, 31)  # 64 micro-batches, 2 per optimizer step
    assert (tmp_path / "checkpoint" / "custom_checkpoint_0.pkl").exists()


def test_scale_doc_examples_run():
    """docs/scale.md's two python blocks, as written: the cost model's choice and advise in one process."""
    choice = block_with("docs/scale.md", "choose(")
    proc = subprocess.run([sys.executable, "-c", choice], cwd=ROOT, env=_integration_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    transport, predicted = proc.stdout.split(" ", 1)
    assert transport == "hierarchical" and predicted.startswith("{'dense': 1.2003")
    advise = block_with("docs/scale.md", "gradsparse.advise import main")
    proc = subprocess.run([sys.executable, "-c", advise], cwd=ROOT, env=_integration_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    label, speedup = proc.stdout.strip().rsplit(" ", 1)
    assert label and float(speedup) > 0
