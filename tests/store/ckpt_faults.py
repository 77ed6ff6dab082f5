"""Many fault cases in one MPI job: write one real checkpoint (synthetic parts, the real writer
and files), then for each case (PHASE:RANK:ERRNO) try a second checkpoint with that fault set in
HPCDQN_TEST_FAULT. Each case must raise the same CheckpointIOError on every rank; after each,
the first checkpoint must still verify and be ``latest``, and no temporary file may remain.
Rank 0 prints one JSON line: a list of per-case results. argv: RUN_DIR MODE CASE[,CASE...]"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcdqn.store import CheckpointIOError, verify, write_checkpoint
from hpcdqn.testing import FAULT_ENV
from hpcdqn.store.schema import plan

comm = MPI.COMM_WORLD
rank, n = comm.Get_rank(), comm.Get_size()
run, mode, cases = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
sizes = [40, 10]
layout = {"world": n, "dp": n, "pp": 1, "num_envs": 2, "rows": 4096, "prioritized": False,
          "stage_params": [[0, sum(sizes)]]}
env = {"env_id": "CartPole-v1", "obs_shape": [64], "obs_dtype": "<f4", "n_actions": 2}
state = json.dumps({"rank": rank}).encode()
rng = np.random.default_rng(rank)
mine = {}
for s in plan(layout, env, sizes, len(state)):
    for own, a, b in s.parts:
        if own == rank and s.name not in ("rank_state", "rank_state_len"):
            mine[s.name] = rng.random((b - a,) + tuple(s.shape[1:])).astype(s.dtype)
os.environ.pop(FAULT_ENV, None)
write_checkpoint(run, comm, layout, env, sizes, {}, {"env_steps": 1000}, mine, state, 3, mode)
d = run / "checkpoints"
results = []
for case in cases:
    os.environ[FAULT_ENV] = case + "@2000"     # the same on every rank
    out = {"case": case}
    t0 = time.time()
    try:
        write_checkpoint(run, comm, layout, env, sizes, {}, {"env_steps": 2000}, mine, state, 3, mode)
        out["error"] = None
    except CheckpointIOError as e:
        out["error"] = str(e)
    out["seconds"] = time.time() - t0
    os.environ.pop(FAULT_ENV, None)
    errs = comm.gather(out["error"], root=0)
    verify(d / "ckpt-000000001000.h5", comm)      # collective: the previous one is intact
    if rank == 0:
        out["same_on_all_ranks"] = len(set(errs)) == 1
        out["latest"] = (d / "latest").read_text().strip()
        out["files"] = sorted(p.name for p in d.iterdir())
        results.append(out)
if rank == 0:
    print(json.dumps(results), flush=True)
