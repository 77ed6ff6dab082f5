"""Syscall-level faults in one MPI job (the ranks load tests/faultshim; LD_PRELOAD is set by the
launcher, the fault itself per case here): write one real checkpoint, then for each case
POINT:RANKS:ERRNO configure the injector on every rank (FAULTSHIM_* variables, FAULTSHIM_GEN
bumped) and try a second checkpoint, or (POINT 'resume-read') read the first one back.

POINT: open, create, data0 (first data bytes), data1 (past the first MiB of each rank's data),
data-last (the rank's last bytes), sync, close, rename, latest. RANKS: 0, last, all.

Each write case must raise the same agreed error on every rank, name its cause, leave no
``.tmp`` file, and leave the first checkpoint as ``latest`` and verifying; each read case
must be refused (an agreed error that is not 'corrupt', so the file is never set aside) or
succeed with the same bytes. Rank 0 prints one JSON line: the per-case results.
argv: RUN_DIR CASE[,CASE...] [ROWS]"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from hpcdqn.parallel.lifecycle import leave
from hpcdqn.store import CheckpointError, verify, write_checkpoint
from hpcdqn.store.errors import CheckpointCorrupt
from hpcdqn.store.schema import plan

comm = MPI.COMM_WORLD
rank, n = comm.Get_rank(), comm.Get_size()
run, cases = Path(sys.argv[1]), sys.argv[2].split(",")
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 65536
sizes = [40, 10]
layout = {"world": n, "dp": n, "pp": 1, "num_envs": 2, "rows": rows, "prioritized": False,
          "stage_params": [[0, sum(sizes)]]}
env = {"env_id": "CartPole-v1", "obs_shape": [4], "obs_dtype": "<f4", "n_actions": 2}
state = json.dumps({"rank": rank}).encode()
rng = np.random.default_rng(rank)
mine = {}
for s in plan(layout, env, sizes, len(state)):
    for own, a, b in s.parts:
        if own == rank and s.name not in ("rank_state", "rank_state_len"):
            mine[s.name] = rng.random((b - a,) + tuple(s.shape[1:])).astype(s.dtype)


def ckpt_arrays_for_test(path) -> dict:
    """Every dataset and root attribute of a checkpoint (the bytes a resume would load)."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[...]) if isinstance(v, h5py.Dataset) else None)
        out.update({"@" + k: np.asarray(v) for k, v in f.attrs.items()})
    return out


my_bytes = sum(v.nbytes for v in mine.values())
d = run / "checkpoints"
FIRST, SECOND = d / "ckpt-000000001000.h5", d / "ckpt-000000002000.h5"
CAUSE = {"ENOSPC": ("ENOSPC", "no space left", "file system full"),
         "EIO": ("EIO",), "EDQUOT": ("EDQUOT", "quota")}


def configure(point: str, ranks: str, code: str, gen: int) -> None:
    who = {"0": "0", "last": str(n - 1), "all": "all"}[ranks]
    e = {"FAULTSHIM_RANK": who, "FAULTSHIM_ERRNO": code, "FAULTSHIM_PATH": "*" + SECOND.name + ".tmp",
         "FAULTSHIM_CALLS": "write", "FAULTSHIM_AFTER_BYTES": "", "FAULTSHIM_AFTER_CALLS": "",
         "FAULTSHIM_COUNT": ""}
    if point in ("open", "sync", "close"):
        e["FAULTSHIM_CALLS"] = point
    elif point == "create":       # rank 0's HDF5 metadata; the others' first bytes
        e["FAULTSHIM_AFTER_BYTES"] = "0"
    elif point == "data0":
        e["FAULTSHIM_AFTER_BYTES"] = "8192"
    elif point == "data1":
        e["FAULTSHIM_AFTER_BYTES"] = str(2**20)
    elif point == "data-last":
        e["FAULTSHIM_AFTER_BYTES"] = str(max(0, my_bytes - 4096))
    elif point == "rename":
        e.update(FAULTSHIM_CALLS="rename", FAULTSHIM_PATH="*" + SECOND.name + "*")
    elif point == "latest":
        e.update(FAULTSHIM_CALLS="open,write,sync,rename", FAULTSHIM_PATH="*/latest*")
    elif point == "resume-read":
        e.update(FAULTSHIM_CALLS="read", FAULTSHIM_PATH="*" + FIRST.name)
    else:
        raise ValueError(point)
    os.environ.update(e)
    os.environ["FAULTSHIM_GEN"] = str(gen)      # last: the injector reads the rest again


def clear(gen: int) -> None:
    os.environ["FAULTSHIM_PATH"] = ""
    os.environ["FAULTSHIM_GEN"] = str(gen)


clear(0)
write_checkpoint(run, comm, layout, env, sizes, {}, {"env_steps": 1000}, mine, state, 3)
reference = ckpt_arrays_for_test(FIRST) if rank == 0 else None
results = []
for i, case in enumerate(cases):
    point, ranks, code = case.split(":")
    comm.Barrier()
    configure(point, ranks, code, 2 * i + 1)
    out = {"case": case, "ranks": n}
    t0 = time.time()
    try:
        if point == "resume-read":
            verify(FIRST, comm)
        else:
            write_checkpoint(run, comm, layout, env, sizes, {}, {"env_steps": 2000}, mine, state, 3)
        out["error"] = None
    except CheckpointError as e:
        out["error"], out["kind"] = str(e), type(e).__name__
    out["seconds"] = round(time.time() - t0, 3)
    clear(2 * i + 2)
    errs = comm.gather(out["error"], root=0)
    verify(FIRST, comm)                      # collective: the previous checkpoint is intact
    if rank == 0:
        out["same_on_all_ranks"] = len(set(errs)) == 1
        out["latest"] = (d / "latest").read_text().strip()
        out["files"] = sorted(p.name for p in d.iterdir())
        msg = (out["error"] or "").lower()
        out["names_cause"] = out["error"] is None or any(c.lower() in msg for c in CAUSE[code])
        out["not_set_aside"] = out.get("kind") != CheckpointCorrupt.__name__
        got = ckpt_arrays_for_test(FIRST)
        out["first_bitwise"] = got.keys() == reference.keys() and all(
            np.array_equal(got[k], reference[k]) for k in got)
        results.append(out)
    # a write that got through (a fault that never fired on this path): back to one checkpoint
    if rank == 0 and SECOND.exists():
        SECOND.unlink()
        (d / "latest").write_text(FIRST.name + "\n")
    comm.Barrier()
if rank == 0:
    print(json.dumps(results), flush=True)
leave(0)    # an HDF5 file whose flush failed is never closed: no HDF5 atexit (lifecycle.leave)
