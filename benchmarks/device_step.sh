#!/usr/bin/env bash
# One command for every device call of a shapes-world run: starts the plan in the background, or follows it if it is
# already running, and keeps the expensive stages safe against losing the machine between calls.
#
#   bash benchmarks/device_step.sh PLAN_FILE SECONDS        (carry .whl, and .shapes_carry once it holds files)
#
# - Finished (runs/device_out/DONE): copies the results to $OUT (benchmarks/device_watch.sh).
# - No run alive (first call, or a fresh machine after the last one went back): unpacks every .shapes_carry/keep-*.tar
#   (in 15 MB parts) into runs/shapes (stages found there are skipped: scripts/shapes_world.py resumes), then starts
#   benchmarks/device_shapes.sh with the plan's phases (its lines not starting with #), in its own session.
# - Then follows the log for SECONDS and packs the finished SHAPES_KEEP stages (default teacher, ode_init: the ones
#   later stages start from) that this machine trained as $OUT/keep-<time>.tar.part-* (fp32). Add them to
#   .shapes_carry/ (keeping the earlier ones) before the next call: if the machine was lost meanwhile, the run
#   resumes from them; once the run has finished, they are what a later plan (e.g. part 2 of a recipe split over two
#   sessions) starts from.
# SHAPES_TEACHER_INIT=FOLDER (e.g. benchmarks/carry/shapes_teacher_attempt8): a fresh run folder gets it as
# teacher_init/, so the teacher stage continues that teacher instead of starting from random weights.
# Environment for the run (SHAPES_EVAL_PROMPTS, SHAPES_EVAL_TEACHER_STEPS, ...) is passed on as set.
set -uo pipefail
plan_file=$1; limit=$2
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
source benchmarks/device_site.sh
runs=${SHAPES_RUNS:-runs/shapes}; keep=${SHAPES_KEEP:-teacher,ode_init}
packs() { ls .shapes_carry/keep-*.tar.part-aa 2> /dev/null | sed 's/\.part-aa$//' | sort; }
alive() { [ -f runs/daemon.pid ] && kill -0 "$(cat runs/daemon.pid)" 2> /dev/null; }

if [ ! -f runs/device_out/DONE ] && ! alive; then
  mkdir -p "$runs"
  for pack in $(packs); do  # oldest first: a stage kept again later wins
    cat "$pack".part-* | tar x -C "$runs" || exit 1
  done
  # A teacher from an earlier session to continue (scripts/shapes_world.py: teacher starts from teacher_init).
  if [ -n "${SHAPES_TEACHER_INIT:-}" ] && [ ! -d "$runs/teacher_init" ]; then
    [ -f "$SHAPES_TEACHER_INIT/generator_ema.safetensors" ] \
      || { echo "[step] SHAPES_TEACHER_INIT=$SHAPES_TEACHER_INIT has no generator_ema.safetensors" >&2; exit 1; }
    mkdir -p "$runs/teacher_init" || exit 1
    for f in generator_ema.safetensors config.yaml config.json; do
      [ -f "$SHAPES_TEACHER_INIT/$f" ] && { cp "$SHAPES_TEACHER_INIT/$f" "$runs/teacher_init/" || exit 1; }
    done
    echo "[step] teacher_init: $SHAPES_TEACHER_INIT"
  fi
  for stage in "$runs"/*/; do  # the file that marks a finished stage (the teacher's own is not needed later)
    [ -f "$stage/generator_ema.safetensors" ] && [ ! -f "$stage/generator.safetensors" ] \
      && cp "$stage/generator_ema.safetensors" "$stage/generator.safetensors"
  done
  [ -n "$(packs)" ] && echo "[step] resumed from: $(ls "$runs" | tr '\n' ' ')"
  rm -rf runs/device_out
  plan=$(grep -v '^#' "$plan_file")
  OUT= SHAPES_RUNS="$runs" setsid nohup bash benchmarks/device_shapes.sh "$plan" > runs/daemon.log 2>&1 < /dev/null &
  echo $! > runs/daemon.pid
  echo "[step] started $plan_file (pid $(cat runs/daemon.pid))"
  sleep 5
fi
bash benchmarks/device_watch.sh $(( limit - SECONDS > 10 ? limit - SECONDS : 10 ))
# Keep the SHAPES_KEEP stages this machine trained (not those it was given): to resume from, or to start part 2 from.
given=$(for pack in $(packs); do cat "$pack".part-* | tar t; done 2> /dev/null | cut -d/ -f1 | sort -u)
files=()
for stage in ${keep//,/ }; do
  [ -f "$runs/$stage/generator_ema.safetensors" ] || continue
  grep -qx "$stage" <<< "$given" && continue
  files+=("$stage/generator_ema.safetensors")
  [ "$stage" != teacher ] && [ -f "$runs/$stage/generator.safetensors" ] && files+=("$stage/generator.safetensors")
  for f in config.yaml config.json; do [ -f "$runs/$stage/$f" ] && files+=("$stage/$f"); done
done
if [ ${#files[@]} -gt 0 ]; then
  tar c -C "$runs" "${files[@]}" | split -b 15M - "${OUT:-runs/watch_out}/keep-$(date +%s).tar.part-"
  echo "[step] kept (fp32): ${files[*]}"
fi
