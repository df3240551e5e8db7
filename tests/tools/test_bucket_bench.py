"""benchmarks/bucket_bench.py runs and reports what it says (a harness check, no timing asserted)."""

import json

from benchmarks import bucket_bench


def test_bucket_bench_reports_passes_per_method(tmp_path):
    out = tmp_path / "bench.json"
    result = bucket_bench.main(["--steps", "1", "--methods", "dgc0.1", "dense-iteration", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["elements"] == 25_557_032 and result["buckets"] == 5
    assert result["health_pass_ms"] > 0 and result["fresh_read_pass_ms"] > 0
    # the unit measured before each method's run, its median used
    assert result["read_passes_measured"] == 2
    assert result["read_pass_range_ms"][0] <= result["read_pass_ms"] <= result["read_pass_range_ms"][1]
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


def test_the_unfused_and_eager_paths_give_the_same_bits_and_are_restored():
    """``*-unfused`` times the previous pair handling, ``*-eager`` the memory update applied when the reduction
    lands, ``*-separate`` the payload packed after the selection: the same reduced bucket and memory, bit for
    bit, and the fused ops and the deferral are back afterwards."""
    import torch

    from gradsparse import DGC, ops
    from gradsparse import memory as memory_module
    from gradsparse.comm import LocalCommunicator
    from gradsparse.reducer import Segment, SparseReducer

    fused = ops.pack_gathered, ops.index_zero_
    segments = [Segment("a", 0, 30_000), Segment("b", 30_000, 10), Segment("c", 30_010, 50_000)]
    grads = [torch.randn(80_010, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    results = []
    deferring = memory_module.ZERO_IN_PASS_FROM
    for name in ("dgc-warmup25", "dgc-warmup25-unfused", "dgc-warmup25-eager", "dgc-warmup25-separate"):
        compressor = bucket_bench.METHODS[name]()[0]
        assert isinstance(compressor, DGC) and compressor.packs_selection == (name in ("dgc-warmup25",
                                                                                      "dgc-warmup25-eager"))
        reducer = SparseReducer(compressor, LocalCommunicator())
        with bucket_bench._variant(name):
            assert (ops.pack_gathered is fused[0]) != name.endswith("-unfused")
            assert (memory_module.ZERO_IN_PASS_FROM == deferring) == (name in ("dgc-warmup25", "dgc-warmup25-separate"))
            flats = [reducer.reduce(g.clone(), segments, step).wait().clone() for step, g in enumerate(grads)]
        state = reducer.state_dict()["memory"]["state"]
        results.append((flats, {(p, n): t.clone() for p, named in state.items() for n, t in named.items()}))
    assert (ops.pack_gathered, ops.index_zero_) == fused and memory_module.ZERO_IN_PASS_FROM == deferring
    a_flats, a_state = results[0]
    assert all(not torch.equal(f, g) for f, g in zip(a_flats, grads))  # something was held back
    assert {("a", "velocity"), ("c", "velocity"), ("b", "momentum")} <= set(a_state)
    assert all(a_state[(p, "velocity")].count_nonzero() < a_state[(p, "velocity")].numel() for p in "ac")  # masked
    for b_flats, b_state in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(a_flats, b_flats))
        assert a_state.keys() == b_state.keys()
        assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)


def test_profile_lists_the_operators_of_the_steps():
    """``--profile``: the profiler's table holds the reducer's own ops (the fused ones: the payload and the
    positions' bitmap written by the selection, the memory update deferred into the compensation, read through
    the bitmap; on the ``*-listed`` path read through the list of positions; on the ``*-separate`` path the
    payload packed after the selection; on the ``*-eager`` path the update on its own; on the ``*-unfused`` path
    the ops they replace), not the clones made before each step."""
    from gradsparse.model_shapes import resnet50

    buckets = bucket_bench.buckets_of(resnet50())[:2]
    grads = bucket_bench.normal_gradients(buckets)
    fused = bucket_bench.profile_method("dgc-warmup25", buckets, grads, steps=1)
    assert "gradsparse::segmented_topk_select_pack" in fused and "gradsparse::dgc_mask_compensate" in fused
    assert "gradsparse::index_zero_" not in fused and "gradsparse::pack_gathered" not in fused
    assert "gradsparse::dgc_zero_compensate" not in fused
    listed = bucket_bench.profile_method("dgc-warmup25-listed", buckets, grads, steps=1)
    assert "gradsparse::dgc_zero_compensate" in listed and "gradsparse::dgc_mask_compensate" not in listed
    separate = bucket_bench.profile_method("dgc-warmup25-separate", buckets, grads, steps=1)
    assert "gradsparse::pack_gathered" in separate and "gradsparse::segmented_topk_select_pack" not in separate
    eager = bucket_bench.profile_method("dgc-warmup25-eager", buckets, grads, steps=1)
    assert "gradsparse::index_zero_" in eager and "gradsparse::dgc_zero_compensate" not in eager
    assert "gradsparse::dgc_mask_compensate" not in eager
    unfused = bucket_bench.profile_method("dgc-warmup25-unfused", buckets, grads, steps=1)
    assert "gradsparse::pack_gathered" not in unfused and "aten::index_fill_" in unfused
    assert "aten::clone" not in fused


def test_real_gradients_are_resnet50s_own_laid_out_in_the_buckets(tmp_path):
    """``--grads real``: each segment of each bucket holds that parameter's gradient from a real backward
    pass (checked against the model's own, recomputed), zeros and all, and the run records which."""
    import torch

    from benchmarks.bench_models import loss_fn, make_batch, make_model
    from gradsparse.model_shapes import resnet50

    buckets = bucket_bench.buckets_of(resnet50())
    grads = bucket_bench.real_gradients(buckets, seed=3)
    torch.manual_seed(3)
    model = make_model("resnet50")
    x, y = make_batch("resnet50", 2, torch.Generator().manual_seed(3))
    loss_fn("resnet50", model(x), y).backward()
    params = dict(model.named_parameters())
    for flat, (_, segments) in zip(grads, buckets):
        for s in segments:
            assert torch.equal(flat[s.offset:s.offset + s.numel], params[s.key].grad.reshape(-1)), s.key
    # the 3x3 convolutions of the last stage see a 1x1 input: gradient only at the kernel's centre
    centre_only = params["layer4.1.conv2.weight"].grad.reshape(512, 512, 9)
    assert centre_only[..., 4].count_nonzero() > 0 and centre_only[..., :4].count_nonzero() == 0
    result = bucket_bench.main(["--steps", "1", "--methods", "topk1", "--grads", "real", "--json", str(tmp_path / "r.json")])
    assert result["grads"] == "real" and result["rows"][0]["method"] == "topk1"
