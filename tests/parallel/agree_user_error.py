"""Two ranks through a set-up phase where only rank ``argv[1]`` finds a user error (``argv[2]``:
config or bug): with a user error every rank raises the agreed error and exits 2 after one line;
with a bug the failing rank aborts the job with its traceback."""
import sys

from mpi4py import MPI

from hpcdqn.config import ConfigError
from hpcdqn.parallel.lifecycle import abort_on_exception, agree_user_errors
from hpcdqn.parallel.agree import Local


def setup():
    comm = MPI.COMM_WORLD
    with Local() as loc:
        if comm.Get_rank() == int(sys.argv[1]):
            if sys.argv[2] == "config":
                raise ConfigError(f"injected config error on rank {comm.Get_rank()}")
            raise ZeroDivisionError("injected bug")
    agree_user_errors(comm, loc.err)
    comm.Barrier()          # never reached by the agreed error: no rank waits here alone
    print("set-up passed", flush=True)


abort_on_exception(setup)
