"""The documentation's runnable examples run."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(path):
    with open(os.path.join(ROOT, path)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_ddp_doc_script_runs_under_torchrun(tmp_path):
    script = next(b for b in _python_blocks("docs/ddp.md") if "init_process_group" in b)
    path = tmp_path / "train.py"
    path.write_text("import torch\ntorch.set_num_threads(1)\n" + script)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(path)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the two ranks print concurrently: their lines may interleave, so match records, not lines
    reports = re.findall(r"rank (\d): step 19: .*?ratio ([\d.]+)x, dense buckets 0/", proc.stdout)
    assert sorted(rank for rank, _ in reports) == ["0", "1"], proc.stdout
    assert all(float(ratio) > 10 for _, ratio in reports), proc.stdout
