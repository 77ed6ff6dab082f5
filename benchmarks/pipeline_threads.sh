#!/bin/bash
# pp=1 on the 4096x4 MLP (batch 512, double DQN) with 1 and 2 torch threads, alternating, 10 timed
# updates each (benchmarks/pipeline.py --worker): the 2-thread speed-up bounds what pp=2 on the
# same 2 cores can reach (zero bubble, zero copies: 1-thread time / 2).
# Usage: bash benchmarks/pipeline_threads.sh   (run from the repository root)
for i in 1 2; do for th in 1 2; do
  echo "threads=$th load=$(cut -d' ' -f1 /proc/loadavg) $(mpirun -n 1 --bind-to none python benchmarks/pipeline.py --worker --layout pp1 --threads $th --hidden 4096,4096,4096,4096 --batch 512 --updates 10 --warmup 2 2>/dev/null | tail -1 | python3 -c 'import json,sys,statistics;d=json.loads(sys.stdin.read());w=d["walls"];print("median_wall_s",statistics.median(w) if not isinstance(w[0],list) else [statistics.median(x) for x in w])')"
done; done
