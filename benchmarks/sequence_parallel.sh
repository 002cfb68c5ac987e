#!/usr/bin/env bash
# Issue #9: one video on N GPUs (sequence parallelism) against one GPU of the same machine, same script.
#   bash benchmarks/sequence_parallel.sh [N=2] [tag=h200x2]      # on the nvidia-h200-x2 kind: N=2
#   OUT=runs/sp EXTRA=--tiny bash benchmarks/sequence_parallel.sh 2 cpu   # harness check on CPU (gloo)
# Runs benchmarks/rollout.py four times (1 GPU and N GPUs; 7 blocks with a full cache, 60 blocks with window 21 +
# sink 3 + relative RoPE), then benchmarks/compare_parallel.py writes sequence_parallel_<tag>.json (per-block ms at
# blocks 0..6 and 60, steady per-block ms, warm-up, frames/s, speed-ups; target: steady >= 1.7x on 2 GPUs).
set -euo pipefail
n=${1:-2}
tag=${2:-h200x${n}}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
cd "$(dirname "$0")"
py=${PYTHON:-python3}
extra=${EXTRA:-}
long="--blocks 60 --window 21 --sink 3 --rope relative --repeats 1"
$py rollout.py $extra --name "sp_${tag}_1gpu_7blocks"
$py rollout.py $extra $long --name "sp_${tag}_1gpu_60blocks"
$py -m torch.distributed.run --standalone --nproc_per_node="$n" rollout.py $extra --parallel sequence \
  --name "sp_${tag}_${n}gpu_7blocks"
$py -m torch.distributed.run --standalone --nproc_per_node="$n" rollout.py $extra --parallel sequence $long \
  --name "sp_${tag}_${n}gpu_60blocks"
$py compare_parallel.py --tag "$tag" --gpus "$n"
