#!/usr/bin/env bash
# Device experiment: does training some steps frame-causally give the bidirectional shapes teacher an arrow of time,
# so that it follows the SIGN of the prompted direction (attempt 7's follows its axis and speed only)?
#
#   bash benchmarks/arrow_of_time.sh SECONDS FRACTION [FRACTION ...]        (carry .whl)
#
# Every FRACTION (`frame_causal_fraction`; 0 is the control) continues a teacher (ARROW_INIT, a folder with
# generator_ema.safetensors; default the newest committed one, benchmarks/carry/shapes_teacher_attempt8; the recorded
# run, benchmarks/results/shapes_arrow_of_time_h100.json, started from attempt 7's, in git before 2026-12-06) for
# SECONDS of training, compiled, all side by side on one GPU; then
# each is probed (scripts/probe_shapes_teacher.py: how far reversing the prompt's direction moves the x0
# prediction, and whether a clip reversed in time is harder than the clip) and evaluated (teacher stage, 64
# held-in and held-out prompts: direction_accuracy). To $OUT: arrow_f<FRACTION>/{eval,probe}.json, the logs, and the
# teacher in bf16 (what benchmarks/carry/ takes). A CPU smoke of the script:
#   ARROW_EXTRA="compile=false batch_size=8" ARROW_PROMPTS=4 ARROW_STEPS=4 bash benchmarks/arrow_of_time.sh 20 0.5
set -uo pipefail
seconds=$1; shift
export PYTHONUNBUFFERED=1
source benchmarks/device_site.sh
out=${OUT:-runs/arrow_out}; mkdir -p "$out"
init=${ARROW_INIT:-benchmarks/carry/shapes_teacher_attempt8}
for frac in "$@"; do
  run=runs/arrow/f$frac; mkdir -p "$run/teacher_init" "$out/arrow_f$frac"
  cp "$init"/* "$run/teacher_init/"
  SHAPES_OVERRIDES="compile=true lr_warmup_steps=100 ema_start_step=0 ema_weight=0.995 max_steps=1000000 time_limit_s=$seconds \
frame_causal_fraction=$frac ${ARROW_EXTRA:-}" python3 scripts/shapes_world.py --out "$run" --stages base,teacher \
    > "$out/arrow_f$frac/train.log" 2>&1 &
done
wait
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2> /dev/null
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
  run=runs/arrow/f$frac; dst=$out/arrow_f$frac
  echo "== frame_causal_fraction $frac"; cat "$dst/probe.log" | grep -v Loading
  python3 - "$run" "$dst" <<'EOF'
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
run, dst = Path(sys.argv[1]), Path(sys.argv[2])
for r in json.loads((dst / "eval.json").read_text())["results"]:
    if r["stage"] == "teacher":
        print(r["split"], {k: round(r[k], 3) for k in ("attribute_accuracy", "direction_accuracy", "speed_accuracy",
                                                      "shape_accuracy", "velocity_match")})
teacher = dst / "teacher"
teacher.mkdir(exist_ok=True)
state = load_file(str(run / "teacher" / "generator_ema.safetensors"))
save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(teacher / "generator_ema.safetensors"))
for name in ("config.yaml", "config.json"):
    if (run / "teacher" / name).is_file():
        (teacher / name).write_bytes((run / "teacher" / name).read_bytes())
EOF
done
