"""The shared-memory files of gradsparse.comm.shared_memory in one process: allocated when created, and a file
that cannot be allocated is a typed error naming the fixes (not a SIGBUS at the first write)."""

import os
import resource

import pytest
import torch

from gradsparse.comm import shared_memory as shm
from gradsparse.errors import InvalidConfigError


def test_a_new_segment_is_allocated_and_removed_once_every_rank_mapped_it(tmp_path):
    path = str(tmp_path / "segment")
    seg = shm._Segment(path, 1 << 20, True, 0, 2)
    assert os.stat(path).st_blocks * 512 >= 1 << 20  # pages given now, not a sparse file
    seg.data.fill_(7)
    peer = shm._Segment(path, 1 << 20, False, 1, 2)  # the other rank maps it: the last flag, so the file goes
    assert not os.path.exists(path) and seg.remove_if_mapped()
    assert bool((peer.data == 7).all()) and peer.data.numel() == 1 << 20
    assert torch.equal(seg.mapped, torch.ones(2, dtype=torch.uint8))


def test_a_segment_that_does_not_fit_is_a_typed_error_naming_the_fixes(tmp_path):
    path = str(tmp_path / "segment")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))  # files may not grow past 64 kB (Python ignores
    try:                                                          # SIGXFSZ: the call fails with EFBIG)
        with pytest.raises(InvalidConfigError, match=r"--shm-size.*shared_memory=False"):
            shm._Segment(path, 1 << 20, True, 0, 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not os.path.exists(path)  # nothing half-made is left
