"""gradsparse.split's pieces on one process: region bounds, the region messages both ways and their refusals,
and the reducer refusing ``transport="split"`` over a communicator without an alltoall. The transport itself
runs on real process groups: tests/multiprocess/test_split.py (gloo), test_mpi.py, test_horovod.py."""

import pytest
import torch

from gradsparse import TopK
from gradsparse.comm.base import Communicator, completed_future
from gradsparse.errors import InvalidConfigError, PayloadError
from gradsparse.reducer import SparseReducer
from gradsparse.split import HEADER_BYTES, PAIRS, VALUES, decode_region, encode_region, region_bounds


@pytest.mark.parametrize("numel,world", [(10, 3), (7, 7), (1_000_003, 4), (5, 1)])
def test_region_bounds_cover_the_bucket_in_near_equal_regions(numel, world):
    b = region_bounds(numel, world)
    assert b[0] == 0 and b[-1] == numel and len(b) == world + 1
    sizes = [hi - lo for lo, hi in zip(b, b[1:])]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


@pytest.mark.parametrize("fill", [0.0, 0.01, 0.3, 0.6, 1.0])
def test_a_region_comes_back_bit_for_bit_as_the_smaller_encoding(fill):
    gen = torch.Generator().manual_seed(3)
    region = torch.randn(5000, generator=gen)
    region[torch.rand(5000, generator=gen) >= fill] = 0.0
    msg = encode_region(region, flags=1)
    kind = int(msg[:8].view(torch.int64))
    nonzero = int(region.count_nonzero())
    assert kind == (PAIRS if 8 * nonzero + 64 < 4 * 5000 else VALUES), (fill, kind)
    assert msg.numel() <= HEADER_BYTES + 4 * 5000 + 8
    out = torch.full_like(region, 7.0)
    assert decode_region(msg, out) == 1
    assert torch.equal(out, region)


def test_a_bound_on_the_pairs_skips_counting_only_where_values_are_smaller():
    region = torch.zeros(1000)
    region[::100] = 1.0
    # an upper bound above what pairs could beat sends values without counting; a low one counts and sends pairs
    assert int(encode_region(region, 0, upper=1000)[:8].view(torch.int64)) == VALUES
    assert int(encode_region(region, 0, upper=10)[:8].view(torch.int64)) == PAIRS


def test_malformed_region_messages_are_refused():
    region = torch.arange(6, dtype=torch.float32)
    out = torch.zeros(6)
    with pytest.raises(PayloadError, match="fewer than"):
        decode_region(torch.zeros(4, dtype=torch.uint8), out)
    values = encode_region(region, 0)
    with pytest.raises(PayloadError, match="bytes of values"):
        decode_region(values, torch.zeros(5))
    bad = values.clone()
    bad[:8].view(torch.int64).fill_(9)
    with pytest.raises(PayloadError, match="kind 9"):
        decode_region(bad, out)
    pairs = encode_region(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0]), 0)
    with pytest.raises(PayloadError):  # pairs for a region of 12 elements into one of 6
        decode_region(pairs, out)
    assert torch.equal(out, torch.zeros(6))  # nothing written by a refused message


class _NoAlltoall(Communicator):
    """A one-rank communicator that moves payloads but has no alltoall (as a user's own may)."""

    rank, world_size = 0, 1

    def allgather(self, payload, sizes=None):
        return completed_future([payload])

    def allreduce_sum(self, tensor):
        return completed_future(tensor)


def test_split_over_a_communicator_without_alltoall_is_refused_up_front():
    with pytest.raises(InvalidConfigError, match="carries_alltoall"):
        SparseReducer(TopK(0.25), _NoAlltoall(), transport="split")
    with pytest.raises(NotImplementedError, match="transport='allgather'"):
        _NoAlltoall().alltoall([torch.zeros(1, dtype=torch.uint8)], [[1]])
    SparseReducer(TopK(0.25), _NoAlltoall())  # the other transports do not need it
