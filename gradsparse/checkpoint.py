"""Every rank's gradsparse state in a checkpoint: one file from rank 0, or torch.distributed.checkpoint.

**One file from rank 0** (:func:`gather_state_dicts`, :func:`own_state_dict`, :class:`AllRanksState`).

gradsparse's state is per rank (each rank keeps its own residuals and momentum),
but PyTorch Lightning and Accelerate write one checkpoint from rank 0.
:func:`gather_state_dicts` collects each rank's ``state_dict()`` on rank 0 with two
collectives (sizes, then one padded byte payload per rank); :func:`own_state_dict`
gives each rank its own back when the file is loaded. Only tensor bytes and a JSON
skeleton travel: nothing a peer sends is unpickled, and the result is plain
tensors and numbers (``torch.load(weights_only=True)`` loads it).

The saved form is ``{"world_size": W, "ranks": [state_dict_of_rank_0, ..., rank W-1]}``
with every tensor on the CPU.

Example (on every rank)::

    saved = gradsparse.checkpoint.gather_state_dicts(state.state_dict())  # None except on rank 0
    if saved is not None:
        torch.save({"gradsparse": saved}, "ckpt.pt")
    ...
    ckpt = torch.load("ckpt.pt", weights_only=True)
    state.load_state_dict(gradsparse.checkpoint.own_state_dict(ckpt["gradsparse"], device=device))

**torch.distributed.checkpoint (DCP)** (:func:`dcp_state_dict`, :func:`load_dcp_state_dict`).

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
import math
import re

import torch
import torch.distributed as dist

from .errors import PayloadError, StateMismatchError

_HEADER = 8  # bytes of the little-endian skeleton length that starts each payload


def _encode(obj, tensors: list[torch.Tensor]):
    """A JSON-able skeleton of ``obj``; its tensors are appended to ``tensors`` (CPU, contiguous)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj.detach().cpu().contiguous())
        return {"t": [str(obj.dtype).removeprefix("torch."), list(obj.shape)]}
    if isinstance(obj, dict):
        return {"d": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l" if isinstance(obj, list) else "u": [_encode(x, tensors) for x in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"v": obj}
    raise TypeError(f"a gradsparse state_dict holds only tensors, numbers, strings and containers, "
                    f"not {type(obj).__name__}")


def _dtype(name) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise PayloadError(f"gathered state names an unknown dtype {name!r}")
    return dtype


class _Reader:
    """Rebuilds one rank's state_dict from its skeleton and tensor bytes, checking every bound."""

    def __init__(self, data: torch.Tensor, offset: int, rank: int):
        self.data, self.offset, self.rank = data, offset, rank

    def tensor(self, spec) -> torch.Tensor:
        name, shape = spec
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise PayloadError(f"rank {self.rank} sent a malformed tensor shape {shape!r}")
        dtype = _dtype(name)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        end = self.offset + nbytes
        if end > self.data.numel():
            raise PayloadError(f"rank {self.rank} sent fewer tensor bytes than its skeleton describes")
        out = self.data[self.offset:end].clone().view(dtype).reshape(shape)
        self.offset = end
        return out

    def decode(self, node):
        if not (isinstance(node, dict) and len(node) == 1):
            raise PayloadError(f"rank {self.rank} sent a malformed state skeleton")
        (kind, value), = node.items()
        if kind == "t":
            return self.tensor(value)
        if kind == "v" and (value is None or isinstance(value, (bool, int, float, str))):
            return value
        if kind in ("l", "u") and isinstance(value, list):
            items = [self.decode(x) for x in value]
            return items if kind == "l" else tuple(items)
        if kind == "d" and isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
            return {self.decode(k): self.decode(v) for k, v in value}
        raise PayloadError(f"rank {self.rank} sent a malformed state skeleton (node {kind!r})")


def _pack(state_dict: dict) -> torch.Tensor:
    tensors: list[torch.Tensor] = []
    skeleton = json.dumps(_encode(state_dict, tensors)).encode()
    parts = [torch.frombuffer(bytearray(len(skeleton).to_bytes(_HEADER, "little") + skeleton), dtype=torch.uint8)]
    parts += [t.reshape(-1).view(torch.uint8) for t in tensors]
    return torch.cat(parts)


def _unpack(data: torch.Tensor, rank: int) -> dict:
    if data.numel() < _HEADER:
        raise PayloadError(f"rank {rank} sent a truncated state payload")
    length = int.from_bytes(bytes(data[:_HEADER].tolist()), "little")
    if length > data.numel() - _HEADER:
        raise PayloadError(f"rank {rank} sent a state skeleton longer than its payload")
    try:
        skeleton = json.loads(data[_HEADER:_HEADER + length].numpy().tobytes().decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise PayloadError(f"rank {rank} sent an unreadable state skeleton: {err}") from None
    reader = _Reader(data, _HEADER + length, rank)
    out = reader.decode(skeleton)
    if reader.offset != data.numel():
        raise PayloadError(f"rank {rank} sent more tensor bytes than its skeleton describes")
    return out


def _device(group) -> torch.device:
    """Where the group's collectives take tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_state_dicts(state_dict: dict, group: dist.ProcessGroup | None = None) -> dict | None:
    """Collect every rank's ``state_dict`` on rank 0 of ``group``; call it on every rank.

    Returns ``{"world_size": W, "ranks": [...]}`` (tensors on the CPU) on rank 0 and
    None elsewhere. Ranks may hold differently shaped state.

    Example::

        saved = gather_state_dicts(state.state_dict())
    """
    device = _device(group)
    mine = _pack(state_dict).to(device)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([mine.numel()], device=device), group=group)
    sizes = [int(s) for s in sizes]
    padded = mine.new_zeros(max(sizes))
    padded[:mine.numel()] = mine
    root = dist.get_rank(group) == 0
    received = [torch.empty_like(padded) for _ in range(world)] if root else None
    dist.gather(padded, received, group=group, group_dst=0)
    if not root:
        return None
    return {"world_size": world, "ranks": [_unpack(r[:n].cpu(), i) for i, (r, n) in enumerate(zip(received, sizes))]}


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(x, device) for x in obj)
    return obj


def own_state_dict(saved: dict, group: dist.ProcessGroup | None = None, device=None) -> dict:
    """This rank's entry of :func:`gather_state_dicts` output, its tensors moved to ``device``.

    Raises :class:`StateMismatchError` when the job's world size differs from the
    saved one (per-rank residuals cannot be redistributed). ``device`` defaults to
    where the group communicates (the current GPU for NCCL, else the CPU).

    Example::

        state.load_state_dict(own_state_dict(ckpt["gradsparse"], device=torch.device("cuda", 0)))
    """
    world = dist.get_world_size(group)
    if isinstance(saved, dict) and "ranks" in saved and saved["ranks"] is None:
        raise StateMismatchError("this holds no rank's state: gather_state_dicts (and AllRanksState.state_dict) "
                                 "return every rank's state on rank 0 only, and {'ranks': None} elsewhere. Load the "
                                 "checkpoint rank 0 wrote, on every rank")
    if saved.get("world_size") != world or len(saved.get("ranks", ())) != world:
        raise StateMismatchError(f"the checkpoint holds gradsparse state of {saved.get('world_size')} ranks, this job "
                                 f"has {world}; per-rank residuals cannot be redistributed")
    return _to(saved["ranks"][dist.get_rank(group)], _device(group) if device is None else device)


class AllRanksState:
    """Wraps a state so that a checkpoint written by rank 0 holds every rank's state.

    ``state_dict()`` is a collective (call it on every rank; rank 0's result holds
    every rank's state); ``load_state_dict(saved)`` takes this rank's entry. Meant
    for ``accelerator.register_for_checkpointing`` (Accelerate calls ``state_dict()``
    on every rank and writes rank 0's).

    Example::

        accelerator.register_for_checkpointing(gradsparse.checkpoint.AllRanksState(state))
    """

    def __init__(self, state, group: dist.ProcessGroup | None = None, device=None):
        self.state, self.group, self.device = state, group, device

    def state_dict(self) -> dict:
        saved = gather_state_dicts(self.state.state_dict(), self.group)
        return saved if saved is not None else {"world_size": dist.get_world_size(self.group), "ranks": None}

    def load_state_dict(self, saved: dict) -> None:
        self.state.load_state_dict(own_state_dict(saved, self.group, self.device))


# ------------------------------------------------------------------------ torch.distributed.checkpoint
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


__all__ = ["AllRanksState", "dcp_state_dict", "gather_state_dicts", "load_dcp_state_dict", "own_state_dict"]
