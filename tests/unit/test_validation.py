"""Every public constructor checks its arguments: typed errors that name the argument (issue 12, item 11)."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gradsparse import DGC, DGCSGD, SparseReducer, Threshold, TopK, Warmup
from gradsparse import ddp as gddp
from gradsparse.comm import LocalCommunicator
from gradsparse.errors import ConfigTypeError, InvalidConfigError

from ..distributed import run_world
from ..models import loss_of, make_model

T, V = ConfigTypeError, InvalidConfigError  # wrong type / right type, impossible value


def reducer(**kw):
    return SparseReducer(kw.pop("compressor", TopK(0.01)), kw.pop("communicator", LocalCommunicator()), **kw)


def state(**kw):
    return gddp.GradSparseState(kw.pop("compressor", TopK(0.01)), **kw)


def build(constructor, argument, value):
    """Call ``constructor`` with ``argument=value`` and valid values for the rest."""
    return CONSTRUCTORS[constructor](**{argument: value})


CONSTRUCTORS = {
    "TopK": lambda **kw: TopK(**{"ratio": 0.01, **kw}),
    "Threshold": lambda **kw: Threshold(**{"threshold": 0.5, **kw}),
    "DGC": lambda **kw: DGC(**kw),
    "Warmup": lambda **kw: Warmup(**kw),
    "SparseReducer": reducer,
    "GradSparseState": state,
    "DGCSGD": lambda **kw: DGCSGD([nn.Parameter(torch.zeros(1))], **{"lr": 0.1, **kw}),
}

# (constructor, argument, bad value, expected error); each one is accepted, or refused with
# another type or an unnamed argument, by the code before this test was written
BAD = [
    ("TopK", "ratio", "0.01", T), ("TopK", "ratio", None, T), ("TopK", "ratio", True, T), ("TopK", "ratio", [0.1], T),
    ("TopK", "error_feedback", "no", T), ("TopK", "error_feedback", 1, T), ("TopK", "error_feedback", None, T),
    ("Threshold", "threshold", "1", T), ("Threshold", "threshold", True, T), ("Threshold", "threshold", None, T),
    ("Threshold", "error_feedback", "yes", T),
    ("DGC", "ratio", "0.001", T), ("DGC", "momentum", "0.9", T), ("DGC", "momentum", False, T),
    ("DGC", "momentum", None, T), ("DGC", "nesterov", "no", T), ("DGC", "nesterov", 1, T),
    ("DGC", "clip_norm", "1", T), ("DGC", "clip_norm", True, T), ("DGC", "sample_ratio", "0.01", T),
    ("DGC", "warmup", Warmup, T), ("DGC", "warmup", (0.25,), T), ("DGC", "seed", 0.5, T), ("DGC", "seed", "0", T),
    ("DGC", "seed", 2**64, V),
    ("Warmup", "ratios", 0.25, T), ("Warmup", "ratios", "0.25", T), ("Warmup", "ratios", (0.5, "0.1"), T),
    ("Warmup", "ratios", {0.5}, T), ("Warmup", "ratios", (), V), ("Warmup", "ratios", (0.5, True), T),
    ("Warmup", "length", 1.5, T), ("Warmup", "length", "2", T), ("Warmup", "unit", None, T),
    ("SparseReducer", "compressor", TopK, T), ("SparseReducer", "compressor", "topk", T),
    ("SparseReducer", "communicator", LocalCommunicator, T), ("SparseReducer", "communicator", None, T),
    ("SparseReducer", "granularity", 1, T), ("SparseReducer", "nonfinite", True, T), ("SparseReducer", "op", None, T),
    ("SparseReducer", "min_compress_numel", "4096", T), ("SparseReducer", "min_compress_numel", True, T),
    ("SparseReducer", "value_dtype", "float16", T), ("SparseReducer", "verify_every", "1", T),
    ("GradSparseState", "compressor", TopK, T), ("GradSparseState", "compressor", None, T),
    ("GradSparseState", "start_iter", "1", T), ("GradSparseState", "start_iter", 1.5, T),
    ("GradSparseState", "start_iter", True, T), ("GradSparseState", "steps_per_epoch", "100", T),
    ("GradSparseState", "log_every", "100", T), ("GradSparseState", "log_every", -1, V),
    ("GradSparseState", "history_size", -1, V), ("GradSparseState", "history_size", "10", T),
    ("GradSparseState", "model", nn.Linear, T), ("GradSparseState", "model", "net", T),
    ("GradSparseState", "op", None, T), ("GradSparseState", "granularity", 1, T),
    ("GradSparseState", "value_dtype", "float16", T), ("GradSparseState", "verify_every", 0.5, T),
    ("GradSparseState", "grad_scaler", "yes", T), ("GradSparseState", "grad_scaler", 1, T),
    ("GradSparseState", "grad_scaler", torch.amp.GradScaler, T), ("GradSparseState", "process_group", "pg", T),
    ("GradSparseState", "process_group", torch.distributed.GroupMember.NON_GROUP_MEMBER, V),
    ("GradSparseState", "hierarchy", "yes", T), ("GradSparseState", "hierarchy", True, T),
    ("DGCSGD", "lr", "0.1", T), ("DGCSGD", "momentum", "0.9", T), ("DGCSGD", "weight_decay", None, T),
    ("DGCSGD", "nesterov", "no", T),
]


@pytest.mark.parametrize("constructor, argument, value, error", BAD,
                         ids=[f"{c}-{a}-{v!r}" for c, a, v, _ in BAD])
def test_bad_argument_raises_a_typed_error_naming_it(constructor, argument, value, error):
    with pytest.raises(InvalidConfigError) as caught:
        build(constructor, argument, value)
    assert type(caught.value) is error
    assert argument in str(caught.value)
    if error is ConfigTypeError:  # catchable both ways
        assert isinstance(caught.value, TypeError) and isinstance(caught.value, ValueError)


SPARSE_COMPRESSION_BAD = [("compressor", TopK, T), ("start_iter", "1", T), ("steps_per_epoch", 1.5, T),
                          ("log_every", None, T), ("history_size", -1, V), ("verify_every", "1", T),
                          ("op", None, T), ("nonfinite", 1, T), ("min_compress_numel", "1", T),
                          ("value_dtype", "float16", T), ("grad_scaler", 2.0**16, T)]


@pytest.mark.parametrize("argument, value, error", SPARSE_COMPRESSION_BAD,
                         ids=[f"{a}-{v!r}" for a, v, _ in SPARSE_COMPRESSION_BAD])
def test_sparse_compression_arguments_are_checked(argument, value, error):
    horovod = pytest.importorskip("gradsparse.horovod")
    pytest.importorskip("horovod.torch")
    kwargs = {"compressor": TopK(0.01), argument: value}
    with pytest.raises(InvalidConfigError) as caught:
        horovod.SparseCompression(**kwargs)
    assert type(caught.value) is error and argument in str(caught.value)


def test_numpy_scalars_are_accepted_as_python_numbers():
    topk = TopK(np.float32(0.5), error_feedback=np.bool_(False))
    dgc = DGC(np.float32(0.01), momentum=np.float32(0.5), nesterov=np.bool_(True), clip_norm=np.int64(2),
              sample_ratio=np.float64(0.1), seed=np.int64(3),
              warmup=Warmup(ratios=np.array([0.5, 0.1], dtype=np.float32), length=np.int64(2)))
    s = state(compressor=Threshold(np.float32(0.5)), start_iter=np.int64(2), steps_per_epoch=np.int64(10),
              log_every=np.int64(5), history_size=np.int64(3), min_compress_numel=np.int64(10),
              verify_every=np.int64(2))
    assert (topk.target_ratio, topk.error_feedback) == (0.5, False)
    assert (dgc.momentum, dgc.nesterov, dgc.clip_norm, dgc.seed, dgc.warmup.length) == (0.5, True, 2.0, 3, 2)
    assert dgc.warmup.ratios == (0.5, pytest.approx(0.1))
    assert (s.start_iter, s.steps_per_epoch, s.history.maxlen, s.options.min_compress_numel) == (2, 10, 3, 10)
    plain = [topk.target_ratio, dgc.momentum, dgc.clip_norm, dgc.seed, s.start_iter, s.options.verify_every]
    assert all(type(x) in (int, float) for x in plain) and type(dgc.nesterov) is bool
    DGCSGD([nn.Parameter(torch.zeros(1))], lr=np.float32(0.1), momentum=np.float32(0.9), nesterov=np.bool_(True))


@pytest.mark.parametrize("make", [lambda: TopK(0.01, error_feedback="no"), lambda: Threshold(0.5, error_feedback="False"),
                                  lambda: DGC(nesterov="no")], ids=["topk", "threshold", "dgc"])
def test_strings_are_not_booleans(make):
    with pytest.raises(ConfigTypeError, match="True or False"):
        make()


def test_a_class_instead_of_an_instance_is_named():
    with pytest.raises(ConfigTypeError) as caught:
        state(compressor=TopK)
    assert str(caught.value) == "compressor must be an instance such as TopK(0.01), got the class TopK"


def test_repr_shows_compressor_step_and_last_stats():
    s = state()
    assert repr(s) == ("GradSparseState(compressor=TopK(error_feedback=True, ratio=0.01), step=0, "
                       "density=None, ratio=None, world_size=None)")


def test_a_bound_state_refuses_a_second_model():
    net = nn.Linear(4, 4)
    s = state(model=net)
    s.bind(net)  # the same model again is fine
    with pytest.raises(InvalidConfigError, match="already serves another model; create one per DDP model"):
        s.bind(nn.Linear(4, 4))


def test_a_model_grown_after_binding_is_refused_naming_the_reload():
    """A head appended and the model wrapped again: the message says how to carry the memory over."""
    net = nn.Sequential(nn.Linear(4, 4))
    s = state(model=net)
    net.append(nn.Linear(4, 2))
    with pytest.raises(InvalidConfigError, match=r"new_state\.load_state_dict\(old_state\.state_dict\(\)\)"):
        s.bind(net)


# ----------------------------------------------------------------------------------------------
# With a process group: register()'s checks, sharing an unbound state, the repr after a step.

def shared_state_worker(rank, world):
    seen = {}
    model = DDP(make_model("mlp"), bucket_cap_mb=0.05)
    for name, call in {"class": lambda: gddp.register(model, TopK),
                       "optimizer": lambda: gddp.register(model, TopK(0.01), optimizer="sgd")}.items():
        try:
            call()
        except ConfigTypeError as e:
            seen[name] = str(e)
    alone = gddp.GradSparseState(TopK(0.01))  # unbound: names from the order of first sight
    model.register_comm_hook(alone, gddp.sparse_hook)
    for step in range(4):  # DDP rebuilds its buckets after iteration 0: the same parameters, still fine
        model.zero_grad()
        loss_of(model, "mlp", rank, step).backward()
    seen["alone_repr"] = repr(alone)
    shared = gddp.GradSparseState(TopK(0.01))
    first, second = (DDP(make_model("mlp"), bucket_cap_mb=0.05) for _ in range(2))
    for m in (first, second):
        m.register_comm_hook(shared, gddp.sparse_hook)
    loss_of(first, "mlp", rank, 0).backward()
    try:
        loss_of(second, "mlp", rank, 0).backward()
    except Exception as e:  # raised by the hook before communicating, on every rank
        seen["shared"] = f"{type(e).__name__}: {e}"
    return seen


@pytest.mark.multiprocess
def test_register_checks_and_a_state_shared_by_two_models_is_refused():
    for seen in run_world(shared_state_worker, 2, timeout=120):
        assert seen["class"] == "compressor must be an instance such as TopK(0.01), got the class TopK"
        assert "optimizer must be" in seen["optimizer"] and "str 'sgd'" in seen["optimizer"]
        assert seen["alone_repr"].startswith("GradSparseState(compressor=TopK(error_feedback=True, ratio=0.01), "
                                             "step=4, density=0.0"), seen["alone_repr"]
        assert seen["alone_repr"].endswith("x, world_size=2)"), seen["alone_repr"]
        assert seen["shared"].startswith("StateMismatchError"), seen["shared"]
        assert "two DDP models" in seen["shared"] and "one GradSparseState per DDP model" in seen["shared"]
