"""Under mpirun across namespaces: each rank's host name (MPI.Get_processor_name, socket), the
grid's node detection (RankGrid: node_of, local_rank) for pp=2, and NBYTES bytes sent from every
rank to the rank of the other parity and back (point-to-point between the nodes under cyclic
placement). World rank 0 prints one JSON line per rank, gathered: ``PROBE {...}``.

    python tests/cluster/netns_probe.py [NBYTES]
"""
import json
import socket
import sys

import numpy as np
from mpi4py import MPI

from hpcdqn.parallel.grid import RankGrid


def main():
    nbytes = int(sys.argv[1]) if len(sys.argv) > 1 else 8 << 20
    w = MPI.COMM_WORLD
    rank, size = w.Get_rank(), w.Get_size()
    g = RankGrid(w, pp=2)
    buf = np.full(nbytes // 4, rank, dtype=np.float32)
    got = np.empty_like(buf)
    peer = rank ^ 1                              # 0<->1, 2<->3: a pipeline's two stages
    w.Sendrecv(buf, dest=peer, recvbuf=got, source=peer)
    ok = bool(np.all(got == peer))
    total = np.array([float(rank)], dtype=np.float64)
    w.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
    row = {"rank": rank, "size": size, "processor": MPI.Get_processor_name(),
           "hostname": socket.gethostname(), "node_of": g.node_of, "nodes": g.nodes,
           "local_rank": g.local_rank, "ranks_per_node": g.ranks_per_node,
           "sendrecv_ok": ok, "allreduce": float(total[0])}
    g.free()
    rows = w.gather(json.dumps(row), root=0)
    if rows is not None:
        print("\n".join("PROBE " + r for r in rows), flush=True)


if __name__ == "__main__":
    main()
