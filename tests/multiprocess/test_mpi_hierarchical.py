"""HierarchicalReducer over MPI sub-communicators (``Groups.from_mpi``): 4 ranks under real ``mpirun`` as 2 x 2.

One launch of tests/mpi_hierarchical_worker.py runs every scenario; nodes are emulated by rank
numbers (``local_size=2``), the collectives are Open MPI's own on ``Split`` communicators.
"""

import os
import re

import pytest
import torch

from ..docblocks import ROOT, block_with
from ..tolerances import close
from ..oracles import kept_in_pieces
from ..subprocesses import launch, rank_results
from .test_mpi import mpi_cmd

WORLD, LOCAL = 4, 2
NODES = WORLD // LOCAL


def mpirun(args, cwd, timeout):
    return launch(mpi_cmd(WORLD, *args), timeout, cwd, dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mpi_hier")
    mpirun(["-m", "tests.mpi_hierarchical_worker", str(folder)], ROOT, timeout=300)
    return rank_results(folder, WORLD)


def test_ranks_sharing_rank_div_local_size_form_a_node(ranks):
    assert [r["shape"] for r in ranks] == [(NODES, LOCAL, r // LOCAL, r % LOCAL) for r in range(WORLD)]


@pytest.mark.parametrize("case", ["topk_1", "dgc_1_no_momentum"])
def test_nothing_dropped_equals_mpis_own_allreduce_average(ranks, case):
    reports = [r["equivalence"][case] for r in ranks]
    for r in reports:
        assert r["close"] and r["sensitive"] and r["done"], r  # done: blocking MPI, nothing left to a callback
        assert r["pieces"] and all("@" in k for k in r["pieces"]), r
    assert len({r["hash"] for r in reports}) == 1


def test_dgc_at_one_percent_trains_with_every_rank_bit_identical(ranks):
    reports = [r["dgc"] for r in ranks]
    assert len({r["hash"] for r in reports}) == 1 and reports[0]["hash"] != reports[0]["start"]
    for r in reports:
        assert set(r["transports"]) <= {"hierarchical", "hierarchical_allreduce"} and r["intra"] > 0, r
        assert 0 < r["selected"] < 0.02 * (r["numel"] - r["whole"]), r


def test_what_leaves_each_piece_reaches_every_rank(ranks):
    reports = [r["conservation"] for r in ranks]
    for rep in reports[1:]:
        assert all(torch.equal(a, b) for a, b in zip(rep["outs"], reports[0]["outs"], strict=True))
    delivered = sum(o.double() for o in reports[0]["outs"])
    kept = kept_in_pieces([rep["memory"] for rep in reports], NODES, delivered.numel(), {"w": 0, "b": 12_000})
    compensated = sum(g.double() for rep in reports for g in rep["grads"]) / WORLD
    close(delivered + kept, compensated, torch.float32, ulps=16)  # 16: 5 steps of fp32 sums
    assert float(kept.abs().max()) > 0  # TopK 5 % kept something back: the check above is not vacuous


def test_checkpoint_resumes_bit_exactly(ranks):
    for r in ranks:
        c = r["checkpoint"]
        assert c["resumed"] == c["uninterrupted"] and c["pieces"] and all("@" in k for k in c["pieces"])


def test_what_cannot_work_is_a_typed_error_on_every_rank(ranks):
    for r in ranks:
        seen = r["refusals"]
        assert seen["not_dividing"].startswith("InvalidConfigError") and "does not divide" in seen["not_dividing"]
        assert seen["disagreeing"].startswith("StateMismatchError") and "[1, 2, 2, 2]" in seen["disagreeing"]
        assert seen["auto"] == (1, WORLD)  # "auto": the ranks sharing memory (one machine here)


def test_doc_hierarchical_mpi_script_runs_as_two_nodes_of_two_ranks(tmp_path):
    script = block_with("docs/horovod.md", "Groups.from_mpi(")
    (tmp_path / "train_mpi.py").write_text("import torch\ntorch.set_num_threads(1)\n" + script)
    proc = mpirun(["train_mpi.py"], tmp_path, timeout=180)
    sent = re.findall(r"rank (\d): (\d+) bytes between nodes, (\d+) through the node's collectives in 20 steps; "
                      r"shared memory: (\w+)", proc.stdout)
    assert sorted(rank for rank, _, _, _ in sent) == ["0", "1", "2", "3"], proc.stdout
    dense = 20 * 4 * (256 * 1024 + 1024 + 1024 * 10 + 10)
    # between nodes: the compressed pieces; inside: the gradients went through shared memory, the node's
    # communicators carried only barriers
    assert all(0 < int(between) < dense / 5 and int(inside) < dense / 1000 and shared == "True"
               for _, between, inside, shared in sent), (sent, dense)


# ------------------------------------------------------------------------------ a dead rank
BOUND_S = 30  # from the kill to mpirun's exit, and to each survivor's error (measured: under 1 s)
VICTIM = 3  # rank 2 shares its node; rank 1 its column (the exchange between nodes); rank 0 neither


def dead_rank_job(tmp_path, path, victim, world, ulfm=False):
    """mpirun of tests/dead_rank_worker.py (``--with-ft ulfm``: Open MPI's fault tolerance, survivors keep running)."""
    from ..subprocesses import launch_with_a_dead_rank

    cmd = mpi_cmd(world, "-m", "tests.dead_rank_worker", "mpi", path, str(victim), str(tmp_path))
    if ulfm:
        cmd[1:1] = ["--with-ft", "ulfm"]
    proc, after_kill_s, outcomes = launch_with_a_dead_rank(cmd, tmp_path, 90, ROOT,
                                                           dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and after_kill_s < BOUND_S, (proc.returncode, after_kill_s, out[-3000:])
    assert victim not in outcomes and set(outcomes) <= set(range(world)), outcomes
    for rank, outcome in outcomes.items():
        assert outcome["type"] == "CommunicationError" and outcome["steps"] == 3, outcome
        assert f"on rank {rank}" in outcome["error"] and "at step 3" in outcome["error"], outcome["error"]
        assert outcome["after_kill_s"] < BOUND_S, outcome
    return out, outcomes


def test_a_dead_rank_ends_the_job_through_mpirun(tmp_path):
    """Open MPI's default: mpirun sees the rank die, kills every other one and exits with its status."""
    out, _ = dead_rank_job(tmp_path, "hierarchical", VICTIM, WORLD)
    assert re.search(rf"process rank {VICTIM} with PID \d+ on node \S+ exited on\s+signal 9 \(Killed\)", out), out


def test_a_dead_rank_is_a_communication_error_inside_its_node_and_across_nodes_under_ulfm(tmp_path):
    """``mpirun --with-ft ulfm``: the ranks exchanging with the dead one raise CommunicationError saying at
    which level, with which ranks (the dead one among them); rank 0 exchanges only with them and ends when
    they exit (mpirun then ends the job) or raises the same way."""
    _, outcomes = dead_rank_job(tmp_path, "hierarchical", VICTIM, WORLD, ulfm=True)
    assert {1, 2} <= set(outcomes), outcomes
    for rank, where, peers in ((2, "inside node 1", [2, 3]), (1, "between nodes", [1, 3])):
        error = outcomes[rank]["error"]
        assert f"failed {where} on rank {rank}" in error and f"with ranks {peers} (by world rank)" in error, error
        assert "MPI_ERR_PROC_FAILED" in error, error
