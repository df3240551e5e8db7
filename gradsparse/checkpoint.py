"""Each rank's gradsparse state through ``torch.distributed.checkpoint`` (DCP).

DCP writes one copy of every key for the whole job: keys that several ranks hold
are deduplicated, as a replicated model's are. Residuals and DGC momentum differ
from rank to rank, so each rank's state goes under keys of its own,
``gradsparse/rank{r}/...``, and only as tensors (a JSON header in a uint8 tensor,
then the memory buffers): nothing of gradsparse's is unpickled on load.

Example (every rank; ``state`` is the hook's :class:`~gradsparse.ddp.GradSparseState`)::

    import torch.distributed.checkpoint as dcp
    from gradsparse import checkpoint

    dcp.save({"model": model.state_dict(), **checkpoint.dcp_state_dict(state)}, checkpoint_id=path)
    # later, in a fresh job of the same world size:
    sd = {"model": model.state_dict(), **checkpoint.dcp_state_dict(state, checkpoint_id=path)}
    dcp.load(sd, checkpoint_id=path)
    checkpoint.load_dcp_state_dict(state, sd)
"""

from __future__ import annotations

import json
import re

import torch
import torch.distributed as dist

from .errors import StateMismatchError

PREFIX = "gradsparse/rank"
_TENSOR = "__tensor__"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _split(obj, tensors: list):
    """``obj`` with every tensor replaced by a placeholder naming its position in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {_TENSOR: len(tensors) - 1, "device": obj.device.type}
    if isinstance(obj, dict):
        return {k: _split(v, tensors) for k, v in obj.items()}
    return obj


def _join(obj, tensors: dict[str, torch.Tensor]):
    """Inverse of :func:`_split`: placeholders back to tensors, on the device type they were saved from."""
    if isinstance(obj, dict) and _TENSOR in obj:
        device = obj["device"]
        if device == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return tensors[str(obj[_TENSOR])].to(device)
    if isinstance(obj, dict):
        return {k: _join(v, tensors) for k, v in obj.items()}
    return obj


def dcp_state_dict(state, checkpoint_id=None) -> dict[str, torch.Tensor]:
    """This rank's state as tensors under keys of its own, for ``dcp.save`` or ``dcp.load``.

    Without ``checkpoint_id``: the live state, to save. With it (a folder written by
    ``dcp.save``, or a DCP ``StorageReader``): empty tensors shaped like what that
    checkpoint holds for this rank, for ``dcp.load`` to fill (then
    call :func:`load_dcp_state_dict`). A checkpoint written by a job of another world
    size is refused here with :class:`StateMismatchError`, before anything is read.

    Example::

        dcp.save({"model": model.state_dict(), **dcp_state_dict(state)}, checkpoint_id="ckpt/step100")
    """
    prefix = f"{PREFIX}{_rank()}/"
    if checkpoint_id is None:
        tensors: list[torch.Tensor] = []
        header = json.dumps(_split(state.state_dict(), tensors)).encode()
        return {f"{prefix}header": torch.frombuffer(bytearray(header), dtype=torch.uint8),
                **{f"{prefix}{i}": t for i, t in enumerate(tensors)}}
    from torch.distributed.checkpoint import FileSystemReader

    reader = checkpoint_id if hasattr(checkpoint_id, "read_metadata") else FileSystemReader(checkpoint_id)
    metadata = reader.read_metadata().state_dict_metadata
    _check_world(metadata, checkpoint_id)
    return {key: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.items() if key.startswith(prefix)}


def _check_world(metadata: dict, checkpoint_id) -> None:
    """Refuse a checkpoint whose gradsparse state was written by a job of another world size."""
    ranks = {int(m.group(1)) for key in metadata if (m := re.fullmatch(rf"{PREFIX}(\d+)/header", key))}
    if not ranks:
        raise StateMismatchError(f"checkpoint {checkpoint_id!r} holds no gradsparse state")
    if ranks != set(range(_world())):
        raise StateMismatchError(f"checkpoint was written with world size {len(ranks)}, this job has {_world()}; "
                                 "per-rank residuals cannot be redistributed")


def load_dcp_state_dict(state, state_dict: dict) -> None:
    """Restore this rank's state from ``state_dict`` once ``dcp.load`` has filled it.

    Refuses (:class:`StateMismatchError`, state unchanged) what
    :meth:`GradSparseState.load_state_dict <gradsparse.ddp.GradSparseState.load_state_dict>` refuses.

    Example::

        sd = dcp_state_dict(state, checkpoint_id="ckpt/step100")
        dcp.load(sd, checkpoint_id="ckpt/step100")
        load_dcp_state_dict(state, sd)
    """
    prefix = f"{PREFIX}{_rank()}/"
    if f"{prefix}header" not in state_dict:
        raise StateMismatchError(f"no gradsparse state of rank {_rank()} in this state dict "
                                 f"(build it with dcp_state_dict(state, checkpoint_id=...))")
    header = json.loads(state_dict[f"{prefix}header"].numpy().tobytes().decode())
    tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    state.load_state_dict(_join(header, tensors))


__all__ = ["dcp_state_dict", "load_dcp_state_dict"]
