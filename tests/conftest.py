"""The suite's layers and markers; seeds for every test, and the seed in the report of a failing one.

Layers (folders, each test marked with its folder's name; docs/testing.md):

- ``tests/unit/``: the library on one process (selection, kernels, compressors,
  memories, the reducer, the wire format, validation, the Communicator contract).
  ``make test-fast`` runs it with ``-m "not multiprocess"``.
- ``tests/multiprocess/``: real process groups (gloo on loopback, ``horovodrun``,
  ``mpirun``, Lightning and Accelerate launchers): the hook, the adapters, checkpoints,
  faults, long runs.
- ``tests/tools/``: the repository's tools and text: the README's and docs' blocks,
  the demo, the cluster and convergence harnesses, and checks of the sources (CUDA
  compiles, nothing unpickled).

``multiprocess`` also marks the few unit tests that need a short world of 2-3 ranks.
Helpers shared by the layers (``distributed.py``, ``models.py``, ``oracles.py``,
``tolerances.py``, the ``*_worker.py`` scripts launched by module name) stay here.

Each test starts with torch's, Python's and numpy's global generators seeded from
its own node id (so a test's draws do not depend on which tests ran before it),
mixed with ``GRADSPARSE_TEST_SEED`` (default 0). Tests that draw randomness should
still use an explicit ``torch.Generator().manual_seed(...)`` whose seed is in the
test's parameters or name; the global seeding catches what slips through.

A failing test's report gets a section ``seed`` with the command that reproduces
it: ``GRADSPARSE_TEST_SEED=<s> python -m pytest '<node id>'``. Running the suite
with another ``GRADSPARSE_TEST_SEED`` draws other inputs wherever a test uses
:func:`test_seed`.
"""

from __future__ import annotations

import os
import pathlib
import random
import zlib

import numpy as np
import pytest
import torch

BASE_SEED = int(os.environ.get("GRADSPARSE_TEST_SEED", "0"))
LAYERS = {
    "unit": "the library on one process (tests/unit/)",
    "multiprocess": "starts a world of processes: tests/multiprocess/, and a few short world-2/3 unit tests",
    "tools": "the README's and docs' blocks, the demo, launch and benchmark harnesses, source checks (tests/tools/)",
}
HERE = pathlib.Path(__file__).resolve().parent


def pytest_configure(config):
    for name, what in LAYERS.items():
        config.addinivalue_line("markers", f"{name}: {what}")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its layer, the folder it lives in."""
    for item in items:
        folder = pathlib.Path(item.path).resolve().parent
        if folder.parent == HERE and folder.name in LAYERS:
            item.add_marker(folder.name)


def test_seed(nodeid: str) -> int:
    """The seed of the test ``nodeid`` under the current ``GRADSPARSE_TEST_SEED``."""
    return (zlib.crc32(nodeid.encode()) + 1_000_003 * BASE_SEED) % (2**31)


test_seed.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def _seeded(request):
    seed = test_seed(request.node.nodeid)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    request.node.gradsparse_seed = seed
    yield seed


@pytest.fixture
def seed(_seeded) -> int:
    """This test's seed (for tests that build their own generators from it)."""
    return _seeded


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and hasattr(item, "gradsparse_seed"):
        report.sections.append(("seed", f"global generators seeded with {item.gradsparse_seed}; reproduce with "
                                        f"GRADSPARSE_TEST_SEED={BASE_SEED} python -m pytest '{item.nodeid}'"))
