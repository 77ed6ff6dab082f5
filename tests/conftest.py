"""Shared test set-up: tests/ on sys.path (for mpi_util and slurm_cluster), whichever
subfolder a test lives in."""
