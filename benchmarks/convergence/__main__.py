"""``python -m benchmarks.convergence run ...`` trains the matrix; ``... report`` writes the docs."""

import sys

if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "run":
        from .run import main
    elif command == "report":
        from .report import main
    else:
        sys.exit("usage: python -m benchmarks.convergence {run,report} [options]  (--help for each)")
    main(sys.argv[2:])
