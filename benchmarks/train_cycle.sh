#!/usr/bin/env bash
# Self Forcing DMD training cycles on one GPU, this project against the original, in one run on the same card:
#   1. the random real-size Wan2.1-T2V-1.3B folder (benchmarks/random_wan_folder.py) unless it exists;
#   2. ours: benchmarks/train_cycle.py (train.py's trainer; 1.3B generator, critic and teacher, UMT5-XXL on the GPU);
#   3. the original: benchmarks/original_train_cycle.py driving its own trainer from a checkout of
#      github.com/guandeh17/Self-Forcing (git-ignored, default .original/Self-Forcing), random init, stub text encoder;
#   4. a comparison (ours / original per cycle, per step, peak memory);
#   5. (part long) ours with long self-rollouts at 3x the horizon (63 latent frames, the loss on a 21-frame window,
#      rolling cache of 21 with a 3-frame sink, relative RoPE): train_cycle_long_<gpu>.json, beside ours' standard step.
# Each part is time-boxed so that the whole stays within BUDGET_S; every JSON is rewritten after each cycle and the
# logs go to $OUT as they come, so a part cut short keeps the cycles it finished.
#   bash benchmarks/train_cycle.sh [ours] [original] [long]      (default: ours original)
# Environment: OUT (runs/train_cycle), WAN_RANDOM_ROOT (runs/wan_random), ORIGINAL_DIR (.original/Self-Forcing),
#   WARMUP (1), CYCLES (2), PROFILE (1: one more cycle under torch.profiler), BUDGET_S (540), PYTHON (python3),
#   OURS_ARGS (key=value overrides of our recipe, e.g. "compile=true").
set -uo pipefail
started=$(date +%s)
export OUT=${OUT:-runs/train_cycle}; root=${WAN_RANDOM_ROOT:-runs/wan_random}; model=$root/Wan2.1-T2V-1.3B
original=${ORIGINAL_DIR:-.original/Self-Forcing}; py=${PYTHON:-python3}
warmup=${WARMUP:-1}; cycles=${CYCLES:-2}; budget=${BUDGET_S:-540}
profile=(); [ "${PROFILE:-1}" = 1 ] && profile=(--profile)
parts=${*:-ours original}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NCCL_NVLS_ENABLE=0
mkdir -p "$OUT"
log=$OUT/train_cycle_log.txt
left() { echo $(( budget - ($(date +%s) - started) )); }
boxed() {  # seconds, name, command...: run with a time limit, the output to the log and the terminal
  local seconds=$1 name=$2; shift 2
  if [ "$seconds" -lt 30 ]; then echo "== $name skipped: ${seconds} s left of BUDGET_S=$budget" | tee -a "$log"; return 1; fi
  echo "== $name $(date +%T) (at most ${seconds} s)" | tee -a "$log"
  timeout -k 10 "$seconds" "$@" 2>&1 | tee -a "$log" | grep -v "^ \|^-\{5\}\|UserWarning\|warnings.warn\|_init_core_state"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "== $name stopped at its time limit (the JSON holds the cycles it finished)" | tee -a "$log"
  return 0
}
if [ ! -f "$model/model_index.json" ]; then
  boxed "$(left)" "random folder" "$py" benchmarks/random_wan_folder.py --out "$model" || exit 1
fi
set -- $parts
for part in "$@"; do
  # The first part gets its share of what is left; the last part all of it.
  remaining=$(left); share=$remaining; [ "$part" != "${!#}" ] && share=$(( remaining / 2 ))
  case $part in
    ours) boxed "$share" ours "$py" benchmarks/train_cycle.py --model-root "$root" --warmup "$warmup" \
            --cycles "$cycles" "${profile[@]}" ${OURS_ARGS:-} ;;
    original)
      if [ ! -f "$original/trainer/distillation.py" ]; then
        echo "== original skipped: no checkout at $original (ORIGINAL_DIR)" | tee -a "$log"; continue
      fi
      boxed "$share" original "$py" benchmarks/original_train_cycle.py --original-dir "$original" \
        --warmup "$warmup" --cycles "$cycles" "${profile[@]}" ;;
    long) boxed "$share" long "$py" benchmarks/train_cycle.py --model-root "$root" --warmup "$warmup" \
            --cycles "$cycles" --prefix train_cycle_long rollout.rollout_frames=63 rollout.rollout_cache=inference \
            rollout.rollout_window=latest rollout.local_attn_size=21 rollout.sink_size=3 rollout.rope=relative \
            ${OURS_ARGS:-} ;;
    *) echo "unknown part $part (ours, original, long)"; exit 2 ;;
  esac
done
ours_json=$(ls -t "$OUT"/train_cycle_*.json 2>/dev/null | grep -v "tiny\|_long_" | head -1)  # the newest: this run's
original_json=$(ls -t "$OUT"/original_train_cycle_*.json 2>/dev/null | grep -v tiny | head -1)
if [ -n "$ours_json" ] && [ -n "$original_json" ]; then
  "$py" benchmarks/cycle_report.py "$ours_json" "$original_json" | tee -a "$log"
fi
ls -la "$OUT"
