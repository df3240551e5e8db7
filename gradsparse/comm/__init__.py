"""Communicators: how payloads move between ranks.

``TorchDistCommunicator`` is imported lazily-safe (torch.distributed is part of torch);
MPI and Horovod communicators live in their own modules and import their
dependency only when used.
"""

from .base import Communicator, LocalCommunicator, completed_future
from .torch_dist import TorchDistCommunicator

__all__ = ["Communicator", "LocalCommunicator", "TorchDistCommunicator", "completed_future"]
