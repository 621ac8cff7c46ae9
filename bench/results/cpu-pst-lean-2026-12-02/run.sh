#!/bin/bash
# PST reference before (main at 1cb214d, unpacked in $MAIN) and after (this tree), alternately,
# in one session. Run from the worktree root: MAIN=/tmp/main24pst bash bench/results/cpu-pst-lean-2026-12-02/run.sh
set -u
OUT=bench/results/cpu-pst-lean-2026-12-02
MAIN=${MAIN:-/tmp/main24pst}
HERE=$PWD
BENCH=/work/main/.venv/bin/spft-bench
export OMP_NUM_THREADS=1
uptime > $OUT/load.txt
run() {  # name tree args...
  local name=$1 tree=$2; shift 2
  (cd $tree && PYTHONPATH=$tree $BENCH --device cpu --dtype float32 --density 0.01 --ops linear_fwd_bwd "$@" \
     --output $HERE/$OUT/$name) > $HERE/$OUT/$name.log 2>&1
}
for i in 1 2; do
  run main-layer-2048x2048-t1024-$i $MAIN --shape 2048 2048 --tokens 1024 --providers lora-peft dense-full pst-reference --repeats 7
  run new-layer-2048x2048-t1024-$i $HERE --shape 2048 2048 --tokens 1024 --providers lora-peft dense-full pst-reference --repeats 7
done
run main-host-overhead-64x64-t16 $MAIN --shape 64 64 --tokens 16 --providers lora-peft dense-full pst-reference --repeats 300
run new-host-overhead-64x64-t16 $HERE --shape 64 64 --tokens 16 --providers lora-peft dense-full pst-reference --repeats 300
for shape in "4096 4096" "11008 4096"; do
  tag=${shape/ /x}
  run main-ops-$tag-t64 $MAIN --shape $shape --tokens 64 --providers pst-reference --repeats 3
  run new-ops-$tag-t64 $HERE --shape $shape --tokens 64 --providers pst-reference --repeats 3
done
uptime >> $OUT/load.txt
