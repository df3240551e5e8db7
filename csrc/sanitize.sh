#!/usr/bin/env bash
# Build the CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer in a scratch copy of the
# repository and run the kernel, payload and selection tests (hypothesis fuzzing of unpack_add with
# malformed payloads included) against that build. Any out-of-bounds access or undefined behaviour
# aborts the run with a sanitizer report.
#
#   csrc/sanitize.sh                 # uses .venv/bin/python ($PYTHON overrides); extra arguments go to pytest
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM
cp -r "$root"/setup.py "$root"/gradsparse "$root"/csrc "$root"/tests "$work"/
rm -f "$work"/gradsparse/_C*.so
cd "$work"
echo "building the sanitized extension in $work ..." >&2
CC=gcc CXX=g++ GRADSPARSE_SANITIZE=address,undefined MAX_JOBS=2 \
    "$py" setup.py -q build_ext --inplace >build.log 2>&1 || { tail -30 build.log >&2; exit 1; }
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
PYTHONPATH="$work" "$py" -c "import gradsparse.ops as o; assert o.BACKEND == 'extension', o.BACKEND; \
import gradsparse, sys; assert gradsparse.__file__.startswith(sys.argv[1]), gradsparse.__file__" "$work"
PYTHONPATH="$work" "$py" -m pytest -q -p no:cacheprovider tests/unit/test_payload.py tests/unit/test_kernels.py \
    tests/unit/test_selection.py tests/unit/test_kernels_candidates.py "$@"
