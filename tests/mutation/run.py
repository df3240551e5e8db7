"""Targeted mutants of the algorithm, one at a time, each followed by the fast tests that should kill it.

``make mutate`` (on demand, not in CI; 20-40 minutes on 2 shared cores) or::

    python -m tests.mutation.run                       # every mutant, both backends
    python -m tests.mutation.run --only masking_skipped --backend reference
    python -m tests.mutation.run --list
    python -m tests.mutation.run --backend extension --tests tests/multiprocess/test_ddp.py::test_dgc_hook_equals_the_paper_at_world

Each mutant is a textual replacement in one file of the package (the original text must
occur exactly once). The package and tests/ are copied to a temporary folder, the mutant is
applied there, and pytest runs the mutant's test files from that folder with ``PYTHONPATH``
pointing at it, so spawned workers (torch.multiprocessing, horovodrun) import the mutated copy
too. Backends: ``extension`` (the compiled kernels, as installed: the built ``_C*.so`` is copied)
and ``reference`` (``GRADSPARSE_BACKEND=reference``: the extension is not loaded and every op
runs gradsparse/_reference.py). The unmutated copy must pass the same tests first (baseline).

A mutant is *killed* when a test fails (or the run times out: a hang; reported as such),
*survived* when its tests pass; a mutant that does not compile, or whose tests cannot even be
collected, is *invalid* (a mistake in this file, not a score). Results go to stdout and, with
``--json FILE``, to a file; docs/testing.md publishes the score and the survivors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOTH = ("extension", "reference")

# Fast test selections, most likely killers first (pytest stops at the first failure: -x).
MEMORY = ("tests/unit/test_compressors.py", "tests/unit/test_reducer.py",
          "tests/multiprocess/test_ddp.py::test_dgc_hook_equals_the_paper_at_world",
          "tests/multiprocess/test_optimizer_rules.py")
REDUCER = ("tests/unit/test_reducer.py", "tests/multiprocess/test_ddp.py::test_dgc_hook_equals_the_paper_at_world",
           "tests/multiprocess/test_ddp.py::test_nothing_dropped_equals_plain_ddp",
           "tests/multiprocess/test_correct_by_default.py")
HEALTH = ("tests/multiprocess/test_correct_by_default.py", "tests/unit/test_reducer.py",
          "tests/multiprocess/test_amp.py")
SELECTION = ("tests/unit/test_selection.py", "tests/unit/test_kernels.py", "tests/unit/test_compressors.py",
             "tests/unit/test_reducer.py")
PAYLOAD = ("tests/unit/test_payload.py", "tests/tools/test_security.py", "tests/unit/test_kernels.py",
           "tests/unit/test_reducer.py")
OPTIM = ("tests/multiprocess/test_optimizer_rules.py",)
# with the extension, the library never calls _reference's compensation: the kernel test compares the two
KERNEL_DGC = ("tests/unit/test_kernels.py::test_dgc_compensate_equals_reference",)
CANDIDATES = ("tests/unit/test_kernels_candidates.py",)
DESCRIPTORS = ("tests/multiprocess/test_faults.py",
               "tests/multiprocess/test_ddp.py::test_errors_are_typed_and_reach_every_rank",
               "tests/unit/test_reducer.py")

@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    what: str                      # the invariant it breaks
    file: str                      # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]
    backends: tuple[str, ...] = BOTH


MUTANTS = [
    # --- DGC memory: momentum correction, factor masking, error feedback, whole tensors
    Mutant("masking_skipped", "momentum factor masking never zeroes u where sent", "gradsparse/memory.py",
           'slot["momentum"].index_fill_(0, indices, 0.0)', "None", MEMORY),
    Mutant("masking_always", "u masked also where every coordinate was sent (complete-send rule)",
           "gradsparse/memory.py", "if not complete:  # momentum factor masking", "if True:  # momentum factor masking",
           MEMORY),
    Mutant("ef_sign_velocity", "DGC velocity update adds what was sent instead of removing it",
           "gradsparse/memory.py", 'slot["velocity"].index_add_(0, indices, sent, alpha=-1.0)',
           'slot["velocity"].index_add_(0, indices, sent, alpha=1.0)', MEMORY),
    Mutant("ef_skipped_velocity", "DGC velocity keeps what was sent", "gradsparse/memory.py",
           'slot["velocity"].index_add_(0, indices, sent, alpha=-1.0)', "None", MEMORY),
    Mutant("ef_sign_residual", "residual update adds what was sent instead of removing it", "gradsparse/memory.py",
           'self.state[key]["residual"].index_add_(0, indices, sent, alpha=-1.0)',
           'self.state[key]["residual"].index_add_(0, indices, sent, alpha=1.0)', MEMORY),
    Mutant("ef_skipped_residual", "residual keeps what was sent", "gradsparse/memory.py",
           'self.state[key]["residual"].index_add_(0, indices, sent, alpha=-1.0)', "None", MEMORY),
    Mutant("nesterov_whole_ignored", "Nesterov ignored for tensors sent whole", "gradsparse/memory.py",
           "if self.nesterov:\n            flat.add_(u, alpha=self.momentum)",
           "if False:\n            flat.add_(u, alpha=self.momentum)", MEMORY),
    Mutant("whole_momentum_dropped", "tensors sent whole get no momentum", "gradsparse/memory.py",
           "u.mul_(self.momentum).add_(flat)", "u.mul_(0.0).add_(flat)", MEMORY),
    Mutant("compensate_momentum_order", "momentum correction computes u = m*(u + g) without Nesterov",
           "gradsparse/_reference.py", "u.mul_(momentum).add_(g)", "u.add_(g).mul_(momentum)", KERNEL_DGC + MEMORY),
    Mutant("compensate_nesterov_ignored_reference", "Nesterov ignored in the reference compensation",
           "gradsparse/_reference.py", "if nesterov:\n        u.add_(g).mul_(momentum)",
           "if False:\n        u.add_(g).mul_(momentum)", KERNEL_DGC + MEMORY),
    Mutant("compensate_nesterov_ignored_compiled", "Nesterov not passed to the compiled compensation",
           "gradsparse/ops.py", "float(momentum), bool(nesterov))", "float(momentum), False)", MEMORY,
           backends=("extension",)),
    # --- counts, warm-up, clipping
    Mutant("k_plus_one", "k = ceil(ratio * n) + 1", "gradsparse/compressors/base.py",
           "max(1, math.ceil(ratio * numel))", "max(1, math.ceil(ratio * numel) + 1)", SELECTION),
    Mutant("k_minus_one", "k = ceil(ratio * n) - 1", "gradsparse/compressors/base.py",
           "max(1, math.ceil(ratio * numel))", "max(1, math.ceil(ratio * numel) - 1)", SELECTION),
    Mutant("warmup_ignored", "DGC's warm-up schedule ignored", "gradsparse/compressors/dgc.py",
           "return self.warmup.ratio(self.target_ratio, step, epoch)", "return self.target_ratio", MEMORY),
    Mutant("clip_limit_without_sqrt", "local clip limit clip_norm instead of clip_norm * sqrt(N)",
           "gradsparse/compressors/dgc.py", "return self.clip_norm * root if average",
           "return self.clip_norm if average", MEMORY),
    Mutant("clip_skipped", "local gradient clipping never applied", "gradsparse/compressors/dgc.py",
           "if norm > limit:", "if False:", MEMORY),
    # --- the reducer: averaging, wire rounding, complete sends, granularity, descriptors, health
    Mutant("average_dropped_sparse", "sparse path sums instead of averaging (1/world dropped)",
           "gradsparse/reducer.py", 'alpha = 1.0 / world if self.options.op == "average" else 1.0', "alpha = 1.0", REDUCER),
    Mutant("average_doubled_sparse", "sparse path divides by world/2", "gradsparse/reducer.py",
           'alpha = 1.0 / world if self.options.op == "average" else 1.0',
           'alpha = 2.0 / world if self.options.op == "average" else 1.0', REDUCER),
    Mutant("average_dropped_dense", "dense transport sums instead of averaging", "gradsparse/reducer.py",
           "flat.mul_(1.0 / self.communicator.world_size)", "flat.mul_(1.0)", REDUCER),
    Mutant("wire_rounding_not_kept", "memory removes the unrounded value, not the one on the wire",
           "gradsparse/reducer.py", "v[s.key].index_select(0, local).to(wire).float(), complete)",
           "v[s.key].index_select(0, local), complete)", REDUCER),
    Mutant("wire_rounding_not_kept_dense_step", "dense first step: memory removes the unrounded value",
           "gradsparse/reducer.py", "sent = v[s.key].to(wire, copy=True).float()", "sent = v[s.key].clone()", REDUCER),
    Mutant("complete_never", "a group whose every coordinate is sent still masks momentum",
           "gradsparse/reducer.py", "complete = chosen.numel() == joined.numel()", "complete = False", REDUCER),
    Mutant("complete_always", "momentum never masked (every selection taken as complete)",
           "gradsparse/reducer.py", "complete = chosen.numel() == joined.numel()", "complete = True", REDUCER),
    Mutant("bucket_granularity_ignored", "granularity='bucket' selects per parameter", "gradsparse/reducer.py",
           "groups = (compressed,) if compressed else ()", "groups = tuple((s,) for s in compressed)", REDUCER),
    Mutant("dense_first_step_skipped", "the hook compresses from iteration 0 (no dense start)",
           "gradsparse/ddp.py", "select_all=state.dense_iteration(step),", "select_all=False,", REDUCER),
    Mutant("descriptor_check_disabled", "ranks' descriptors gathered but never compared", "gradsparse/reducer.py",
           "        check_descriptors(descriptors, fixed is not None)\n", "        pass\n", DESCRIPTORS),
    Mutant("overflow_check_disabled", "compensation that could overflow is not detected", "gradsparse/reducer.py",
           "if grad_bound >= limit or any(", "if False and any(", HEALTH),
    Mutant("nonfinite_check_disabled", "NaN/Inf gradients not detected before compensation",
           "gradsparse/reducer.py", "if not math.isfinite(grad_bound):", "if False:", HEALTH),
    Mutant("loss_scale_rescale_skipped", "memory not rescaled when the loss scale changes", "gradsparse/reducer.py",
           "self.memory.rescale(loss_scale / self._loss_scale)", "None", HEALTH),
    # --- the optimizer's weight-decay route
    Mutant("dgcsgd_wd_momentum_dropped", "DGCSGD's weight decay gets no momentum", "gradsparse/optim.py",
           "buf.mul_(m).add_(decay)", "buf.mul_(0.0).add_(decay)", OPTIM),
    Mutant("dgcsgd_wd_skipped", "DGCSGD ignores weight decay", "gradsparse/optim.py",
           "if wd == 0:\n            return grad", "if True:\n            return grad", OPTIM),
    # --- reference kernels (the compiled ones are checked against them and the oracle)
    Mutant("ref_ties_to_higher_index", "reference top-k breaks ties towards the higher index",
           "gradsparse/_reference.py", "ties = torch.nonzero(mag == kth).squeeze(1)[: k - above.numel()]",
           "ties = torch.nonzero(mag == kth).squeeze(1).flip(0)[: k - above.numel()]", SELECTION),
    Mutant("ref_threshold_exclusive", "reference threshold excludes |x| == tau", "gradsparse/_reference.py",
           "return (x >= threshold) | (x <= -threshold)", "return (x > threshold) | (x < -threshold)", SELECTION),
    Mutant("ref_sampled_truncation_by_index", "sampled top-k keeps the first k candidates, not the largest",
           "gradsparse/_reference.py", "return candidates[_topk_of_magnitude(_magnitude(flat[candidates]), k)]",
           "return candidates[:k]", SELECTION),
    # the candidate ops' reference: the compiled kernels and a float64 oracle are compared with it
    Mutant("ref_candidates_floor_nearest", "reference candidates round the floor to the nearest float, not up",
           "gradsparse/_reference.py", "    if float(f) < floor:\n        f = torch.nextafter",
           "    if False:\n        f = torch.nextafter", CANDIDATES, ("extension",)),
    Mutant("ref_candidates_caps_ignored", "reference candidates keep every hit past the cap",
           "gradsparse/_reference.py", "parts.append(hits[: caps[s]] + offsets[s])", "parts.append(hits + offsets[s])",
           CANDIDATES, ("extension",)),
    Mutant("ref_candidates_kth_largest", "reference kth is the largest selected magnitude, not the smallest",
           "gradsparse/_reference.py", "kth.append(float(_magnitude(flat[positions[start:start + k]]).min()))",
           "kth.append(float(_magnitude(flat[positions[start:start + k]]).max()))", CANDIDATES, ("extension",)),
    Mutant("ref_unpack_no_range_check", "unpack accepts indices outside [0, numel)", "gradsparse/payload.py",
           "if int(indices[0]) < 0 or int(indices[-1]) >= numel:", "if False:", PAYLOAD),
]


def _copy_tree(dest: str) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "mutation")
    shutil.copytree(os.path.join(ROOT, "gradsparse"), os.path.join(dest, "gradsparse"), ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(dest, "tests"), ignore=ignore)
    for name in ("README.md", "setup.py", "pyproject.toml"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), dest)
    shutil.copytree(os.path.join(ROOT, "docs"), os.path.join(dest, "docs"), ignore=ignore)


def _env(dest: str, backend: str) -> dict:
    env = dict(os.environ, PYTHONPATH=dest, PYTHONDONTWRITEBYTECODE="1")
    env.pop("GRADSPARSE_BACKEND", None)
    if backend == "reference":
        env["GRADSPARSE_BACKEND"] = "reference"
    return env


def _check_import(dest: str, backend: str) -> None:
    """The copy (not the installed package) is what runs, on the backend asked for."""
    code = "import gradsparse, gradsparse.ops as o; print(gradsparse.__file__); print(o.BACKEND)"
    out = subprocess.run([sys.executable, "-c", code], cwd=dest, env=_env(dest, backend), capture_output=True,
                         text=True, check=True).stdout.split()
    if not out[0].startswith(dest) or out[1] != backend:
        raise SystemExit(f"the mutated copy is not what runs: {out} (expected {dest}, backend {backend})")


def _applicable(tests, backend: str) -> list[str]:
    """The kernel tests compare the extension with the reference: without the extension they do not apply."""
    return [t for t in tests if backend == "extension" or not t.startswith("tests/unit/test_kernels.py")]


def _pytest(dest: str, backend: str, tests, timeout: float) -> tuple[str, str, float]:
    """('passed' | 'failed' | 'error' | 'timeout', first failure, seconds)."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
           *_applicable(tests, backend)]
    started = time.monotonic()
    # its own session: on a timeout or Ctrl-C the whole group goes (pytest and the ranks it spawned)
    proc = subprocess.Popen(cmd, cwd=dest, env=_env(dest, backend), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {timeout:.0f} s", time.monotonic() - started
    finally:
        if proc.poll() is None or proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - started
    if proc.returncode == 0:
        return "passed", "", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", stdout, flags=re.M)
    outcome = "failed" if proc.returncode == 1 else "error"
    return outcome, failed[0] if failed else (stdout + stderr)[-300:].strip(), seconds


def _apply(dest: str, mutant: Mutant) -> str:
    path = os.path.join(dest, mutant.file)
    with open(path) as f:
        original = f.read()
    count = original.count(mutant.old)
    if count != 1:
        raise SystemExit(f"mutant {mutant.id}: the text to replace occurs {count} times in {mutant.file}")
    mutated = original.replace(mutant.old, mutant.new)
    compile(mutated, path, "exec")  # a SyntaxError here is a broken mutant, not a kill
    with open(path, "w") as f:
        f.write(mutated)
    return original


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    parser.add_argument("--backend", choices=("extension", "reference", "both"), default="both")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per test run")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--tests", nargs="*", help="run these tests for every mutant instead of its own list "
                        "(to see what one test file kills on its own)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (not for a published score)")
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or m.id in args.only]
    if args.tests:
        mutants = [dataclasses.replace(m, tests=tuple(args.tests)) for m in mutants]
    if args.only and len(mutants) != len(set(args.only)):
        raise SystemExit(f"unknown mutant ids: {sorted(set(args.only) - {m.id for m in MUTANTS})}")
    if args.list:
        for m in MUTANTS:
            print(f"{m.id:38} {'/'.join(m.backends):20} {m.what}")
        return 0
    backends = BOTH if args.backend == "both" else (args.backend,)
    results = []
    with tempfile.TemporaryDirectory(prefix="gradsparse-mutation-") as dest:
        _copy_tree(dest)
        for backend in backends:
            _check_import(dest, backend)
            if not args.no_baseline:
                tests = sorted({t for m in mutants if backend in m.backends for t in m.tests})
                outcome, first, seconds = _pytest(dest, backend, tests, args.timeout * 3)
                print(f"baseline [{backend}]: {outcome} in {seconds:.0f} s {first}", flush=True)
                if outcome != "passed":
                    raise SystemExit("the unmutated package fails its tests: no score")
        for mutant in mutants:
            for backend in backends:
                if backend not in mutant.backends:
                    continue
                original = _apply(dest, mutant)
                try:
                    outcome, first, seconds = _pytest(dest, backend, mutant.tests, args.timeout)
                finally:
                    with open(os.path.join(dest, mutant.file), "w") as f:
                        f.write(original)
                status = {"passed": "survived", "failed": "killed", "timeout": "killed", "error": "invalid"}[outcome]
                results.append({"id": mutant.id, "backend": backend, "status": status, "outcome": outcome,
                                "by": first, "seconds": round(seconds, 1), "what": mutant.what,
                                "file": mutant.file, "tests": _applicable(mutant.tests, backend)})
                print(f"{status:8} {mutant.id:38} [{backend}] {seconds:6.0f} s  {first}", flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    invalid = [r for r in results if r["status"] == "invalid"]
    print(f"\nscore: {killed} of {len(results) - len(invalid)} mutant runs killed"
          + (f" ({len(invalid)} invalid, not counted)" if invalid else ""))
    for r in invalid:
        print(f"  invalid: {r['id']} [{r['backend']}]: {r['by']}")
    for r in results:
        if r["status"] == "survived":
            print(f"  survived: {r['id']} [{r['backend']}]: {r['what']} (tests: {', '.join(r['tests'])})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"killed": killed, "runs": len(results), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
