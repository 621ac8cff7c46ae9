#!/usr/bin/env bash
# Issue 24's CPU table at one commit, every method side by side in one spft-bench run per shape
# (providers interleaved repeat by repeat, medians): bash bench/results/cpu-issue24-final-2026-12-02/run.sh
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
P="dense-full lora-peft spft-merged-reference spft-split-reference spruft-merged-reference block-merged-reference pst-reference"
uptime > load.txt
for run in 1 2; do
  spft-bench --device cpu --dtype float32 --ops linear_fwd_bwd --providers $P \
    --shape 64 64 --tokens 16 --density 0.05 --repeats 200 --output tiny-$run 2>&1 | tee tiny-$run.log
done
for run in 1 2 3; do
  spft-bench --device cpu --dtype float32 --ops linear_fwd_bwd --providers $P \
    --shape 2048 2048 --tokens 1024 --density 0.01 --repeats 9 --output large-$run 2>&1 | tee large-$run.log
done
uptime >> load.txt
