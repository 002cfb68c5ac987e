#!/usr/bin/env bash
# Does training a fraction of the shapes teacher's steps frame-causally (`frame_causal_fraction`) make the
# bidirectional teacher follow the SIGN of the prompted direction, not only its axis and speed?
#
#   bash benchmarks/arrow_of_time.sh TEACHER_DIR SECONDS FRACTION [FRACTION ...]
#
# TEACHER_DIR holds a trained shapes teacher (generator_ema.safetensors, e.g. runs/shapes/teacher of
# scripts/shapes_world.py). Every FRACTION (0 is the control) continues it for SECONDS of compiled training, all side
# by side on one GPU; then each is probed (scripts/probe_shapes_teacher.py: how far reversing the prompt's direction
# moves the x0 prediction, and whether a clip reversed in time is harder than the clip) and evaluated (teacher stage,
# held-in and held-out prompts: direction_accuracy). Writes arrow_f<FRACTION>/{train,eval,probe}.{log,json} to $OUT.
# The recorded run is benchmarks/results/shapes_arrow_of_time_h100.json. A CPU smoke of the script:
#   ARROW_EXTRA="compile=false batch_size=8" ARROW_PROMPTS=4 ARROW_STEPS=4 bash benchmarks/arrow_of_time.sh DIR 20 0.5
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: $0 TEACHER_DIR SECONDS FRACTION [FRACTION ...]" >&2; exit 2; }
init=$1; seconds=$2; shift 2
[ -f "$init/generator_ema.safetensors" ] || { echo "$init has no generator_ema.safetensors" >&2; exit 2; }
export PYTHONUNBUFFERED=1
out=${OUT:-runs/arrow_out}; mkdir -p "$out"
for frac in "$@"; do
  run=runs/arrow/f$frac; mkdir -p "$run/teacher_init" "$out/arrow_f$frac"
  cp "$init"/* "$run/teacher_init/"   # scripts/shapes_world.py continues the teacher found in teacher_init/
  SHAPES_OVERRIDES="compile=true lr_warmup_steps=100 ema_start_step=0 ema_weight=0.995 max_steps=1000000 \
time_limit_s=$seconds frame_causal_fraction=$frac ${ARROW_EXTRA:-}" \
    python3 scripts/shapes_world.py --out "$run" --stages base,teacher > "$out/arrow_f$frac/train.log" 2>&1 &
done
wait
for frac in "$@"; do
  run=runs/arrow/f$frac; dst=$out/arrow_f$frac
  grep -v "it/s\]" "$dst/train.log" | tail -5
  python3 scripts/evaluate_shapes.py --run "$run" --stages teacher --lengths 1 --batch-size 64 \
    --num-prompts "${ARROW_PROMPTS:-64}" --teacher-steps "${ARROW_STEPS:-48}" \
    --output "$dst/eval.json" > "$dst/eval.log" 2>&1 &
  python3 scripts/probe_shapes_teacher.py --run "$run" --output "$dst/probe.json" > "$dst/probe.log" 2>&1 &
done
wait
for frac in "$@"; do
  dst=$out/arrow_f$frac
  echo "== frame_causal_fraction $frac"; grep -v Loading "$dst/probe.log"
  python3 - "$dst/eval.json" <<'PY'
import json, sys
for r in json.loads(open(sys.argv[1]).read())["results"]:
    if r["stage"] == "teacher":
        print(r["split"], {k: round(r[k], 3) for k in ("attribute_accuracy", "direction_accuracy", "speed_accuracy",
                                                      "shape_accuracy", "velocity_match")})
PY
done
