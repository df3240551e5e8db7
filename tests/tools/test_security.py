"""Nothing a peer sends is unpickled: enforced on the source, and checked while training for real."""

import ast
import pathlib
import pickle

import pytest
import torch.distributed.distributed_c10d as c10d
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, Threshold, TopK
from gradsparse import ddp as gddp

from ..distributed import run_world
from ..models import loss_of, make_model

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "gradsparse"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
# mpi4py's lower-case methods pickle Python objects; the upper-case ones move buffers
MPI_PICKLING = {"allgather", "allreduce", "alltoall", "bcast", "gather", "irecv", "isend", "recv", "reduce",
                "scatter", "send", "sendrecv"}


def violations(source: str) -> list[str]:
    """Unsafe deserialisation in ``source``: pickle-like imports, ``*_object`` collectives,
    ``torch.load`` without ``weights_only=True``, eval/exec, and pickling mpi4py calls."""
    tree = ast.parse(source)
    found = []
    uses_mpi = False
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"line {node.lineno}: imports {name}")
                uses_mpi = uses_mpi or name.split(".")[0] == "mpi4py"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name.endswith("_object") or name.endswith("_object_list"):
            found.append(f"line {node.lineno}: {name} (pickles on the wire)")
        if name in ("eval", "exec"):
            found.append(f"line {node.lineno}: {name}")
        if name == "load" and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "torch":
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            if not safe:
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
        if uses_mpi and isinstance(node.func, ast.Attribute) and name in MPI_PICKLING:
            found.append(f"line {node.lineno}: mpi4py {name} (pickles; use the upper-case buffer method)")
    return found


def test_the_checker_finds_what_it_looks_for():
    bad = ("import pickle\nfrom mpi4py import MPI\nimport torch\n"
           "dist.all_gather_object(out, obj)\ndist.broadcast_object_list(l)\ntorch.load(f)\n"
           "torch.load(f, weights_only=False)\nMPI.COMM_WORLD.allgather(x)\neval('1')\n")
    assert len(violations(bad)) == 7
    good = "import torch\ntorch.load(f, weights_only=True)\ndist.all_gather(out, t)\ncomm.Allgatherv(a, b)\n"
    assert violations(good) == []


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_never_deserialises_peer_data(path):
    assert violations(path.read_text()) == []


def _refuse(*args, **kwargs):
    raise AssertionError("something was unpickled on the data path")


class _RefusingUnpickler(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        _refuse()


def no_unpickling_worker(rank, world):
    import torch._dynamo  # noqa: F401  (DDP imports it; it subclasses pickle.Unpickler at import)

    # instrument every way torch.distributed and Python turn bytes into objects
    pickle.loads = pickle.load = _refuse
    pickle.Unpickler = _RefusingUnpickler
    c10d._tensor_to_object = _refuse
    steps = 0
    for compressor in (TopK(0.05), Threshold(1e-3), DGC(0.01, warmup=None)):
        model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
        gddp.register(model, compressor)
        for step in range(3):
            model.zero_grad()  # a backward onto the last delivered average is refused for DGC
            loss_of(model, "mlp", rank, step).backward()
            steps += 1
    return steps


def test_training_unpickles_nothing():
    assert run_world(no_unpickling_worker, 2) == [9, 9]
