#!/usr/bin/env bash
# qwenimg-train under torchrun, on one node or several (docs/multinode.md).
#
# Every argument is a Hydra override for qwenimg-train; the script adds
# trainer.num_nodes=$NNODES and trainer.devices=$NPROC_PER_NODE so that Lightning's
# view of the job matches what torchrun starts.
#
#   # one node, 8 GPUs (the run directory gets a timestamp, printed below):
#   NPROC_PER_NODE=8 launch/torchrun.sh trainer=gpu strategy=deepspeed_zero3 experiment=...
#
#   # 4 nodes x 8 GPUs: run this on every node, with only NODE_RANK differing
#   NNODES=4 NODE_RANK=0 NPROC_PER_NODE=8 RDZV_ENDPOINT=node0:29500 RDZV_ID=run42 \
#     launch/torchrun.sh trainer=gpu strategy=deepspeed_zero3 paths.output_dir=/shared/runs/run42 ...
#
#   # resume the same run after a stop or crash: the same command plus
#     ... paths.output_dir=/shared/runs/run42 ckpt_path=last
#
# Environment:
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's index, 0..NNODES-1 (default 0). Node 0 hosts the rendezvous
#                   store, so RDZV_ENDPOINT must be node 0's address. torchrun's c10d
#                   rendezvous numbers the nodes' ranks itself (in the order they join):
#                   global rank 0 is not necessarily on node 0.
#   NPROC_PER_NODE  processes per node, one per GPU (default: the GPUs nvidia-smi lists, else 1)
#   RDZV_ENDPOINT   host:port of the c10d rendezvous, reachable from every node; required
#                   when NNODES > 1 (one node: torchrun --standalone picks a free local port)
#   RDZV_ID         job id, the same on every node (default qwenimg-train); a fresh id per
#                   job keeps a late node of an old job out of a new one
#   LOCAL_ADDR      this node's address as the others should reach it (torchrun
#                   --local-addr; default: its fully qualified host name)
#   TORCHRUN_ARGS   further torchrun options, e.g. "--max-restarts=3"
#   PYTHON          interpreter (default: the checkout's .venv/bin/python, else python3)
#   ENTRY           what torchrun starts (default "-m qwenimg_train.training.train"): a module
#                   (-m name) or script that takes qwenimg-train's overrides
#
# The run directory: every process resolves paths.output_dir itself, and its default
# holds the start time (configs/paths/default.yaml), which differs between nodes. So
# with NNODES > 1, paths.output_dir=<a folder every node shares> is required (also when
# the experiment file sets one: the script cannot see it); on one node the script fixes
# the timestamped default once for all processes (QWENIMG_RUN_DIR, which the default reads).
# On CPU (tests) the ranks talk over gloo; set GLOO_SOCKET_IFNAME (e.g. lo) where the
# host name does not resolve to the interface to use.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "launch/torchrun.sh: $*" >&2; exit 2; }
is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    if is_count "$gpus"; then NPROC_PER_NODE="$gpus"; fi
  fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
RDZV_ID="${RDZV_ID:-qwenimg-train}"
is_count "$NNODES" || die "NNODES=$NNODES: give the number of nodes, a positive integer"
is_count "$NPROC_PER_NODE" || die "NPROC_PER_NODE=$NPROC_PER_NODE: give the processes (GPUs) per node, a positive integer"
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= NNODES )); then
  die "NODE_RANK=$NODE_RANK must lie in [0, NNODES=$NNODES)"
fi

# The overrides this script owns must agree with the launch, or be left out.
output_dir="" sizes=("trainer.num_nodes=$NNODES" "trainer.devices=$NPROC_PER_NODE")
for arg in "$@"; do
  case "$arg" in
    paths.output_dir=*|+paths.output_dir=*|++paths.output_dir=*) output_dir="${arg#*=}" ;;
    trainer.num_nodes=*|+trainer.num_nodes=*|++trainer.num_nodes=*)
      [[ "${arg#*=}" == "$NNODES" ]] || die "$arg disagrees with NNODES=$NNODES: leave trainer.num_nodes out (set from NNODES)"
      sizes=("${sizes[@]/trainer.num_nodes=*}") ;;
    trainer.devices=*|+trainer.devices=*|++trainer.devices=*)
      [[ "${arg#*=}" == "$NPROC_PER_NODE" ]] || die "$arg disagrees with NPROC_PER_NODE=$NPROC_PER_NODE: leave trainer.devices out (set from NPROC_PER_NODE)"
      sizes=("${sizes[@]/trainer.devices=*}") ;;
    -m|--multirun) die "$arg: Hydra multirun does not go through torchrun; launch one run per call" ;;
  esac
done

overrides=("$@")
for size in "${sizes[@]}"; do [[ -z "$size" ]] || overrides+=("$size"); done
# A value inherited from a parent qwenimg-train process would not be this run's.
unset QWENIMG_RUN_DIR
if [[ -z "$output_dir" ]]; then
  if (( NNODES > 1 )); then
    die "NNODES=$NNODES needs paths.output_dir=<a folder every node shares>, the same on every node (each node would otherwise pick its own timestamped run directory)"
  fi
  # The default run directory, fixed once for this node's processes; an experiment
  # file's own paths.output_dir still takes precedence.
  QWENIMG_RUN_DIR="outputs/train/$(date +%Y-%m-%d_%H-%M-%S)"
  export QWENIMG_RUN_DIR
  output_dir="$QWENIMG_RUN_DIR (unless the experiment sets paths.output_dir)"
fi

if (( NNODES > 1 )); then
  [[ -n "${RDZV_ENDPOINT:-}" ]] || die "NNODES=$NNODES needs RDZV_ENDPOINT=<node 0's host>:<port>, the same on every node"
  # Node 0 hosts the store explicitly, rather than by matching its host name to the
  # endpoint (which fails behind aliases, and picks at random when all nodes are one host).
  is_host=$(( NODE_RANK == 0 ))
  rdzv=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=$RDZV_ID" "--rdzv-conf=is_host=$is_host")
elif [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  rdzv=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=$RDZV_ID")
else
  rdzv=(--standalone)
fi
local_addr=()
[[ -z "${LOCAL_ADDR:-}" ]] || local_addr=("--local-addr=$LOCAL_ADDR")
read -r -a entry <<< "${ENTRY:--m qwenimg_train.training.train}"
read -r -a extra <<< "${TORCHRUN_ARGS:-}"

echo "launch/torchrun.sh: node $NODE_RANK of $NNODES, $NPROC_PER_NODE process(es) per node, run directory $output_dir" >&2
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${rdzv[@]}" \
  "${local_addr[@]}" "${extra[@]}" "${entry[@]}" "${overrides[@]}"
