#!/usr/bin/env bash
# Packs FlashAttention-4 (the CuTe-DSL flash-attn, whose Hopper forward is FA3's kernel) for the device machines,
# which reach no package index and take at most 64 MiB a call, the working tree (~18 MB) included. Its CUDA-13
# runtime wheel is 92 MB; unpacked and re-compressed with xz it is ~64 MB, split here into two ~32 MB parts:
#   bash benchmarks/fa4_pack.sh            # -> .fa4/small/*.whl (~10 MB) and .fa4/big/cu13.tar.xz.part-a{a,b}
# Then two back-to-back calls on one warm machine (a carried path replaces the ignored files of its folder there, so
#   fa4_site.sh stashes what each call brings outside the tree):
#   call 1: carry [".fa4/small", ".fa4/big/cu13.tar.xz.part-aa"], command `source benchmarks/fa4_site.sh` (stashes them)
#   call 2: carry [".whl", ".fa4/big/cu13.tar.xz.part-ab"], command starting
#           `source benchmarks/device_site.sh; source benchmarks/fa4_site.sh;`
# xz takes ~3 minutes on two cores. Versions are pinned: the ones this was put together with.
set -euo pipefail
out=${1:-.fa4}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
flags=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
       --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
rm -rf "$out"
mkdir -p "$out/small" "$out/big"
python3 -m pip download -q "${flags[@]}" -d "$out/small" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 \
  torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
python3 -m pip download -q "${flags[@]}" -d "$work" nvidia-cutlass-dsl-libs-cu13==4.8.1
mkdir "$work/tree"
python3 -m zipfile -e "$work"/nvidia_cutlass_dsl_libs_cu13-*.whl "$work/tree"
tar -C "$work/tree" -cf - . | xz -T0 -9 | split -b 32m - "$out/big/cu13.tar.xz.part-"
du -sh "$out/small" "$out"/big/*
