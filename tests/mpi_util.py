"""Launch real MPI jobs from tests, with a timeout so a deadlock fails instead of hanging CI."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent      # driver scripts sit beside the tests that launch them


def mpi_env(extra=None):
    env = dict(os.environ)
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra or {})
    return env


def mpirun_cmd(n):
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    assert exe, "mpirun not found: run ./quickstart.sh setup"
    return [exe, "-n", str(n), "--oversubscribe", "--bind-to", "none"]


def run_mpi(n, args, timeout=300, cwd=None, env=None, check=True):
    """mpirun -n N python ARGS...; kills the whole process group on timeout."""
    cmd = mpirun_cmd(n) + [sys.executable, *map(str, args)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=cwd or ROOT, env=mpi_env(env), start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"MPI job timed out after {timeout}s (deadlock?)\n{cmd}\n"
                             f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    if check and r.returncode != 0:
        raise AssertionError(f"MPI job failed ({r.returncode}): {cmd}\nstdout:\n{out[-3000:]}"
                             f"\nstderr:\n{err[-5000:]}")
    return r


def hpcdqn(n, args, **kw):
    return run_mpi(n, ["-m", "hpcdqn.cli", *args], **kw)


FAULTSHIM_SRC = Path(__file__).resolve().parent / "faultshim" / "faultshim.c"


def faultshim_lib() -> Path:
    """The LD_PRELOAD fault injector (tests/faultshim/faultshim.c), built with the system C
    compiler into a cache directory keyed by the source's hash (rebuilt when it changes)."""
    import hashlib
    import tempfile

    src = FAULTSHIM_SRC.read_bytes()
    tag = hashlib.sha256(src).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"hpcdqn-faultshim-{tag}" / "faultshim.so"
    if not out.is_file():
        cc = shutil.which("cc") or shutil.which("gcc")
        assert cc, "no C compiler (cc) to build the fault injector"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.so")
        subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(FAULTSHIM_SRC), "-ldl"],
                       check=True, capture_output=True, text=True)
        os.replace(tmp, out)
    return out


def fault_env(path, calls="write", errno="ENOSPC", rank="all", after_bytes=None,
              after_calls=None, count=None) -> dict:
    """Environment for an MPI job whose ranks load the fault injector (see faultshim.c)."""
    env = {"LD_PRELOAD": str(faultshim_lib()), "FAULTSHIM_PATH": str(path),
           "FAULTSHIM_CALLS": calls, "FAULTSHIM_ERRNO": errno, "FAULTSHIM_RANK": str(rank)}
    for k, v in (("AFTER_BYTES", after_bytes), ("AFTER_CALLS", after_calls), ("COUNT", count)):
        if v is not None:
            env[f"FAULTSHIM_{k}"] = str(v)
    return env


def start_until(cmd, path: Path, timeout: float = 180.0, poll: float = 0.1) -> subprocess.Popen:
    """Start ``cmd`` (a job, in a session of its own: ``os.killpg`` ends it) and return once
    ``path`` exists, the job has ended, or ``timeout`` seconds have passed."""
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=mpi_env(), start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists() and job.poll() is None:
        time.sleep(poll)
    return job
