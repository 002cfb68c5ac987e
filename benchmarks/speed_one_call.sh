#!/usr/bin/env bash
# Every figure of the speed targets that needs no flash-attn, in one device call (flash-attn 4 takes two calls to
# carry, see fa4_pack.sh): the speed levers with the long rollout and both streamed decoders, the warm-up from a cold
# and a warm compile cache, then the CUDA tests. Carry `.whl` and `.golden_gpu`; 325 s on an H100 (2026-12-06). Logs
# and JSON go to $OUT.
#   bash benchmarks/speed_one_call.sh [suffix]      # results named speed_pipeline<suffix>, warmup_pipeline<suffix>
set -uo pipefail
suffix=${1:-}
export PYTHONUNBUFFERED=1
out=${OUT:-runs/device_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv
source benchmarks/device_site.sh
(cd benchmarks && timeout 280 python3 speed.py --long --decode wan_vae_pipeline,taehv --budget-s 240 \
  --name "speed_pipeline$suffix") 2>&1 | tee "$out/speed.log" | tail -45
(cd benchmarks && timeout 170 python3 warmup.py --backend fastest --name "warmup_pipeline$suffix") 2>&1 \
  | tee "$out/warmup.log" | tail -25
SF_GOLDEN_DIR=.golden_gpu timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_gpu.py 2>&1 \
  | tee "$out/tests.log" | tail -25
