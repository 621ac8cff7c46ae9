#!/bin/bash
# Before (main at 75d90ee, exported to $BASE) and after (this branch), the same command, taking
# turns twice: bash bench/results/cpu-host-overhead-2026-12-02/run.sh /path/to/base-tree
BASE=$1
OUT=bench/results/cpu-host-overhead-2026-12-02
export OMP_NUM_THREADS=1
BENCH=/work/main/.venv/bin/spft-bench
ARGS="--device cpu --shape 64 64 --tokens 16 --density 0.05 --dtype float32 --providers lora-peft spft-merged-reference spft-split-reference spruft-merged-reference block-merged-reference pst-reference --ops linear_fwd_bwd --repeats 200"
for round in 1 2; do
  uptime >> $OUT/load.txt
  PYTHONPATH=$BASE $BENCH $ARGS --output $OUT/before-$round > $OUT/before-$round.log 2>&1
  uptime >> $OUT/load.txt
  PYTHONPATH=$PWD $BENCH $ARGS --output $OUT/after-$round > $OUT/after-$round.log 2>&1
done
uptime >> $OUT/load.txt
