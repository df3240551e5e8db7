"""gradsparse.comm.mpi under real ``mpirun`` (Open MPI from the registry), world sizes 2 and 3."""

import os
import re
import shutil
import sys

import pytest
import torch

from ..docblocks import ROOT, block_with
from ..subprocesses import launch, rank_results
from .test_ddp import reference_dgc

MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
if not os.path.exists(MPIRUN):
    MPIRUN = shutil.which("mpirun") or MPIRUN


def mpi_cmd(np_: int, *args: str) -> list[str]:
    """``mpirun`` of ``np_`` ranks on this machine running ``python *args``."""
    return [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", str(np_), sys.executable, *args]


def mpirun(np_, folder, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    launch(mpi_cmd(np_, "-m", "tests.mpi_worker", str(folder)), timeout, ROOT, env)
    return rank_results(folder, np_)


@pytest.mark.parametrize("world", [2, 3])
def test_mpi_communicator_and_pipeline(world, tmp_path):
    results = mpirun(world, tmp_path)
    expected_dgc = reference_dgc(world)
    for r in results:
        ag = r["allgather"]
        assert ag["varying_with_empty"]["ok"] and ag["equal"]["ok"] and ag["all_empty"]["ok"]
        assert ag["varying_with_empty"]["sizes"] == [0 if q == 1 else 5 + 1000 * q for q in range(world)]
        assert ag["all_empty"]["sizes"] == [0] * world
        total = world * (world + 1) / 2
        for dtype in ("float32", "bfloat16", "float16"):
            assert ag[f"allreduce_torch.{dtype}"] == [total] * 10
        # DGC through the pipeline over MPI equals the step-by-step reference of tests/multiprocess/test_ddp.py
        for got, want in zip(r["dgc"], expected_dgc, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert r["bytes_sent"] > 0
        for name in ("threshold_last_rank_silent", "topk"):
            assert r[f"bytes_{name}"]["reported"] == r[f"bytes_{name}"]["moved"], name
    for name in results[0]["hashes"]:  # every rank ends bit-identical, also with a silent rank
        assert len({r["hashes"][name] for r in results}) == 1, name
    for r in results:  # the split transport (alltoall over Alltoallv) gives the allgather's bits
        assert r["hashes"]["topk25.split"] == r["hashes"]["topk25.allgather"]
        assert r["transports.split"] == ["split"]


def test_doc_quick_start_runs_under_mpirun(tmp_path):
    script = block_with("docs/horovod.md", "MPICommunicator()")
    path = tmp_path / "train_mpi.py"
    path.write_text("import torch\ntorch.set_num_threads(1)\n" + script)
    proc = launch(mpi_cmd(2, str(path)), 120, ROOT, dict(os.environ, PYTHONPATH=ROOT))
    sent = dict(re.findall(r"rank (\d): sent (\d+) bytes in 20 steps", proc.stdout))
    assert sorted(sent) == ["0", "1"], proc.stdout
    dense = 20 * 4 * (256 * 1024 + 1024 + 1024 * 10 + 10)
    assert all(0 < int(n) < dense / 5 for n in sent.values()), (sent, dense)


def test_a_dead_rank_is_a_communication_error_on_every_other_rank_under_ulfm(tmp_path):
    """Rank 1 of 4 SIGKILLed at step 3 of DGC on the flat path under ``mpirun --with-ft ulfm``: every other
    rank raises CommunicationError naming itself, the step and MPI's cause. (Without ``--with-ft``, mpirun
    kills the job: test_mpi_hierarchical.py.)"""
    from .test_mpi_hierarchical import dead_rank_job

    _, outcomes = dead_rank_job(tmp_path, "flat", 1, 4, ulfm=True)
    assert sorted(outcomes) == [0, 2, 3], outcomes
    assert all("MPI_ERR_PROC_FAILED" in o["error"] for o in outcomes.values()), outcomes
