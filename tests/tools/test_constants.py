"""Constants written both in C++/CUDA and in Python are equal: the sources are read, not trusted.

Python cannot include a C++ header, so each value shared by the two sides lives in one C++
header (``csrc/select_params.h``: selection tuning; ``csrc/common.h``: the wire format) and one
Python module (``gradsparse/_reference.py``; ``gradsparse/payload.py``), and this test parses
the header and compares. It also checks that no other C++/CUDA source defines them again
(a private copy could drift unseen) and that no "keep in sync" comment is left standing in for
a check. Runs without the extension (it reads source text).
"""

import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

from gradsparse import _reference, payload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = sorted(p for ext in ("*.h", "*.cpp", "*.cuh", "*.cu")
                 for p in glob.glob(os.path.join(CSRC, "**", ext), recursive=True))


def _read(path):
    with open(path) as f:
        return f.read()


def _constexpr(text, name):
    """The value of ``constexpr <type> name = <literal>;`` in C++ source text."""
    found = re.findall(rf"constexpr\s+[\w:]+\s+{name}\s*=\s*([^;]+);", text)
    assert len(found) == 1, f"{name}: {len(found)} definitions"
    literal = found[0].split("//")[0].strip()
    return float(literal) if "." in literal else int(literal, 0)


SELECTION = [("kSampledMinNumel", "SAMPLED_MIN_NUMEL"), ("kMinSample", "MIN_SAMPLE"),
             ("kSampleAim", "SAMPLE_AIM"), ("kSampleAimExtra", "SAMPLE_AIM_EXTRA")]
WIRE = [("kMagic", payload.MAGIC), ("kHeaderInts", payload.HEADER_INTS)]


@pytest.mark.parametrize("cpp,py", SELECTION)
def test_selection_constants_match_the_reference(cpp, py):
    assert _constexpr(_read(os.path.join(CSRC, "select_params.h")), cpp) == getattr(_reference, py)


@pytest.mark.parametrize("cpp,value", WIRE)
def test_wire_constants_match_payload_py(cpp, value):
    assert _constexpr(_read(os.path.join(CSRC, "common.h")), cpp) == value


def test_wire_dtype_codes_match_payload_py():
    text = _read(os.path.join(CSRC, "common.h"))
    cases = dict(re.findall(r"case c10::k(\w+): return (\d+);", text))
    names = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double"}
    assert {names[d]: str(c) for d, c in payload.VALUE_DTYPES.items()} == cases


@pytest.mark.parametrize("name", [c for c, _ in SELECTION + WIRE])
def test_each_shared_constant_is_defined_once(name):
    defining = [os.path.relpath(p, ROOT) for p in SOURCES
                if re.search(rf"constexpr\s+[\w:]+\s+{name}\s*=", _read(p))]
    assert len(defining) == 1, defining


def test_no_keep_in_sync_comments():
    files = SOURCES + sorted(glob.glob(os.path.join(ROOT, "gradsparse", "**", "*.py"), recursive=True))
    stale = [os.path.relpath(p, ROOT) for p in files if "keep in sync" in _read(p).lower()]
    assert not stale, f"replace the comment by a test here: {stale}"


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (the extension's build needs one)")
def test_sample_positions_match_the_kernels(tmp_path):
    # csrc/select_params.h::sample_position (what the CPU and CUDA kernels sample) compiled and run,
    # against the reference's torch version of the same hash, over strides, lengths and seeds
    cases = [(10, 3, 7), (2_359_296, 99, 0), (2_359_296, 99, 2**31 - 2), (16_384, 16, 123_456_789), (1025, 1, 5),
             (25_000_000, 2_500, 977)]
    program = tmp_path / "sample.cpp"
    program.write_text('#include <cstdio>\n#include <cstdlib>\n#include "select_params.h"\n'
                       "int main(int argc, char** argv) {\n"
                       "  const long n = atol(argv[1]), stride = atol(argv[2]); const unsigned seed = strtoul(argv[3], 0, 10);\n"
                       "  for (long j = 0; j < gradsparse::sample_strata(n, stride); ++j)\n"
                       '    printf("%ld\\n", (long)gradsparse::sample_position(j, stride, n, seed));\n}\n')
    subprocess.run(["g++", "-std=c++17", f"-I{CSRC}", str(program), "-o", str(tmp_path / "sample")], check=True)
    for n, stride, seed in cases:
        out = subprocess.run([str(tmp_path / "sample"), str(n), str(stride), str(seed)], check=True,
                             capture_output=True, text=True).stdout.split()
        assert [int(v) for v in out] == _reference.sample_positions(n, stride, seed).tolist(), (n, stride, seed)
