#!/usr/bin/env bash
# SLURM: one task per node, each starts one torchrun through launch/multinode.sh.
#   sbatch --nodes 4 launch/sbatch_example.sh benchmarks/ddp_bench.py --model resnet50
# Adjust --nproc-per-node (ranks per node, e.g. GPUs) and IFACE (the cluster network's interface).
#SBATCH --job-name=gradsparse
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
set -euo pipefail
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-1}
IFACE=${IFACE:-}   # empty: the interface of the route to MASTER_ADDR, on each node
srun --kill-on-bad-exit=1 bash -c "exec launch/multinode.sh --nnodes $SLURM_NNODES --node-rank \$SLURM_NODEID \
  --master-addr $MASTER_ADDR --master-port $MASTER_PORT --nproc-per-node $NPROC ${IFACE:+--iface $IFACE} -- $*"
