#!/usr/bin/env bash
# The user's path on one GPU, in one command: random real-size model folders (UMT5-XXL with 2 of its 24 layers for the
# timed sections, all 24 for the memory of the text encoder on the GPU), then benchmarks/user_path.py, which runs
# inference.py itself for every section and writes user_path_<gpu>.json and its log to $OUT.
#   bash benchmarks/user_path.sh [extra user_path.py arguments]     # USER_PATH_SECONDS: the whole time box (570)
# Needs the project's requirements installed (`pip install -e .`) and a CUDA build of torch.
set -uo pipefail
export OUT=${OUT:-runs/user_path_out} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
root=${WAN_RANDOM_ROOT:-runs/wan_random}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
start=$(date +%s)
for layers in 2 24; do
  [ -f "$root/t5x$layers/model_index.json" ] ||
    python3 benchmarks/random_wan_folder.py --out "$root/t5x$layers" --t5-layers $layers || exit 1
done
left=$((${USER_PATH_SECONDS:-570} - $(date +%s) + start))
echo "model folders ready after $(( $(date +%s) - start )) s; ${left} s left for the sections"
timeout "$left" python3 benchmarks/user_path.py --model "$root/t5x2" --model-full-t5 "$root/t5x24" \
  --work-dir runs/user_path_work --budget-s $((left - 20)) "$@" 2>&1 | tee "$OUT/user_path_log.txt" | tail -40
