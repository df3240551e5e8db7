"""Launch tools: the emulated cluster (:mod:`launch.cluster`) and its link-rate probe (:mod:`launch.linkrate`).

The multi-node launcher for real clusters is the shell script ``launch/multinode.sh``; see launch/README.md.
"""
