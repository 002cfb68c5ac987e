#!/usr/bin/env bash
# Run shapes-world recipe stages on the device machine and bring back what later stages and the repo need.
#   bash benchmarks/device_shapes.sh "stage:seconds:override ... stage:seconds" [extra args for shapes_world.py]
# e.g. "teacher:200:max_steps=1500 ode_pairs:60 ode_init:120:max_steps=800". Each stage gets a time limit; a stage
# stopped by it keeps its latest periodic checkpoint (log_iters), so later stages can still run.
# Wheels for packages the device image lacks are carried in .whl/ (see the device tool's README).
set -uo pipefail
plan=$1; shift
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false SHAPES_OVERRIDES=""
out=${OUT:-/tmp/out}
mkdir -p "$out"
for item in $plan; do
  IFS=: read -r stage limit overrides <<< "$item"
  start=$(date +%s)
  SHAPES_OVERRIDES="${overrides//,/ }" timeout "${limit:-600}" "${PYTHON:-python3}" scripts/shapes_world.py --out runs/shapes \
    --stages "$stage" "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee -a "$out/shapes_log.txt"
  echo "[device] $stage finished or stopped after $(( $(date +%s) - start )) s" | tee -a "$out/shapes_log.txt"
  logs="runs/shapes/$stage/logs"
  last=$(ls -d "$logs"/checkpoint_model_* 2>/dev/null | tail -1)
  if [ -n "$last" ] && [ ! -f "runs/shapes/$stage/generator.safetensors" ]; then  # stopped: keep its latest weights
    cp "$last/generator.safetensors" "runs/shapes/$stage/"
    cp "$last/generator_ema.safetensors" "runs/shapes/$stage/" 2>/dev/null || cp "$last/generator.safetensors" "runs/shapes/$stage/generator_ema.safetensors"
    cp "$last/config.yaml" "runs/shapes/$stage/" 2>/dev/null || true
  fi
  if [ -f "runs/shapes/$stage/generator_ema.safetensors" ]; then
    cp "runs/shapes/$stage/generator_ema.safetensors" "$out/${stage}__generator_ema.safetensors"
    sed "s/^/{\"stage\": \"$stage\", \"m\": /; s/$/}/" "$logs/metrics.jsonl" >> "$out/metrics_all.jsonl"
  fi
done
ls -la "$out"
