"""Wire format: pack/parse round trips, validation before any write, fuzzing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsparse import _reference, ops
from gradsparse import payload as payload_format
from gradsparse.errors import PayloadError
from gradsparse.payload import HEADER_BYTES, MAGIC, PayloadLayout, parse

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count,n_dense", [(0, 0), (1, 0), (3, 5), (7, 1)])
def test_pack_parse_round_trip(dtype, count, n_dense):
    numel = 100
    gen = torch.Generator().manual_seed(count)
    idx = torch.randperm(numel - 10, generator=gen)[:count].sort().values
    values = torch.randn(count, generator=gen).to(dtype)
    dense = torch.randn(n_dense, generator=gen).to(dtype)
    payload = ops.pack(idx, values, dense, numel, dtype)
    assert payload.numel() == PayloadLayout(count, n_dense, dtype).nbytes
    assert payload.numel() % 8 == 0
    flags, got_idx, got_values, got_dense = parse(payload, numel, dtype, n_dense)
    assert flags == 0
    assert got_idx.tolist() == idx.tolist()
    assert torch.equal(got_values, values) and torch.equal(got_dense, dense)


def test_unpack_add_sums_ranks_in_order_with_dense_section():
    numel, dense_index = 10, torch.tensor([8, 9])
    p0 = ops.pack(torch.tensor([1, 3]), torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5]), numel, torch.float32)
    p1 = ops.pack(torch.tensor([3, 4]), torch.tensor([10.0, 20.0]), torch.tensor([1.0, 2.0]), numel, torch.float32)
    out = torch.zeros(numel)
    assert ops.unpack_add([p0, p1], out, torch.float32, dense_index) == 0
    assert out.tolist() == [0, 1, 0, 12, 20, 0, 0, 0, 1.5, 2.5]
    out.fill_(7.0)
    ops.unpack_add([p0, p1], out, torch.float32, dense_index, alpha=0.5, overwrite=True)
    assert out.tolist() == [0, 0.5, 0, 6, 10, 0, 0, 0, 0.75, 1.25]


def _valid(numel=50):
    return ops.pack(torch.tensor([2, 5, 9]), torch.tensor([1.0, 2.0, 3.0]), torch.empty(0), numel, torch.float32)


def _with_ints(payload, position, value):
    bad = payload.clone()
    bad[position * 4:(position + 1) * 4].view(torch.int32).fill_(value)
    return bad


BAD = {
    "magic": lambda p: _with_ints(p, 0, 123),
    "count_too_big": lambda p: _with_ints(p, 2, 1000),
    "negative_count": lambda p: _with_ints(p, 2, -1),
    "wrong_numel": lambda p: _with_ints(p, 4, 49),
    "wrong_dtype": lambda p: _with_ints(p, 5, 2),
    "wrong_dense": lambda p: _with_ints(p, 3, 4),
    "index_out_of_range": lambda p: _with_ints(p, 8 + 2, 50),
    "negative_index": lambda p: _with_ints(p, 8, -1),
    "duplicate_index": lambda p: _with_ints(p, 8 + 1, 2),
    "truncated": lambda p: p[:HEADER_BYTES + 8],
    "short_header": lambda p: p[:10],
    "wrong_tensor_dtype": lambda p: p.float(),
}


@pytest.mark.parametrize("unpack_add", [ops.unpack_add, _reference.unpack_add], ids=["ops", "reference"])
@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_payload_is_rejected_before_any_write(case, overwrite, unpack_add):
    out = torch.arange(50.0)
    before = out.clone()
    good = _valid()
    with pytest.raises(PayloadError):
        unpack_add([good, BAD[case](good)], out, torch.float32, overwrite=overwrite)
    assert torch.equal(out, before)


@pytest.mark.parametrize("unpack_add", [ops.unpack_add, _reference.unpack_add], ids=["ops", "reference"])
@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=200),
       magic=st.sampled_from([MAGIC, 0]), count=st.integers(-3, 40), n_dense=st.sampled_from([0, 0, 1]),
       numel_field=st.sampled_from([16, 16, 15]), code=st.sampled_from([1, 1, 2, 9]))
def test_fuzzed_payloads_never_write_out_of_bounds_or_change_on_error(unpack_add, data, magic, count, n_dense,
                                                                      numel_field, code):
    numel = 16
    header = [magic, 0, count, n_dense, numel_field, code, 0, 0]
    payload = torch.cat([torch.tensor(header, dtype=torch.int32).view(torch.uint8),
                         torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)])
    guard = torch.zeros(numel + 32)
    out = guard[16:16 + numel]
    try:
        unpack_add([_valid(numel), payload], out, torch.float32)
    except PayloadError:
        assert torch.count_nonzero(guard) == 0
    assert torch.count_nonzero(guard[:16]) == 0 and torch.count_nonzero(guard[16 + numel:]) == 0


def test_payload_entry_points_pass_every_argument_to_the_kernels():
    """gradsparse.payload is the wire format's one face: its pack/unpack_add give the reference's bytes and sums."""
    numel, dense_index = 12, torch.tensor([10, 11])
    idx, values, dense = torch.tensor([0, 4, 7]), torch.tensor([1.5, -2.0, 3.0]), torch.tensor([0.25, -0.5])
    for value_dtype in DTYPES:
        got = payload_format.pack(idx, values, dense, numel, value_dtype, flags=1)
        assert torch.equal(got, _reference.pack(idx, values, dense, numel, value_dtype, 1))
        for alpha, overwrite in [(1.0, False), (0.25, True)]:
            a, b = torch.full((numel,), 3.0), torch.full((numel,), 3.0)
            flags = payload_format.unpack_add([got, got], a, value_dtype, dense_index, alpha=alpha, overwrite=overwrite)
            assert flags == _reference.unpack_add([got, got], b, value_dtype, dense_index, alpha, overwrite) == 1
            assert torch.equal(a, b), (value_dtype, alpha, overwrite)


def test_payload_buffers_never_hand_out_one_in_flight_and_replace_the_oversized():
    """A buffer taken and not given back is never handed out again; one given back is reused while it fits
    and is less than twice the size asked for (a warm-up's payload is not kept through the steady state)."""
    from gradsparse.payload import PayloadBuffers

    buffers, cpu = PayloadBuffers(), torch.device("cpu")
    a = buffers.take("b", 1 << 16, cpu)
    b = buffers.take("b", 1 << 16, cpu)  # a is in flight
    assert a.data_ptr() != b.data_ptr() and a.numel() == b.numel() == 1 << 16
    buffers.give("b", a)
    c = buffers.take("b", 40_000, cpu)
    assert c.data_ptr() == a.data_ptr() and c.numel() == 40_000 and c.is_contiguous()
    buffers.give("b", c)
    assert buffers.take("b", 50_000, cpu).data_ptr() != a.data_ptr()  # larger than the kept 40,000 bytes
    buffers.give("b", a)
    assert buffers.take("b", 1_000, cpu).data_ptr() != a.data_ptr()  # 64 KiB kept for 1,000: replaced
    assert buffers.take("other", 1 << 16, cpu).data_ptr() != a.data_ptr()  # kept per key
