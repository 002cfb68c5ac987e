#!/usr/bin/env bash
# One command for every device call of a shapes-world run: starts the plan in the background, or follows it if it is
# already running, and keeps the expensive stages safe against losing the machine between calls.
#
#   bash benchmarks/device_step.sh PLAN_FILE SECONDS        (carry .whl, and .shapes_carry once it holds files)
#
# - Finished (runs/device_out/DONE): copies the results to $OUT (benchmarks/device_watch.sh).
# - No run alive (first call, or a fresh machine after the last one went back): unpacks .shapes_carry/keep.tar.part-*
#   into runs/shapes if present (stages found there are skipped: scripts/shapes_world.py resumes), then starts
#   benchmarks/device_shapes.sh with the plan's phases (its lines not starting with #), in its own session.
# - Then follows the log for SECONDS and, unless finished, packs the finished SHAPES_KEEP stages (default teacher,
#   ode_init: the ones later stages start from) as $OUT/keep.tar.part-* (fp32, 15 MB parts). Put the parts of the
#   newest call into .shapes_carry/ before the next call: if the machine was lost meanwhile, the run resumes from them.
# Environment for the run (SHAPES_EVAL_PROMPTS, SHAPES_BRING_FP32, ...) is passed on as set.
set -uo pipefail
plan_file=$1; limit=$2
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
site="${TMPDIR:-/tmp}/sf-site"
if compgen -G ".whl/*.whl" > /dev/null && [ ! -d "$site" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
[ -d "$site" ] && export PYTHONPATH="$site:${PYTHONPATH:-}"
runs=${SHAPES_RUNS:-runs/shapes}; keep=${SHAPES_KEEP:-teacher,ode_init}
alive() { [ -f runs/daemon.pid ] && kill -0 "$(cat runs/daemon.pid)" 2> /dev/null; }

if [ ! -f runs/device_out/DONE ] && ! alive; then
  mkdir -p "$runs"
  if compgen -G ".shapes_carry/keep.tar.part-*" > /dev/null; then
    cat .shapes_carry/keep.tar.part-* | tar x -C "$runs" && echo "[step] resumed from: $(ls "$runs" | tr '\n' ' ')"
    for stage in "$runs"/*/; do  # the file that marks a finished stage (the teacher's own is not needed later)
      [ -f "$stage/generator.safetensors" ] || cp "$stage/generator_ema.safetensors" "$stage/generator.safetensors"
    done
  fi
  rm -rf runs/device_out
  plan=$(grep -v '^#' "$plan_file")
  OUT= SHAPES_RUNS="$runs" setsid nohup bash benchmarks/device_shapes.sh "$plan" > runs/daemon.log 2>&1 < /dev/null &
  echo $! > runs/daemon.pid
  echo "[step] started $plan_file (pid $(cat runs/daemon.pid))"
  sleep 5
fi
bash benchmarks/device_watch.sh $(( limit - SECONDS > 10 ? limit - SECONDS : 10 ))
if [ ! -f runs/device_out/DONE ]; then
  files=()
  for stage in ${keep//,/ }; do
    [ -f "$runs/$stage/generator_ema.safetensors" ] || continue
    files+=("$stage/generator_ema.safetensors")
    [ "$stage" != teacher ] && [ -f "$runs/$stage/generator.safetensors" ] && files+=("$stage/generator.safetensors")
    for f in config.yaml config.json; do [ -f "$runs/$stage/$f" ] && files+=("$stage/$f"); done
  done
  if [ ${#files[@]} -gt 0 ]; then
    tar c -C "$runs" "${files[@]}" | split -b 15M - "${OUT:-runs/watch_out}/keep.tar.part-"
    echo "[step] kept for a resume: ${files[*]}"
  fi
fi
