"""gradsparse.horovod with ``hierarchy=``: 4 real Horovod processes (``horovodrun --gloo``) as 2 nodes x 2 ranks.

One launch of tests/horovod_hierarchical_worker.py runs every scenario; the tests assert on
what every rank saved. Nodes are emulated by rank numbers (``Hierarchy(local_size=2)``); the
collectives are Horovod's own on real process sets.
"""

import os
import re
import shutil

import pytest
import torch

from ..docblocks import ROOT, block_with
from ..tolerances import close
from ..oracles import kept_in_pieces
from ..subprocesses import launch, launch_once_more_on_a_gloo_timeout, launch_with_a_dead_rank, rank_results
from .test_horovod import horovod_cmd

WORLD, LOCAL = 4, 2
NODES = WORLD // LOCAL


def _env(**extra: str) -> dict:
    """The ranks' environment: the repository importable, one thread each, and ``extra``."""
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", **extra)


def horovodrun(args, cwd, timeout):
    return launch(horovod_cmd(WORLD, *args), timeout, cwd, _env())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("horovod_hier")

    def fresh():
        shutil.rmtree(folder)
        folder.mkdir()

    launch_once_more_on_a_gloo_timeout(horovod_cmd(WORLD, "-m", "tests.horovod_hierarchical_worker", str(folder)),
                                       400, ROOT, _env(PYTHONFAULTHANDLER="1"), fresh)
    return rank_results(folder, WORLD)


@pytest.mark.parametrize("case", ["topk_1", "dgc_1_no_momentum"])
def test_nothing_dropped_equals_horovods_own_average(ranks, case):
    reports = [r["equivalence"][case] for r in ranks]
    for r in reports:
        assert r["close"] and r["sensitive"], r  # every gradient, every step, within tests/tolerances.py's rule
        assert all(b > 0 for b in r["intra"]) and all(s > 0 for s in r["selected"]), r  # the hierarchical path
        assert r["pieces"] and all("@" in k for k in r["pieces"]) and r["flat_memory"] == [], r
    assert len({r["hash"] for r in reports}) == 1
    # each large parameter's pieces are kept by the two local ranks, one piece each
    assert "2.weight@0:32768" in reports[0]["pieces"] and "2.weight@32768:65536" in reports[1]["pieces"]


def test_dgc_at_one_percent_trains_with_every_rank_bit_identical(ranks):
    reports = [r["dgc"] for r in ranks]
    assert len({r["hash"] for r in reports}) == 1 and reports[0]["hash"] != reports[0]["start"]
    for r in reports:
        last = r["last"]
        assert last["intra_bytes"] > 0 and 0 < last["selected"] < 0.02 * (last["numel"] - last["whole"]), last
        assert last["hierarchical_buckets"] == last["buckets"] > 0, last  # the statistics say the hierarchy was taken (docs/horovod.md)
        assert set(r["steps"].values()) == {8}


def test_switching_paths_moves_residuals_and_momentum_exactly(ranks):
    for r in ranks:
        s = r["switching"]
        assert s["close"], s
        assert [b > 0 for b in s["intra"]] == [True, True, False, False, True, True], s["intra"]
        assert s["flat_keys"] == [] and s["piece_keys"] and all("@" in k for k in s["piece_keys"]), s


def test_transport_by_cost_measures_the_process_sets_and_agrees_on_every_rank(ranks):
    reports = [r["by_cost"] for r in ranks]
    assert all(r["shape"] == (NODES, LOCAL) and r["links"] == (True, True) for r in reports), reports
    assert all(r["paths"] == reports[0]["paths"] and r["hash"] == reports[0]["hash"] for r in reports[1:])
    assert len(reports[0]["paths"]) == 6


@pytest.mark.parametrize("path", ["flat", "hierarchical"])
def test_a_nan_on_one_rank_gives_nan_everywhere_and_changes_no_memory(ranks, path):
    reports = [r["nonfinite"][path] for r in ranks]
    for r in reports:
        errors, nans = r["seen"][0::2], r["seen"][1::2]
        assert errors == ["no error"] * 3, errors
        assert [all(n) for n in nans] == [False, True, False] and not any(nans[0]) and not any(nans[2]), nans
        assert r["memory_unchanged"]
    assert len({r["hash"] for r in reports}) == 1


def test_what_leaves_each_piece_reaches_every_rank(ranks):
    """Over all steps: results + what every piece still keeps (scaled as reduced) = the average of the gradients."""
    reports = [r["conservation"] for r in ranks]
    for rep in reports[1:]:
        for mine, first in zip(rep["outs"], reports[0]["outs"], strict=True):
            assert all(torch.equal(mine[n], first[n]) for n in first)
    for rep in reports:
        assert rep["flat_memory"] == {} and set(rep["memory"]) and not any(k.startswith("tiny") for k in rep["memory"])
    for name in ("w", "b", "tiny"):
        delivered = sum(step[name].double() for step in reports[0]["outs"])
        mine = [{k: t for k, t in rep["memory"].items() if k.split("@")[0] == name} for rep in reports]
        kept = kept_in_pieces(mine, NODES, delivered.numel(), {name: 0})
        compensated = sum(step[name].double() for rep in reports for step in rep["grads"]) / WORLD
        close(delivered + kept, compensated, torch.float32, ulps=16, what=name)  # 16: 5 steps of fp32 sums
        if name != "tiny":
            assert float(kept.abs().max()) > 0  # TopK 5 % kept something back: the check above is not vacuous


def test_checkpoint_resumes_bit_exactly(ranks):
    for r in ranks:
        c = r["checkpoint"]
        assert c["resumed"] == c["uninterrupted"]
        assert c["pieces"] and all("@" in k for k in c["pieces"])
        assert c["other_shape"].startswith("StateMismatchError") and "2 x 2" in c["other_shape"], c["other_shape"]
        assert c["into_flat"].startswith("StateMismatchError") and "hierarchy=" in c["into_flat"], c["into_flat"]


def test_what_cannot_work_is_a_typed_error_on_every_rank(ranks):
    for r in ranks:
        seen = r["refusals"]
        assert seen["not_dividing"].startswith("InvalidConfigError") and "does not divide" in seen["not_dividing"]
        assert seen["disagreeing"].startswith("StateMismatchError") and "[1, 2, 2, 2]" in seen["disagreeing"]
        assert seen["process_set"].startswith("InvalidConfigError") and "global process set" in seen["process_set"]
        assert seen["auto"] == (1, WORLD, WORLD)  # "auto": Horovod's local_size() (one host here)
        assert r["without_dynamic"].startswith("InvalidConfigError") and \
            'process_sets="dynamic"' in r["without_dynamic"], r["without_dynamic"]


def test_doc_hierarchical_script_runs_as_two_nodes_of_two_ranks(tmp_path):
    script = block_with("docs/horovod.md", "hierarchy=Hierarchy(")
    (tmp_path / "train.py").write_text("import torch\ntorch.set_num_threads(1)\n" + script)
    proc = horovodrun(["train.py"], tmp_path, timeout=240)
    reports = re.findall(r"rank (\d): step 4: .*?density ([\d.]+), .*?inside the node (\d+) B", proc.stdout)
    assert sorted(rank for rank, _, _ in reports) == ["0", "1", "2", "3"], proc.stdout[-4000:]
    assert all(float(density) < 0.05 and int(intra) > 0 for _, density, intra in reports), reports


# ------------------------------------------------------------------------------ a dead rank
BOUND_S = 30  # from the kill to the launcher's exit (measured: about 1 s)


def assert_horovodrun_ends_the_job(proc, after_kill_s, outcomes, victim, world):
    """horovodrun --gloo exits 1 within BOUND_S, every rank ended; the dead rank's line says it was killed.

    Horovod decides how the survivors end, not gradsparse: its background thread meets gloo's
    IoException ("Connection reset by peer"), shuts Horovod down and aborts the process
    (std::terminate, status 134), or horovodrun terminates it first (143). A survivor whose training
    code runs before that sees gradsparse's CommunicationError (cause: "Horovod has been shut down").
    horovodrun's "first process" is the first exit it noticed: a survivor's abort as often as the kill.
    """
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and after_kill_s < BOUND_S, (proc.returncode, after_kill_s, out[-3000:])
    assert f"[{victim}]<stderr>:Killed" in out, out[-3000:]
    assert "Horovod detected that one or more processes exited with non-zero status" in out, out[-3000:]
    assert victim not in outcomes and set(outcomes) <= set(range(world)), outcomes
    for rank, outcome in outcomes.items():  # the survivors that got back into Python before the end
        assert outcome["type"] == "CommunicationError" and outcome["steps"] == 3, outcome
        assert f"on rank {rank}" in outcome["error"] and "at step 3" in outcome["error"], outcome["error"]
        assert "Horovod has been shut down" in outcome["error"], outcome["error"]
        assert outcome["after_kill_s"] < BOUND_S, outcome


def test_a_dead_rank_ends_the_job_inside_its_node_and_across_nodes(tmp_path):
    """Rank 3 SIGKILLed at step 3 of DGC through the hierarchy: rank 2 shares its node, ranks 0 and 1 do not."""
    cmd = horovod_cmd(WORLD, "-m", "tests.dead_rank_worker", "horovod", "hierarchical", "3", str(tmp_path))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    assert_horovodrun_ends_the_job(*launch_with_a_dead_rank(cmd, tmp_path, 90, ROOT, env), victim=3, world=WORLD)
