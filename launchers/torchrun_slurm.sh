#!/usr/bin/env bash
# Multi-node launch of a FlexOlmo production recipe with torchrun under Slurm (one torchrun per node).
#
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=1 --exclusive launchers/torchrun_slurm.sh \
#       public-7b recipe.precision=fp8-blockwise recipe.data_paths=[/data/public] recipe.save_dir=/ckpt/public
#
# RECIPE is one of public-7b, expert-2x7b, router-tune-7x7b, inference-7x7b (or public, expert,
# router-tune); the node count and GPUs per node are passed to the production recipes (the "*7b"
# names of flexolmo_plugin.recipes.registry), which check their layout (TP / EP groups inside a
# node, DP across nodes); the phase recipes take no cluster shape.  Run inside the NGC container that has
# Transformer Engine, with this repository installed (pip install -e .: torchrun runs the installed
# module flexolmo_plugin.recipes.train); set CONTAINER to wrap srun with pyxis (--container-image).
set -euo pipefail

RECIPE=${1:?usage: torchrun_slurm.sh RECIPE [overrides...]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NNODES=${SLURM_NNODES:-1}
HEAD=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || hostname)
PORT=${MASTER_PORT:-29500}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# NCCL: fail fast with a clear error instead of hanging (the recipe sets a 60 min process-group
# timeout); long InfiniBand retry timeout for large clusters; Megatron's TP/SP overlap needs a
# single CUDA connection per device.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

CLUSTER=()
case "$RECIPE" in *7b) CLUSTER=("recipe.nodes=$NNODES" "recipe.gpus_per_node=$GPUS_PER_NODE") ;; esac
CMD=(torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" --rdzv-backend=c10d
     --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="${SLURM_JOB_ID:-flexolmo}"
     -m flexolmo_plugin.recipes.train "$RECIPE" ${CLUSTER[@]+"${CLUSTER[@]}"} "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${CMD[@]}"; echo
    exit 0
fi
SRUN=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
if [[ -n "${CONTAINER:-}" ]]; then
    SRUN+=(--container-image="$CONTAINER" --container-mounts="${CONTAINER_MOUNTS:-$REPO:$REPO}")
fi
exec "${SRUN[@]}" "${CMD[@]}"
