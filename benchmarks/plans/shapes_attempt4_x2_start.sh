#!/usr/bin/env bash
# Call 1 of benchmarks/plans/shapes_attempt4_x2.txt: a 40-step probe of the two-GPU compiled teacher (a failure there
# must not cost the whole run: the plan then trains without compile), the background run, the random 1.3B folder for
# #4's training runs (while the teacher trains), then follow the run until the call's time is nearly up.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
site=/tmp/sf-site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl
export PYTHONPATH=$site
rm -rf runs/shapes runs/device_out runs/probe; mkdir -p runs
plan=$(grep -v '^#' benchmarks/plans/shapes_attempt4_x2.txt)
SHAPES_OVERRIDES="max_steps=40 log_every=10 compile=true" timeout 240 python3 -m torch.distributed.run --standalone \
  --nproc_per_node=2 scripts/shapes_world.py --out runs/probe --stages base,teacher 2>&1 | grep -v "it/s\]" | tail -8
if [ ! -f runs/probe/teacher/generator.safetensors ]; then
  echo "[start] two-GPU compiled teacher failed: training without compile"; plan=${plan//compile=true,/}
fi
grep -h iter_time runs/probe/teacher/logs/metrics*.jsonl 2>/dev/null | tail -2 | cut -c1-300
export SHAPES_EVAL_PROMPTS=64 SHAPES_EVAL_TEACHER_STEPS=48 SHAPES_BRING_FP32=teacher,ode_init
OUT= setsid nohup bash benchmarks/device_shapes.sh "$plan" > runs/daemon.log 2>&1 < /dev/null &
sleep 2
python3 benchmarks/random_wan_folder.py --out runs/wan_random/Wan2.1-T2V-1.3B 2>&1 | tail -2
bash benchmarks/device_watch.sh $(( ${1:-560} - SECONDS ))
