"""The Communicator contract's defaults (gradsparse/comm/base.py) on one process.

A communicator whose futures resolve only in ``complete(tag)`` (as Horovod's do) gets
the base class's blocking operations (exchange_sizes, allgather_ints, broadcast_ints)
working without overriding them; ``tagged`` nests and restores; where nothing needs
completing, ``complete`` and ``in_flight`` are no-ops.
"""

import threading

import pytest
import torch

from gradsparse.comm import Communicator, LocalCommunicator, completed_future
from gradsparse.errors import PayloadError, PayloadTypeError


class Deferred(Communicator):
    """World size 1, but every future resolves only when ``complete`` is called with its tag."""

    rank, world_size, needs_complete = 0, 1, True

    def __init__(self):
        self.pending, self.completed = {}, []

    def _start(self, value):
        fut = torch.futures.Future()
        self.pending[self._tag] = (fut, value)
        # a default that forgot complete() would wait forever: fail it after a while instead
        timer = threading.Timer(20, lambda: fut.done() or fut.set_exception(TimeoutError("never completed")))
        timer.daemon = True
        timer.start()
        return fut

    def allgather(self, payload, sizes=None):
        self._sizes(payload, sizes)
        return self._start([payload.clone()])

    def allreduce_sum(self, tensor):
        return self._start(tensor)

    def complete(self, tag):
        fut, value = self.pending.pop(tag)
        self.completed.append(tag)
        fut.set_result(value)

    def in_flight(self):
        return list(self.pending)


def test_blocking_defaults_complete_what_they_start_under_the_current_tag():
    comm = Deferred()
    with comm.tagged("bucket3"):
        assert comm.exchange_sizes(40, torch.device("cpu")) == [40]
        assert comm.allgather_ints([-1, 2**40], torch.device("cpu")) == [[-1, 2**40]]
        assert comm.broadcast_ints([7, 8], torch.device("cpu")) == [7, 8]
    assert comm.completed == ["bucket3"] * 3 and comm.in_flight() == []


def test_a_deferred_future_waits_for_complete_of_its_own_tag():
    comm = Deferred()
    with comm.tagged("a"):
        fa = comm.allgather(torch.arange(4, dtype=torch.uint8))
    with comm.tagged("b"):
        fb = comm.allreduce_sum(torch.ones(3))
    assert comm.in_flight() == ["a", "b"] and not fa.done() and not fb.done()
    comm.complete("b")
    assert fb.done() and not fa.done()
    comm.complete("a")
    assert [t.tolist() for t in fa.wait()] == [[0, 1, 2, 3]]


def test_tagged_nests_and_restores_also_on_error():
    comm = LocalCommunicator()
    default = comm._tag
    with comm.tagged("outer"):
        with pytest.raises(RuntimeError, match="inside"):
            with comm.tagged("inner"):
                assert comm._tag == "inner"
                raise RuntimeError("inside")
        assert comm._tag == "outer"
    assert comm._tag == default


def test_where_futures_resolve_on_their_own_complete_is_a_no_op():
    comm = LocalCommunicator()
    assert comm.needs_complete is False
    with comm.tagged("w"):
        fut = comm.allgather(torch.arange(3, dtype=torch.uint8))
    assert fut.done() and comm.in_flight() == []
    comm.complete("w")
    comm.complete("never started")  # nothing to drive: accepted
    assert [t.tolist() for t in fut.wait()] == [[0, 1, 2]]
    assert comm.broadcast_ints([5], torch.device("cpu")) == [5]
    assert completed_future(3).wait() == 3


@pytest.mark.parametrize("payload,sizes,error", [
    (torch.zeros(4), None, PayloadTypeError),
    (torch.zeros((2, 2), dtype=torch.uint8), None, PayloadTypeError),
    (torch.zeros(4, dtype=torch.uint8), [5], PayloadError),
    (torch.zeros(4, dtype=torch.uint8), [4, 4], PayloadError),
], ids=["float", "2d", "not_announced_size", "sizes_of_another_world"])
def test_payloads_are_checked_before_anything_is_sent(payload, sizes, error):
    comm = Deferred()
    with pytest.raises(error, match="uint8|exchange_sizes"):
        comm.allgather(payload, sizes)
    assert comm.in_flight() == []
    if error is PayloadTypeError:  # catchable as the TypeError raised before
        assert issubclass(error, TypeError) and issubclass(error, ValueError)
