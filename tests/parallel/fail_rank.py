"""Train with 2 ranks where rank 1 raises during its 5th update."""
import sys

from mpi4py import MPI

from hpcdqn.learner import data_parallel
from hpcdqn.config import load_config
from hpcdqn.parallel.lifecycle import abort_on_exception
from hpcdqn.train import train

if MPI.COMM_WORLD.Get_rank() == 1:
    orig = data_parallel.DataParallelLearner.update

    def update(self, batch, *args, **kwargs):
        if self.updates == 4:
            raise ZeroDivisionError("injected failure on rank 1")
        return orig(self, batch, *args, **kwargs)

    data_parallel.DataParallelLearner.update = update

cfg = load_config(overrides=["total_steps=100000", "dqn.learning_starts=200", "log.progress=false",
                             f"run_dir={sys.argv[1]}"])
abort_on_exception(train, cfg)
