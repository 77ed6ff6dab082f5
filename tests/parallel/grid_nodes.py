"""Under mpirun: the grid's node detection on COMM_WORLD, on a split sub-communicator and on
fake nodes (a Split by a fake host name). World rank 0 prints one JSON line per case and rank
(gathered, so ranks' lines cannot interleave in mpirun's forwarded stdout)."""

import json
import sys

from mpi4py import MPI

from hpcdqn.parallel.grid import RankGrid


def report(case, g):
    row = {"case": case, "rank": g.rank, "local_rank": g.local_rank, "nodes": g.nodes,
           "ranks_per_node": g.ranks_per_node, "node_of": g.node_of, "layout": g.describe()}
    g.free()
    rows = MPI.COMM_WORLD.gather(json.dumps(row), root=0)
    if rows is not None:
        print("\n".join("GRID " + r for r in rows), flush=True)


def main():
    pp = int(sys.argv[1])
    w = MPI.COMM_WORLD
    report("world", RankGrid(w, pp=pp))
    # a sub-communicator: the even world ranks and the odd ones, each its own grid
    sub = w.Split(color=w.Get_rank() % 2, key=w.Get_rank())
    report(f"sub{w.Get_rank() % 2}", RankGrid(sub, pp=1))
    # fake two nodes: block (0,1 | 2,3) and cyclic (0,2 | 1,3) host names
    report("block", RankGrid(w, pp=pp, node_color=w.Get_rank() * 2 // w.Get_size()))
    report("cyclic", RankGrid(w, pp=pp, node_color=w.Get_rank() % 2))
    sys.stderr.flush()


if __name__ == "__main__":
    main()
