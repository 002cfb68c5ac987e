#!/usr/bin/env bash
# Real-size runs with RANDOM weights on one GPU (timing and memory do not depend on weight values):
#   1. inference.py at 480x832, 7 blocks (81 frames, official settings) and 60 blocks (--preset long: sink + window +
#      relative RoPE), Wan VAE streaming decode; their stats JSON (per-block ms, time to first frame, frames/s, peak
#      GPU memory) are copied to $OUT;
#   2. Self Forcing DMD training cycles with the 1.3B model as generator, critic and teacher (FSDP2 on one rank,
#      bf16, activation checkpointing): benchmarks/train_cycle.py JSON (s per cycle / step, profile) to $OUT;
#   3. (part train2) the same cycles under torchrun on 2 GPUs (FSDP2 full sharding).
# benchmarks/train_cycle.sh compares the training cycles with the original's.
# The videos themselves (random weights: noise) are not kept.
#   bash benchmarks/gpu_realsize.sh [infer] [train] [train2]        (default: infer train)
set -uo pipefail
export OUT=${OUT:-runs/gpu_realsize}; out=$OUT; root=${WAN_RANDOM_ROOT:-runs/wan_random}; model=$root/Wan2.1-T2V-1.3B
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT  # the noise videos and the prompt file
parts=${*:-infer train}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast
mkdir -p "$out"
[ -f "$model/model_index.json" ] || python3 benchmarks/random_wan_folder.py --out "$model" || exit 1
prompt="a cat walks on the beach at sunset, camera slowly close up"
infer() {
  python3 inference.py --model "$model" --prompt "$prompt" --height 480 --width 832 --num_output_frames 21 \
    --offload-text-encoder --output-dir "$work/infer_7blocks" --overwrite 2>&1 | grep -v "it/s\]"
  cp "$work"/infer_7blocks/stats_*.json "$out/inference_7blocks_stats.json"
  python3 inference.py --model "$model" --preset long --prompt "$prompt" --height 480 --width 832 --total-blocks 60 \
    --offload-text-encoder --output-dir "$work/infer_60blocks" --overwrite 2>&1 | grep -v "it/s\]"
  cp "$work"/infer_60blocks/stats_*.json "$out/inference_60blocks_long_stats.json"
}
# The DMD cycles with the random 1.3B as generator, critic and teacher; UMT5-XXL on the GPU as in the original.
train_steps() {  # launcher...
  "$@" benchmarks/train_cycle.py --model-root "$root" --warmup 1 --cycles ${TRAIN_CYCLES:-2} --profile 2>&1 \
    | grep -v "^\[rank1\]"
}
for part in $parts; do  # in the order given; the whole log also goes to $OUT (a run cut short keeps it)
  echo "== $part $(date +%T)"
  case $part in
    infer) infer ;;
    train) train_steps python3 ;;
    train2) train_steps python3 -m torch.distributed.run --standalone --nproc_per_node=2 ;;
    *) echo "unknown part $part (infer, train, train2)"; exit 2 ;;
  esac
done 2>&1 | tee -a "$out/gpu_realsize_log.txt" | grep -v "^ \|^-\{5\}\|it/s\]"
ls -la "$out"
