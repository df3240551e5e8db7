"""gradsparse on a model prepared by Hugging Face Accelerate, under a real ``accelerate launch``.

Accelerate 1.x runs several CPU processes only through MPI: ``accelerate launch --cpu
--num_processes 2 --mpirun_hostfile FILE`` starts ``mpirun`` (Open MPI, installed into the
venv by the Makefile's "mpi" extra); ``--cpu --num_processes 2`` without a hostfile starts
one process. Inside, Accelerate finds MULTI_CPU and a gloo process group.
"""

import importlib.util
import os
import shutil
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                                reason="needs accelerate (pip install -e '.[integrations]')")

from ..docblocks import ROOT
from ..subprocesses import run_group

BIN = os.path.dirname(sys.executable)


def equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return a == b


def accelerate_launch(folder, *target, timeout=240, cwd=ROOT):
    """``accelerate launch`` of 2 CPU processes through mpirun; returns the completed process."""
    hostfile = folder / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    accelerate = os.path.join(BIN, "accelerate") if os.path.exists(os.path.join(BIN, "accelerate")) else "accelerate"
    # mpirun from the venv; Open MPI refuses root unless told (CI containers run as root)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    assert shutil.which("mpirun", path=env["PATH"]), "mpirun not found: install the 'mpi' extra (Open MPI)"
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--mpirun_hostfile", str(hostfile), *target]
    return run_group(cmd, timeout, cwd=cwd, env=env)


def test_dgc_with_gradient_accumulation_under_accelerate_launch(tmp_path):
    proc = accelerate_launch(tmp_path, "-m", "tests.accelerate_worker", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    steps = 32 // 4
    for run in runs:
        # the hook ran on the synchronising micro-batch only: once per optimizer step
        assert run["syncs"] == [i % 4 == 3 for i in range(32)]
        assert [it[0] for it in run["iters"]] == [(i + 1) // 4 for i in range(32)]
        assert run["iters"][-1] == [steps, steps] and run["hook_calls"] == [steps, steps]  # one bucket per step
        last = run["history"][-1]
        assert last["allreduce_buckets"] == 0 and last["density"] < 0.1  # DGC compressed
        dgc, topk1, plain = run["params"]
        assert all(torch.equal(topk1[k], plain[k]) for k in plain)  # TopK(1.0) == DDP with the same accumulation
        assert not all(torch.equal(dgc[k], plain[k]) for k in plain)
        # AllRanksState through accelerator.save_state / load_state: this rank's own state came back
        assert run["moved_on"] == steps + 1 and equal(run["restored"], run["state"])
    assert not equal(runs[0]["state"]["memory"], runs[1]["state"]["memory"])
    for a, b in zip(runs[0]["params"], runs[1]["params"]):
        assert all(torch.equal(a[k], b[k]) for k in a)  # ranks agree
