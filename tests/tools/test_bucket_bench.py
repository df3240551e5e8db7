"""benchmarks/bucket_bench.py runs and reports what it says (a harness check, no timing asserted)."""

import json

from benchmarks import bucket_bench


def test_bucket_bench_reports_passes_per_method(tmp_path):
    out = tmp_path / "bench.json"
    result = bucket_bench.main(["--steps", "1", "--methods", "dgc0.1", "dense-iteration", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["elements"] == 25_557_032 and result["buckets"] == 5
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dgc0.1", "dense-iteration"}
    for r in rows.values():
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["passes"] == r["median_ms"] / result["read_pass_ms"]
        assert 0 < r["blocking_ms"] <= r["max_ms"]
