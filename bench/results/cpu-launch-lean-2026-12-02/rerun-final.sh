#!/bin/bash
# The layer and host-overhead cases again with the branch's final code (after run.sh):
# bash bench/results/cpu-launch-lean-2026-12-02/rerun-final.sh
OUT=bench/results/cpu-launch-lean-2026-12-02
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
BENCH=/work/main/.venv/bin/spft-bench
LAYER="dense-frozen dense-full lora-peft spft-merged-reference spft-split-reference spruft-merged-reference block-merged-reference pst-reference"
uptime >> $OUT/load-final.txt
$BENCH --shape 2048 2048 --tokens 1024 --density 0.01 --dtype float32 --ops linear_fwd_bwd \
  --providers $LAYER --repeats 15 --output $OUT/final-layer-2048x2048-t1024-d0.01 > $OUT/final-layer-2048x2048-t1024-d0.01.log 2>&1
uptime >> $OUT/load-final.txt
$BENCH --shape 64 64 --tokens 16 --density 0.05 --dtype float32 --ops linear_fwd_bwd \
  --providers $LAYER --repeats 300 --output $OUT/final-host-overhead-64x64-t16 > $OUT/final-host-overhead-64x64-t16.log 2>&1
uptime >> $OUT/load-final.txt
echo finished >> $OUT/load-final.txt
