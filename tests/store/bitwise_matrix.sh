#!/usr/bin/env bash
# The bitwise-identity matrix of a refactoring: seeds 1 and 2 on 1 rank, dp=2 and pp=2 (default
# CartPole config), plus short runs through the other update paths (PER + overlapped allreduce,
# pp=2 with 4 micro-batches and GPipe, a dueling head). Run it on two checkouts, then compare
# each pair of runs with tests/cluster/compare_runs.py.
#   PY=.venv/bin/python tests/store/bitwise_matrix.sh CHECKOUT OUT_DIR
set -euo pipefail
REPO=$(cd "$1" && pwd); OUT=$2; mkdir -p "$OUT"
PY=${PY:-$REPO/.venv/bin/python}
export PYTHONPATH=$REPO OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
H="$PY -m hpcdqn.cli"
common="eval.episodes=0 log.progress=false log.tensorboard=false"
for s in 1 2; do
  $H train seed=$s run_dir=$OUT/s${s}_r1 $common > $OUT/s${s}_r1.log 2>&1
  mpirun -n 2 $H train seed=$s run_dir=$OUT/s${s}_dp2 $common > $OUT/s${s}_dp2.log 2>&1
  mpirun -n 2 $H train seed=$s pp=2 run_dir=$OUT/s${s}_pp2 $common > $OUT/s${s}_pp2.log 2>&1
done
mpirun -n 2 $H train seed=1 total_steps=12000 replay.prioritized=true parallel.overlap=true run_dir=$OUT/x_dp2_per_overlap $common > $OUT/x1.log 2>&1
mpirun -n 2 $H train seed=1 total_steps=12000 pp=2 micro_batches=4 schedule=gpipe dqn.double=false run_dir=$OUT/x_pp2_m4 $common > $OUT/x2.log 2>&1
$H train seed=1 total_steps=12000 network.dueling=true replay.prioritized=true run_dir=$OUT/x_r1_dueling_per $common > $OUT/x3.log 2>&1
echo "ALL-RUNS-DONE: compare with: for r in $OUT/*/; do $PY tests/cluster/compare_runs.py OTHER/\$(basename \$r) \$r; done"
