"""The main job (`make demo` = python -m benchmarks.demo), end to end at a tiny size, on its loopback fallback."""

import json
import os
import subprocess
import sys

from ..docblocks import ROOT


def test_demo_without_iproute2_falls_back_to_loopback_and_writes_table_json_and_png(tmp_path):
    # PATH without ip and tc: the demo must say so and still finish, on loopback
    env = {**os.environ, "PYTHONPATH": ROOT, "PATH": os.path.dirname(sys.executable)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.demo", "--model", "mlp", "--steps", "2", "--warmup", "3",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, (out[-3000:], proc.stderr[-3000:])
    assert "emulated cluster unavailable: iproute2 is missing" in out and "NO link shaping" in out, out
    for label in ("dense fp32 (no hook)", "fp16_compress_hook", "PowerSGD rank 4 (one bucket)",
                  "gradsparse DGC 0.1 % (steady state *)", "gradsparse DGC, warm-up stage 1 (25 %)"):
        assert label in out, label
    assert "steady state, DGC(0.001, warmup=None)" in out and "first 1,000 optimizer steps" in out
    assert "load average" in out and str(tmp_path / "demo.json") in out and str(tmp_path / "demo.png") in out

    results = json.loads((tmp_path / "demo.json").read_text())
    assert results["mode"] == "loopback" and "iproute2" in results["loopback_reason"]
    assert len(results["point"]["load_before"]) == 3 and len(results["point"]["load_after"]) == 3
    rows = {r["method"]: r for r in results["table"]}
    assert set(rows) == {"compute", "dense", "fp16", "powersgd4", "dgc0.1", "dgc0.1warm"}
    numel = results["parameters"]
    assert rows["dense"]["sent_bytes"] == 4 * numel and rows["fp16"]["sent_bytes"] == 2 * numel
    assert rows["powersgd4"]["sent_bytes"] < numel                 # P and Q (and the biases), fp32
    assert rows["dgc0.1"]["sent_bytes"] < rows["dense"]["sent_bytes"] / 20  # far below dense
    assert 0.25 <= rows["dgc0.1warm"]["density"] < 0.3              # the first warm-up stage (plus whole biases)
    assert rows["dense"]["speedup"] == 1.0 and all(r["step_ms"] > 0 for r in rows.values())
    ddp = results["point"]["ddp"]["mlp"]
    assert ddp["world_size"] == 2 and ddp["steps"] == 2 and ddp["warmup"] == 3
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"

