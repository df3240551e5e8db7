"""The CUDA sources compile with nvcc, so they cannot rot unseen on machines without a GPU.

The CPU torch wheel ships the ATen and c10/cuda headers but not c10's generated
cuda_cmake_macros.h; -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE is PyTorch's own switch to
skip it (it only defines export macros). Objects are compiled, not linked or run:
running the CUDA kernels needs a GPU (tests/unit/test_kernels.py runs them there).
"""

import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils.cpp_extension import include_paths

from ..docblocks import ROOT

SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_there_are_cuda_sources_for_every_op():
    # pack, pack_gathered, index_zero_, segmented_topk_select_pack and dgc_mask_compensate are device-neutral
    # (csrc/pack.cpp, csrc/index_zero.cpp, csrc/bitmap.cpp; the last two have their own CPU kernels)
    registered = set()
    for path in SOURCES:
        with open(path) as f:
            registered |= set(__import__("re").findall(r'm\.impl\("(\w+)"', f.read()))
    assert registered == {"threshold_select", "topk_select", "segmented_topk_select", "unpack_add", "dgc_compensate",
                          "dgc_compensate_into", "residual_compensate_into", "absmax", "dgc_compensate_candidates",
                          "residual_compensate_candidates", "segmented_topk_select_candidates",
                          "dgc_zero_compensate"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
def test_cuda_sources_compile(tmp_path):
    flags = ["-c", "-std=c++17", "-O1", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{sysconfig.get_paths()['include']}",
             *[f"-I{p}" for p in include_paths()], "-w"]
    procs = {src: subprocess.Popen(["nvcc", *flags, src, "-o", str(tmp_path / (os.path.basename(src) + ".o"))],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for src in SOURCES}
    failures = {}
    for src, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failures[os.path.basename(src)] = out[-3000:]
    assert not failures, failures
