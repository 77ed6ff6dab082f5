"""Train with pp=2 (2 ranks) where pipeline stage RANK raises during its 5th update.

    mpirun -n 2 python pp_fail_stage.py RUN_DIR RANK
"""
import sys

from mpi4py import MPI

from hpcdqn.learner import pipelined
from hpcdqn.config import load_config
from hpcdqn.parallel.lifecycle import abort_on_exception
from hpcdqn.train import train

if MPI.COMM_WORLD.Get_rank() == int(sys.argv[2]):
    orig = pipelined.PipelineLearner.update

    def update(self, batch, *args, **kwargs):
        if self.updates == 4:
            raise ZeroDivisionError(f"injected failure on pipeline stage {self.stage}")
        return orig(self, batch, *args, **kwargs)

    pipelined.PipelineLearner.update = update

cfg = load_config(overrides=["total_steps=100000", "dqn.learning_starts=200", "log.progress=false",
                             "pp=2", "micro_batches=4", "network.hidden=[32, 32]",
                             f"run_dir={sys.argv[1]}"])
abort_on_exception(train, cfg)
