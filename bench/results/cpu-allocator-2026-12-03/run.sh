#!/usr/bin/env bash
# Entries merged/split against peft LoRA at 2048x2048, 1,024 tokens, 1% (issue 24's 0.95x / 1.05x
# targets), with glibc's default allocator and with its mmap and trim thresholds raised (freed
# buffers kept in the heap, so a fresh 8 MiB temporary does not fault its pages in again), the
# two taking turns, 3 runs each: bash bench/results/cpu-allocator-2026-12-03/run.sh
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
P="lora-peft spft-merged-reference spft-split-reference"
uptime > load.txt
for run in 1 2 3; do
  for cfg in default kept; do
    if [ $cfg = kept ]; then export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
    else unset MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_; fi
    spft-bench --device cpu --dtype float32 --ops linear_fwd_bwd --providers $P \
      --shape 2048 2048 --tokens 1024 --density 0.01 --repeats 9 --output $cfg-$run > $cfg-$run.log 2>&1
    grep -E "merged|split" $cfg-$run.log | head -4 | sed "s/^/$cfg-$run: /"
  done
done
uptime >> load.txt
