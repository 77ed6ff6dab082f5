#!/usr/bin/env bash
# Submit a whole weak + strong scaling study over rank counts (within a node) and node counts.
#
#   slurm/submit_scaling.sh [-r "1 2 4 8 16 32"] [-N "1 2 4 8"] [-t TASKS_PER_NODE] [-k REPEATS]
#                           [-o OUT] [-s "SBATCH OPTIONS"] [-n] [KEY=VALUE ...]
#
#   -r  rank counts inside one node      (default: 1 2 4 ... up to -t)
#   -N  node counts                      (default: "1 2 4")
#   -t  tasks per node                   (default: 32)
#   -k  repeats per point                (default: 3)
#   -o  output directory                 (default: scaling/study_<date>)
#   -s  extra sbatch options for every job, e.g. "-p compute -A myproj --exclusive"
#   -n  dry run: print the sbatch commands, submit nothing
#   KEY=VALUE  training overrides for every run (e.g. --config is not needed: total_steps=20000)
#
# What it submits (job arrays where the resources are the same, a loop of `sbatch -N` where not):
#   1. one job on one node, --array=0-1 (0: weak, 1: strong), over the in-node rank counts;
#   2. per node count N: `sbatch -N N --ntasks-per-node=T --array=0-1` for the point N*T ranks
#      (a job array cannot vary its node count, hence one submission per N);
#   3. per mode, a small merge job (--dependency=afterany on all of the above) that runs
#      `hpcdqn scale --merge` into OUT/<mode>: scaling.csv, scaling.png and the fitted allreduce
#      model's prediction to 1024 ranks over every point measured.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RANKS="" NODES="1 2 4" TPN=32 REPEATS=3 OUT="scaling/study_$(date +%Y%m%d-%H%M%S)" EXTRA="" DRY=0
while getopts "r:N:t:k:o:s:nh" opt; do
  case "$opt" in
    r) RANKS="$OPTARG" ;; N) NODES="$OPTARG" ;; t) TPN="$OPTARG" ;; k) REPEATS="$OPTARG" ;;
    o) OUT="$OPTARG" ;; s) EXTRA="$OPTARG" ;; n) DRY=1 ;;
    h|*) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ -z "$RANKS" ]; then p=1; while [ "$p" -le "$TPN" ]; do RANKS="$RANKS $p"; p=$((p * 2)); done; fi
max_rank=0; for r in $RANKS; do [ "$r" -gt "$max_rank" ] && max_rank="$r"; done
csv() { echo "$*" | tr -s ' ' ',' | sed 's/^,//; s/,$//'; }

submit() {  # prints the job id
  # shellcheck disable=SC2086
  if [ "$DRY" = 1 ]; then echo "sbatch $EXTRA $*" >&2; echo "DRY$RANDOM"; return; fi
  # shellcheck disable=SC2086
  sbatch --parsable $EXTRA "$@" | cut -d';' -f1
}

mkdir -p "$OUT"
ids=()
# 1. in-node rank counts: one node, both modes as a job array
ids+=("$(submit -N 1 -n "$max_rank" --array=0-1 --job-name=scale-node \
          "$HERE/scaling.sbatch" --ranks "$(csv $RANKS)" --repeats "$REPEATS" \
          --out "$OUT/node_\$MODE" "$@")")
# 2. node counts: one submission per node count (arrays cannot vary -N), both modes per array
for n in $NODES; do
  ids+=("$(submit -N "$n" --ntasks-per-node="$TPN" --array=0-1 --job-name="scale-N$n" \
            "$HERE/scaling.sbatch" --ranks "$((n * TPN))" --repeats "$REPEATS" \
            --out "$OUT/nodes${n}_\$MODE" "$@")")
done
dep="afterany:$(IFS=:; echo "${ids[*]}")"
# 3. merge per mode once everything has run
for mode in weak strong; do
  dirs="$OUT/node_$mode"; for n in $NODES; do dirs="$dirs $OUT/nodes${n}_$mode"; done
  submit -n 1 --dependency="$dep" --job-name="scale-merge-$mode" --output="slurm-%x-%j.out" \
    --wrap "cd '$PWD' && { [ -f '${HPCDQN_VENV:-$PWD/.venv}/bin/activate' ] && . '${HPCDQN_VENV:-$PWD/.venv}/bin/activate'; true; } && hpcdqn scale --merge $dirs --out $OUT/$mode" >/dev/null
done
echo "submitted ${#ids[@]} study jobs (${ids[*]}) and 2 merge jobs; results in $OUT/{weak,strong}/" >&2
