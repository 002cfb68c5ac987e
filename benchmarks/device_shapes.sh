#!/usr/bin/env bash
# Run shapes-world recipe stages on the device machine and bring back what later stages and the repo need.
#   bash benchmarks/device_shapes.sh STAGES [extra args for scripts/shapes_world.py]
# Wheels for packages the device image lacks are carried in .whl/ (see the device tool's README).
set -euo pipefail
stages=$1; shift
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-/tmp/out}
mkdir -p "$out"
# One stage at a time, copying its result at once: a run stopped at the time limit still returns what finished.
# At most 8 files come back: one weights file per stage (the EMA; a copy of the weights where EMA is off) + logs.
for stage in ${stages//,/ }; do
  python3 scripts/shapes_world.py --out runs/shapes --stages "$stage" "$@" 2>&1 | grep -v "it/s\]" | tee -a "$out/shapes_log.txt"
  if [ -f "runs/shapes/$stage/generator_ema.safetensors" ]; then
    cp "runs/shapes/$stage/generator_ema.safetensors" "$out/${stage}__generator_ema.safetensors"
    sed "s/^/{\"stage\": \"$stage\", \"m\": /; s/$/}/" "runs/shapes/$stage/logs/metrics.jsonl" >> "$out/metrics_all.jsonl"
  fi
done
ls -la "$out"
