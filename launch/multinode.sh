#!/usr/bin/env bash
# Start this node's share of a multi-node PyTorch job: one torchrun per node, any training script.
#
#   launch/multinode.sh --nnodes 4 --node-rank 0 --master-addr 10.0.0.1 [--master-port 29500] \
#       [--nproc-per-node 1] [--iface eth0] [--threads 1] -- train.py [script args]
#
# Run the same line on every node, changing only --node-rank (0 on the node whose address is
# --master-addr). --iface names the interface the ranks talk over; it sets GLOO_SOCKET_IFNAME and
# NCCL_SOCKET_IFNAME (without it gloo may resolve the hostname to 127.0.0.1 and hang). Left out, it
# is the interface of the route to --master-addr. Environment each rank gets from torchrun:
# RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT; from this script:
# GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME, OMP_NUM_THREADS. PYTHON selects the interpreter.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

NNODES="" NODE_RANK="" MASTER_ADDR="" MASTER_PORT=29500 NPROC=1 IFACE="" THREADS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) NNODES="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --master-addr) MASTER_ADDR="$2"; shift 2 ;;
    --master-port) MASTER_PORT="$2"; shift 2 ;;
    --nproc-per-node) NPROC="$2"; shift 2 ;;
    --iface) IFACE="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "multinode.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ -n "$NNODES" && -n "$NODE_RANK" && -n "$MASTER_ADDR" && $# -ge 1 ]] || {
  echo "multinode.sh: --nnodes, --node-rank, --master-addr and a script are required" >&2; usage; }
[[ "$NODE_RANK" -ge 0 && "$NODE_RANK" -lt "$NNODES" ]] || {
  echo "multinode.sh: --node-rank $NODE_RANK is not in [0, $NNODES)" >&2; exit 2; }

if [[ -z "$IFACE" ]] && command -v ip >/dev/null; then
  IFACE=$(ip route get "$MASTER_ADDR" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p' | head -n1)
fi
if [[ -n "$IFACE" ]]; then
  [[ -e "/sys/class/net/$IFACE" ]] || { echo "multinode.sh: no interface $IFACE on $(hostname)" >&2; exit 2; }
  export GLOO_SOCKET_IFNAME="$IFACE" NCCL_SOCKET_IFNAME="$IFACE"
fi
export OMP_NUM_THREADS="${THREADS:-${OMP_NUM_THREADS:-1}}"
PYTHON="${PYTHON:-python3}"

echo "multinode.sh: node $NODE_RANK/$NNODES, master $MASTER_ADDR:$MASTER_PORT, $NPROC proc(s), iface ${IFACE:-default}" >&2
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --nproc-per-node "$NPROC" "$@"
