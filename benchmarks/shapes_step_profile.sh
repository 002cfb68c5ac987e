#!/usr/bin/env bash
# Where a shapes-world training step goes on a GPU: teacher step eager vs compiled (and a larger batch), and a Self
# Forcing DMD step (random weights stand in for the teacher and the ODE init). JSON per run to $OUT.
set -uo pipefail
export OUT=${OUT:-runs/shapes_step_profile}; out=$OUT; mkdir -p "$out" runs  # train_step.py writes its JSON there
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common="text_encoder_path=assets/shapes_base"
run() { name=$1; shift; python3 benchmarks/train_step.py --name "$name" --steps 20 --warmup 5 --profile-steps 3 "$@" \
          2>&1 | grep -v "it/s\]" | tail -40; }
run shapes_teacher_eager --config_path configs/shapes/teacher.yaml $common compile=false
run shapes_teacher_compiled --config_path configs/shapes/teacher.yaml $common compile=true
run shapes_teacher_compiled_b128 --config_path configs/shapes/teacher.yaml $common compile=true batch_size=128
python3 - <<'PY'
from safetensors.torch import save_file
from utils.config import load_config
from utils.shapes_components import shapes_dit
cfg = load_config("configs/shapes/teacher.yaml", ["text_encoder_path=assets/shapes_base"])
save_file({k: v.contiguous() for k, v in shapes_dit(cfg, None).state_dict().items()}, "runs/random_shapes_dit.safetensors")
PY
run shapes_dmd_eager --config_path configs/shapes/self_forcing_dmd.yaml $common generator_ckpt=runs/random_shapes_dit.safetensors \
    real_score_ckpt=runs/random_shapes_dit.safetensors
