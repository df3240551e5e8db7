"""tests/subprocesses.py's second run on a gloo timeout: only for that failure, only once, never silently."""

import sys

import pytest

from ..subprocesses import GLOO_TIMEOUT, launch_once_more_on_a_gloo_timeout

# fails with ``message`` while the file's count is below ``failures``, then succeeds
SCRIPT = """
import pathlib, sys
path, failures, message = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
runs = int(path.read_text()) if path.exists() else 0
path.write_text(str(runs + 1))
if runs < failures:
    sys.stderr.write(message)
    sys.exit(134)
"""


def run(tmp_path, failures, message):
    count, emptied = tmp_path / "runs", []
    cmd = [sys.executable, "-c", SCRIPT, str(count), str(failures), message]
    launch_once_more_on_a_gloo_timeout(cmd, 60, str(tmp_path), None, lambda: emptied.append(True))
    return int(count.read_text()), len(emptied)


def test_a_gloo_timeout_is_run_once_more_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="(?s)gloo timeout.*" + GLOO_TIMEOUT):
        assert run(tmp_path, 1, f"[3]: {GLOO_TIMEOUT} 120000ms for recv operation to complete") == (2, 1)


def test_a_second_gloo_timeout_fails(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(AssertionError, match=GLOO_TIMEOUT):
        run(tmp_path, 2, f"{GLOO_TIMEOUT} 120000ms")
    assert (tmp_path / "runs").read_text() == "2"


def test_any_other_failure_fails_at_once(tmp_path):
    with pytest.raises(AssertionError, match="Connection reset"):
        run(tmp_path, 1, "Read error: Connection reset by peer")
    assert (tmp_path / "runs").read_text() == "1"
