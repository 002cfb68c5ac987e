#!/usr/bin/env bash
# Follow a background shapes-world run (benchmarks/device_shapes.sh started with setsid) across device calls.
#
#   bash benchmarks/device_watch.sh SECONDS [FILE ...]
#
# Prints the run's new log lines (training progress bars left out) until it has finished (runs/device_out/DONE) or
# SECONDS have passed, then copies the FILEs that exist (and, once finished, everything in runs/device_out) to $OUT.
# A device call returns after each watch; the next call must come within the machine's idle time or the run is lost,
# so files worth keeping early (e.g. the teacher) are named here.
set -uo pipefail
limit=$1; shift
src=runs/device_out; log=$src/shapes_log.txt; out=${OUT:-runs/watch_out}; mkdir -p "$out"
seen=0; start=$(date +%s)
while :; do
  if [ -f "$log" ]; then
    total=$(wc -l < "$log")
    [ "$total" -gt "$seen" ] && sed -n "$(( seen + 1 )),${total}p" "$log" | grep -v "it/s\]" | cut -c1-240
    seen=$total
  fi
  [ -f "$src/DONE" ] && break
  [ $(( $(date +%s) - start )) -ge "$limit" ] && break
  sleep 10
done
for f in "$@"; do [ -f "$f" ] && cp "$f" "$out/"; done
if [ -f "$src/DONE" ]; then find "$src" -maxdepth 1 -type f ! -name DONE -exec cp {} "$out/" \;; echo "[watch] run finished"; else echo "[watch] still running"; fi
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
ls -la "$out"
