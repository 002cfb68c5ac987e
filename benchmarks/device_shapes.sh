#!/usr/bin/env bash
# Run the shapes-world recipe on a GPU machine, time-boxed, with independent stages sharing the GPU, and bring back
# what later stages and the repository need (the models are small: one process leaves most of an H100 idle).
#
#   bash benchmarks/device_shapes.sh "PHASE PHASE ..."
#   PHASE = LANE+LANE+...   lanes of a phase run in parallel; phases run one after another
#   LANE  = [gN=]STAGE>STAGE>... stages of a lane run one after another (gN=: on GPU N alone, of several)
#   STAGE = name[:seconds[:key=value,key=value]]   seconds -> time_limit_s (training time; the stage then checkpoints);
#           the key nproc=N trains the stage on N GPUs (torchrun; batch_size is per GPU)
# e.g. "base teacher:240 ode_pairs>ode_init:80+teacher_forcing:200+diffusion_forcing:200 dmd:170+sid:170"
# STAGE eval[:seconds[:teacher/dmd/...[@1/3/10]]] scores those finished stages on the GPU (scripts/evaluate_shapes.py)
# at the lengths after @ (default 1x) into $OUT/eval_<stages>.json, SHAPES_EVAL_PROMPTS (16) prompts per split,
# SHAPES_EVAL_TEACHER_STEPS (24) teacher steps: e.g. check the teacher before distilling, or the final table.
# STAGE wait:NAME[:seconds] waits until stage NAME has finished (its generator.safetensors exists), so a lane can
# start on a stage that another lane of the same phase produces (e.g. sid after ode_init, beside dmd).
# Runs in the background too: `setsid bash benchmarks/device_shapes.sh PLAN &` with OUT unset writes to
# runs/device_out and touches runs/device_out/DONE at the end (benchmarks/device_watch.sh follows it).
#
# Brings back to $OUT: every finished stage's generator EMA in bf16, its config and metrics, and the evaluations, as
# shapes_runs.tar split in 15 MB parts (shapes_runs.tar.part-aa, -ab, ...; `cat` them back together), and the log. $OUT takes at most 8 files
# and 64 MB (~7 stages of the full-size model): SHAPES_BRING=dmd,sid,... limits the weights to those stages.
# (benchmarks/device_step.sh brings the fp32 stages a later run starts from.)
# SHAPES_SIZE=smoke runs the CI-sized recipe (to check this script on a CPU).
# Wheels for packages the device image lacks are carried in .whl/ (see the device tool's README).
set -uo pipefail
plan=$1; shift
source benchmarks/device_site.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Several host-bound stages share the machine: a few threads each, not one per core each.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation when shared
out=${OUT:-runs/device_out}; runs=${SHAPES_RUNS:-runs/shapes}; log="$out/shapes_log.txt"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT  # the pack before it is split into $OUT
mkdir -p "$out" "$runs"; rm -f "$out/DONE"

run_stage() {  # name[:seconds[:overrides]]
  local name limit overrides extra start
  IFS=: read -r name limit overrides <<< "$1"
  if [ "$name" = eval ]; then
    local which="${overrides%%@*}" lengths=1 stages
    [[ "$overrides" == *@* ]] && lengths="${overrides#*@}"
    lengths="${lengths//\//,}"; stages=""
    for stage in ${which//\// }; do  # a stage that failed earlier (e.g. out of memory) must not sink the others
      if [ -f "$runs/$stage/config.yaml" ] && [ -f "$runs/$stage/generator_ema.safetensors" ]; then
        stages="${stages:+$stages,}$stage"
      else
        echo "[eval] $stage did not finish; not evaluated" | tee -a "$log"
      fi
    done
    [ -z "$stages" ] && [ -n "$which" ] && return
    which="${which//\//_}"
    timeout "${limit:-300}" python3 scripts/evaluate_shapes.py --run "$runs" ${stages:+--stages "$stages"} \
      --lengths "$lengths" --num-prompts "${SHAPES_EVAL_PROMPTS:-16}" --batch-size "${SHAPES_EVAL_PROMPTS:-16}" \
      --teacher-steps "${SHAPES_EVAL_TEACHER_STEPS:-24}" --output "$out/eval_${which:-all}.json" 2>&1 \
      | sed -u "s/^/[eval] /" >> "$log"
    tail -12 "$log" | grep "^\[eval\]"
    return
  fi
  if [ "$name" = wait ]; then  # wait:STAGE[:seconds]
    local waited=0
    until [ -f "$runs/$limit/generator_ema.safetensors" ] || [ "$waited" -ge "${overrides:-900}" ]; do
      sleep 5; waited=$(( waited + 5 ))
    done
    sleep 5  # the stage copies its files one after another
    echo "[device] waited ${waited} s for $limit" | tee -a "$log"
    return
  fi
  local launch=(python3) item
  extra=""
  for item in ${overrides//,/ }; do
    if [[ $item == nproc=* ]]; then
      launch=(python3 -m torch.distributed.run --standalone --nproc_per_node="${item#nproc=}")
    else
      extra="$extra $item"
    fi
  done
  [ -n "$limit" ] && extra="time_limit_s=$limit $extra"
  start=$(date +%s)
  # A hard stop well past the training time limit, in case a stage hangs (compile, data).
  SHAPES_OVERRIDES="$extra" timeout $(( ${limit:-300} + 150 )) "${launch[@]}" scripts/shapes_world.py --out "$runs" \
    --stages "$name" --size "${SHAPES_SIZE:-full}" 2>&1 | grep --line-buffered -v "it/s\]" | sed -u "s/^/[$name] /" >> "$log"
  echo "[device] $name ended after $(( $(date +%s) - start )) s" | tee -a "$log"
}

run_lane() {  # runs in its own subshell: the GPU it picks is its own
  local stage lane=$1
  if [[ $lane =~ ^g([0-9]+)=(.*)$ ]]; then export CUDA_VISIBLE_DEVICES=${BASH_REMATCH[1]}; lane=${BASH_REMATCH[2]}; fi
  IFS='>' read -ra stages <<< "$lane"
  for stage in "${stages[@]}"; do run_stage "$stage"; done
}

for phase in $plan; do
  IFS='+' read -ra lanes <<< "$phase"
  for lane in "${lanes[@]}"; do run_lane "$lane" & done
  wait
done

python3 - "$runs" "${SHAPES_BRING:-}" "$work" "$out" <<'PY'
import sys, tarfile
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
runs = Path(sys.argv[1]); bring = {s for s in sys.argv[2].split(",") if s}
pack = Path(sys.argv[3]) / "shapes_pack"; pack.mkdir()
for evaluation in Path(sys.argv[4]).glob("eval_*.json"):  # into the pack: $OUT takes 8 files
    evaluation.rename(pack / evaluation.name)
for stage in sorted(p for p in runs.iterdir() if p.is_dir()):
    ema = stage / "generator_ema.safetensors"
    if ema.is_file() and (not bring or stage.name in bring):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(ema).items()}, pack / f"{stage.name}.safetensors")
    for metrics in (stage / "logs").glob("metrics*.jsonl"):
        (pack / f"{stage.name}_{metrics.name}").write_bytes(metrics.read_bytes())
    for name in ("config.yaml",):
        if (stage / name).is_file():
            (pack / f"{stage.name}_{name}").write_bytes((stage / name).read_bytes())
with tarfile.open(Path(sys.argv[3]) / "shapes_runs.tar", "w") as tar:
    tar.add(pack, arcname="shapes_runs")
print("packed", sorted(p.name for p in pack.iterdir()))
PY
split -b 15M "$work/shapes_runs.tar" "$out/shapes_runs.tar.part-"
ls -la "$out"
touch "$out/DONE"
