"""Ending a torchrun worker of the benchmarks without interpreter teardown.

torch 2.13 + gloo sometimes aborts in interpreter teardown after all work is done
(docs/ddp.md, "Shutting down"), which would turn a finished run's exit code into -6.

Example::

    from benchmarks.teardown import exit_without_teardown
    dist.barrier()
    exit_without_teardown()  # destroys the process group, flushes logs and streams, os._exit(0)
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import torch.distributed as dist


def exit_without_teardown(code: int = 0) -> NoReturn:
    """Destroy the process group (if any), flush logging and the streams, and exit with ``code``."""
    if dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
