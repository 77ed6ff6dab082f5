#!/usr/bin/env bash
# A short Pong run on the frame-stacked replay: checkpoints, a bitwise resume and a reshard
# dp 2 -> 1 (issue 13). Not part of the CI suite (minutes of CPU); run it by hand:
#
#   tests/store/pong_replay_check.sh [STEPS] [OUT_DIR]      (default 20000, /tmp/pong-replay)
#
# A: 2 ranks, STEPS env steps uninterrupted. B: the same run stopped at STEPS/2 (off any
# boundary), resumed: its final checkpoint and model must equal A's, bit for bit
# (tests/cluster/compare_runs.py). Then B's last checkpoint is resumed on 1 rank (a reshard:
# both replay shards merged into one) for 8 more env steps. Prints checkpoint sizes.
set -euo pipefail
STEPS=${1:-20000}
OUT=${2:-/tmp/pong-replay}
HERE=$(cd "$(dirname "$0")/../.." && pwd)
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$OUT" && mkdir -p "$OUT"
HALF=$((STEPS / 2 + 24))
ARGS=(--config "$HERE/configs/atari_pong.toml" "total_steps=$STEPS" "dqn.learning_starts=2000"
      "dqn.buffer_size=$((STEPS / 4))" "checkpoint_every=$((STEPS / 4))" "eval.episodes=0"
      "log.progress=false" "log.tensorboard=false" "log.every=2000" "seed=7")
mpirun -n 2 --oversubscribe --bind-to none hpcdqn train "${ARGS[@]}" "run_dir=$OUT/a" > "$OUT/a.json"
mpirun -n 2 --oversubscribe --bind-to none hpcdqn train "${ARGS[@]}" "run_dir=$OUT/b" \
    "stop_after=$HALF" > /dev/null
mpirun -n 2 --oversubscribe --bind-to none hpcdqn train --resume "$OUT/b" 2> "$OUT/b.err" > /dev/null
grep -o "resumed exactly from .*" "$OUT/b.err"
python "$HERE/tests/cluster/compare_runs.py" "$OUT/a" "$OUT/b"
ls -l "$OUT"/a/checkpoints/*.h5
mpirun -n 1 --oversubscribe --bind-to none hpcdqn train --resume "$OUT/b" \
    "stop_after=$((STEPS + 8))" "total_steps=$((STEPS + 8))" 2> "$OUT/c.err" > "$OUT/c.json"
grep -o "resumed resharded .*" "$OUT/c.err"
python - "$OUT/c.json" <<'EOF'
import json, sys
s = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print("after reshard 2 -> 1:", {k: s[k] for k in ("env_steps", "dp", "updates")})
EOF
