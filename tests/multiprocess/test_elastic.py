"""docs/ddp.md's elastic-restart recipe: a rank SIGKILLed mid-run, torchrun restarts the workers, nothing lost.

The script block of "Elastic restarts" runs twice under ``torchrun --max-restarts 2``:
through, and with rank 1 killing itself after step 20 on its first attempt. Both ranks
must resume from the same checkpoint and end bit-identical to the uninterrupted run.
"""

import os
import re
import subprocess
import sys

from ..docblocks import ROOT, block_with


def _torchrun(script, folder, **env):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # as docs/ddp.md says: a fresh store for each restart
           "CKPT_DIR": str(folder), **env}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--max-restarts", "2", str(script)], capture_output=True, text=True, timeout=150,
                          cwd=folder, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _final_hashes(out):
    found = dict(re.findall(r"rank (\d): final parameters sha256 ([0-9a-f]{64})", out))
    assert sorted(found) == ["0", "1"], out[-4000:]
    return found


def test_killed_rank_resumes_bit_identical_to_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(block_with("docs/ddp.md", "TORCHELASTIC_RESTART_COUNT"))
    (tmp_path / "through").mkdir()
    (tmp_path / "killed").mkdir()
    through = _torchrun(script, tmp_path / "through")
    assert "resumed from step" not in through
    expected = _final_hashes(through)
    assert expected["0"] == expected["1"]

    killed = _torchrun(script, tmp_path / "killed", KILL_AT="20")
    assert re.search(r"exitcode\s*:\s*-9|Signal 9", killed), killed[-4000:]  # torchrun saw rank 1 die
    resumed = dict(re.findall(r"rank (\d): resumed from step (\d+) \(attempt 1\)", killed))
    assert sorted(resumed) == ["0", "1"] and len(set(resumed.values())) == 1, killed[-4000:]  # the same step
    assert resumed["0"] in ("10", "20") and "(attempt 0)" not in killed, killed[-4000:]
    assert _final_hashes(killed) == expected, killed[-4000:]
