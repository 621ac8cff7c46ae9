#!/bin/bash
# PST's host overhead before (main, unpacked in $MAIN) and after (this tree), alternately, in one
# session. Run from the worktree root: MAIN=/tmp/main24t bash bench/results/cpu-pst-tiny-2026-12-02/run.sh
set -u
OUT=bench/results/cpu-pst-tiny-2026-12-02
MAIN=${MAIN:-/tmp/main24t}
HERE=$PWD
BENCH=/work/main/.venv/bin/spft-bench  # imports spft_kernels from PYTHONPATH's tree (printed in each log)
export OMP_NUM_THREADS=1
uptime > $OUT/load.txt
run() {  # name tree args...
  local name=$1 tree=$2; shift 2
  (cd $tree && python_tree=$(PYTHONPATH=$tree /work/main/.venv/bin/python -c \
     "import spft_kernels; print(spft_kernels.__file__)") && echo "spft_kernels from $python_tree" &&
   PYTHONPATH=$tree $BENCH --device cpu --dtype float32 --ops linear_fwd_bwd \
     --providers lora-peft pst-reference spft-merged-reference "$@" --output $HERE/$OUT/$name) > $HERE/$OUT/$name.log 2>&1
}
for i in 1 2; do
  run main-64x64-t16-$i $MAIN --shape 64 64 --tokens 16 --density 0.05 --repeats 200
  run new-64x64-t16-$i $HERE --shape 64 64 --tokens 16 --density 0.05 --repeats 200
done
for i in 1 2; do
  run main-2048x2048-t1024-$i $MAIN --shape 2048 2048 --tokens 1024 --density 0.01 --repeats 3
  run new-2048x2048-t1024-$i $HERE --shape 2048 2048 --tokens 1024 --density 0.01 --repeats 3
done
uptime >> $OUT/load.txt
