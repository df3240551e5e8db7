"""One rank of tests/unit/test_classic.py's ``mpirun`` check: PerSignTopK and GradientDropping over MPICommunicator.

``python -m tests.classic_mpi_worker OUTDIR`` reduces four seeded gradients per compressor (per-bucket
selection) and saves this rank's outputs to ``OUTDIR/rank{r}.pt``. mpi4py is imported inside ``main``
only (importing mpi4py.MPI initialises MPI).
"""

import os
import sys

import torch

from gradsparse import GradientDropping, PerSignTopK, Segment, SparseReducer

SEGMENTS = [Segment("a", 0, 3000), Segment("small", 3000, 50), Segment("b", 3050, 2000)]


def main(outdir: str) -> None:
    from gradsparse.comm.mpi import MPICommunicator

    torch.set_num_threads(1)
    comm = MPICommunicator()
    out = {}
    for name, compressor in {"per_sign_mean": PerSignTopK(0.01),
                             "gradient_dropping": GradientDropping(0.99, sample_size=1000)}.items():
        r = SparseReducer(compressor, comm, min_compress_numel=100, granularity="bucket")
        out[name] = [r.reduce(torch.randn(5050, generator=torch.Generator().manual_seed(100 * comm.rank + step)),
                              SEGMENTS, step).wait().clone() for step in range(4)]
    torch.save(out, os.path.join(outdir, f"rank{comm.rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
