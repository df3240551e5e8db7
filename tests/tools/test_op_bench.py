"""benchmarks/op_bench.py runs and reports what it says (a harness check, no timing asserted)."""

import json

from benchmarks import op_bench


def test_op_bench_times_every_op_it_lists(tmp_path):
    out = tmp_path / "ops.json"
    result = op_bench.main(["--densities", "0.001", "--worlds", "1,2", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["op"] for r in result["rows"]] == ["sum", "absmax", "compensate", "unpack 0.001 x1", "unpack 0.001 x2",
                                                 "select 0.001", "pack 0.001", "zero 0.001", "zero, compensate 0.001",
                                                 "zero_compensate 0.001", "mask_compensate 0.001"]
    assert result["elements"] == 25_557_032
    for r in result["rows"]:
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]


def test_op_bench_times_only_the_rows_asked_for():
    result = op_bench.main(["--densities", "0.001,0.01", "--worlds", "1", "--repeats", "1", "--json", "",
                            "--ops", "select", "sum"])
    assert [r["op"] for r in result["rows"]] == ["sum", "select 0.001", "select 0.01"]
