"""Under mpirun: every rank makes an async Atari vector env after MPI_Init and reports how its
worker processes were started (parent, environment, libraries) and whether their state survives
a capture/restore into a fresh async env (JSON in between). Rank 0 prints the gathered rows."""
import json
import os
import sys

import numpy as np


def worker_facts(pid: int) -> dict:
    ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    maps = open(f"/proc/{pid}/maps").read()
    return {"forked_from_rank": ppid == os.getpid(), "no_mpi_init": b"MPI4PY_RC_INITIALIZE=false" in env,
            "launcher_vars": sorted(e.split(b"=")[0].decode() for e in env
                                    if e.startswith((b"OMPI_", b"PMI_", b"PMIX_"))),
            "libmpi_loaded": "libmpi" in maps}


def trajectory(venv, actions):
    out = []
    for a in actions:
        obs, r, term, trunc, _ = venv.step(a)
        out.append((obs.copy(), r.copy(), term.copy(), trunc.copy()))
    return out


def main():
    from mpi4py import MPI

    from hpcdqn.rl.envs import make_vector_env
    from hpcdqn.store.codec import env_state, restore_env_state

    comm = MPI.COMM_WORLD
    atari = {"sticky_actions": 0.25}
    venv = make_vector_env(sys.argv[1], 2, comm.rank, "async", atari)
    facts = [worker_facts(p.pid) for p in venv.processes]
    acts = np.random.default_rng(comm.rank).integers(0, venv.single_action_space.n, (300, 2))
    trajectory(venv, acts[:100])
    st = json.loads(json.dumps(env_state(venv)))
    fresh = make_vector_env(sys.argv[1], 2, 1234 + comm.rank, "async", atari)
    warnings = restore_env_state(fresh, st)
    a, b = trajectory(venv, acts[100:]), trajectory(fresh, acts[100:])
    same = all(all(np.array_equal(x, y) for x, y in zip(sa, sb)) for sa, sb in zip(a, b))
    row = {"rank": comm.rank, "workers": facts, "warnings": warnings, "resumed_same": same,
           "dones": int(sum(s[2].sum() + s[3].sum() for s in a))}
    venv.close()
    fresh.close()
    rows = comm.gather(row, root=0)
    if comm.rank == 0:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
