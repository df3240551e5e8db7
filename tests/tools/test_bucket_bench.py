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


def test_rounds_alternate_an_a_b_of_the_selection_candidates(tmp_path):
    # the B side really turns the candidates off, the A side keeps them
    assert bucket_bench.METHODS["dgc0.1"]()[0].selects_from_candidates
    assert not bucket_bench.METHODS["dgc0.1-nocandidates"]()[0].selects_from_candidates
    result = bucket_bench.main(["--steps", "1", "--rounds", "2", "--methods", "dgc0.1", "dgc0.1-nocandidates",
                                "--json", str(tmp_path / "ab.json")])
    assert result["rounds"] == 2
    for r in result["rows"]:
        assert len(r["round_medians_ms"]) == 2  # one median per round, the row's median over both rounds' steps
        assert r["min_ms"] <= min(r["round_medians_ms"]) <= max(r["round_medians_ms"]) <= r["max_ms"]
