"""A real, private one-node Slurm cluster on loopback, for tests.

It runs its own ``munged`` (own key and socket), ``slurmctld`` and ``slurmd`` from a generated
``slurm.conf`` in a temporary directory, on free ports, so it neither needs nor disturbs a system
Slurm or munge. Clients find it through ``SLURM_CONF`` (see :meth:`SlurmCluster.env`).

    cluster = SlurmCluster.start()   # SlurmUnavailable: cannot install; SlurmStartError: did not start
    subprocess.run(["sbatch", ...], env=cluster.env())
    cluster.stop()

Run by hand: ``python tests/slurm_cluster.py`` starts one, prints the ``export SLURM_CONF=...`` line
and waits for Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "srun", "sinfo", "squeue", "scontrol", "scancel", "munged"]


class SlurmUnavailable(RuntimeError):
    """Slurm or munge is not installed and cannot be installed here (tests skip)."""


class SlurmStartError(RuntimeError):
    """Slurm is installed but the cluster did not come up (tests fail)."""


def ensure_installed(log=print) -> None:
    """apt-get install Slurm + munge when missing (root on Debian/Ubuntu); else SlurmUnavailable."""
    missing = [b for b in BINARIES if not _which(b)]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable(f"missing {missing} and cannot apt-get install {PACKAGES} (not root "
                               "or no apt-get); run: apt-get install " + " ".join(PACKAGES))
    log(f"installing {' '.join(PACKAGES)} (missing: {missing})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                       env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                           env=env, capture_output=True, text=True, timeout=600)
    missing = [b for b in BINARIES if not _which(b)]
    if r.returncode != 0 or missing:
        raise SlurmUnavailable(f"apt-get install {PACKAGES} failed ({r.returncode}): "
                               f"{r.stderr[-1000:]} missing={missing}")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> tuple[str, str]:
    """(node name, hardware description) from ``slurmd -C``."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    first = out.splitlines()[0]
    name = re.search(r"NodeName=(\S+)", first).group(1)
    hw = " ".join(t for t in first.split()[1:] if not t.startswith("RealMemory"))
    return name, hw


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = ""
        self.task_plugin = os.environ.get("HPCDQN_TEST_SLURM_TASK_PLUGIN", "task/affinity")

    # -- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def start(cls, root: str | Path | None = None, timeout: float = 60.0) -> "SlurmCluster":
        ensure_installed()
        root = Path(root or tempfile.mkdtemp(prefix="hpcdqn-slurm-"))
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        c = cls(root)
        try:
            c._start_munge()
            c._write_conf()
            c._start_daemons(timeout)
        except BaseException:
            c.stop()
            raise
        return c

    def _start_munge(self) -> None:
        m = self.root / "munge"
        m.mkdir(mode=0o700, exist_ok=True)
        key = m / "munge.key"
        if not key.exists():
            if _which("mungekey"):
                subprocess.run([_which("mungekey"), "--create", f"--keyfile={key}"], check=True,
                               capture_output=True, timeout=30)
            elif _which("create-munge-key"):  # older munge
                subprocess.run([_which("create-munge-key"), "-f"], check=True, timeout=30)
                shutil.copy("/etc/munge/munge.key", key)
            else:
                key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o600)
        self.munge_socket = m / "munge.socket"
        cmd = [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
               f"--key-file={key}", f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
               f"--seed-file={m / 'munged.seed'}"]
        self.procs["munged"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(m / "munged.err", "w"),
                                                start_new_session=True)
        deadline = time.time() + 20
        while not self.munge_socket.exists():
            if self.procs["munged"].poll() is not None or time.time() > deadline:
                raise SlurmStartError("munged did not start: " + (m / "munged.err").read_text()[-2000:]
                                       + _tail(m / "munged.log"))
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool"):
            (r / d).mkdir(exist_ok=True)
        self.node, hw = _node_line()
        cpus = int(re.search(r"CPUs=(\d+)", hw).group(1))
        if cpus < 2:   # the tests run 2 ranks: declare 2 CPUs and let slurmd believe the config
            hw, self.task_plugin = "CPUs=2", "task/none"
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        self.conf.write_text(f"""\
# generated by tests/slurm_cluster.py: a private one-node cluster on loopback
ClusterName=hpcdqntest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin={self.task_plugin}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=pmix
JobRequeue=1
SlurmdParameters=config_overrides
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
NodeName={self.node} NodeAddr=127.0.0.1 {hw} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _start_daemons(self, timeout: float) -> None:
        env = self.env()
        r = self.root
        self.procs["slurmctld"] = subprocess.Popen(
            [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=env, stdout=subprocess.DEVNULL,
            stderr=open(r / "slurmctld.err", "w"), start_new_session=True)
        self.procs["slurmd"] = subprocess.Popen(
            [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)], env=env,
            stdout=subprocess.DEVNULL, stderr=open(r / "slurmd.err", "w"), start_new_session=True)
        deadline = time.time() + timeout
        while True:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmStartError(f"{name} exited ({p.returncode}): " + self.logs())
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True,
                                 text=True, timeout=20).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return
            if time.time() > deadline:
                raise SlurmStartError(f"node not idle after {timeout}s (state {out!r}): " + self.logs())
            time.sleep(0.5)

    def stop(self) -> None:
        if self.procs:
            try:  # cancel whatever is left so no job processes outlive the cluster
                subprocess.run(["scancel", "--full", "-u", "root"], env=self.env(), capture_output=True,
                               timeout=10)
                time.sleep(0.5)
            except Exception:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)

    # -- clients --------------------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        e = dict(os.environ)
        e["SLURM_CONF"] = str(self.conf)
        for k in list(e):  # never inherit an enclosing allocation
            if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_NTASKS", "SLURM_NNODES", "SBATCH_")):
                e.pop(k)
        e.update(extra or {})
        return e

    def run(self, args, timeout=30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=kw.pop("env", None) or self.env(), capture_output=True,
                              text=True, timeout=timeout, **kw)

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict ({} once the job has left the controller)."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        if r.returncode != 0:
            return {}
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", r.stdout))

    def wait_state(self, job_id: str, states, timeout: float) -> dict:
        """Poll until the job's state is in ``states``; AssertionError with logs on timeout."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}\n"
                             + self.logs())

    def logs(self, n: int = 3000) -> str:
        return "".join(f"\n--- {f.name} ---\n{_tail(f, n)}" for f in sorted(self.root.glob("*.log"))
                       + sorted(self.root.glob("*.err")) if f.stat().st_size)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def slurm_cluster_fixture():
    """Body of the session fixture ``slurm_cluster`` (see tests/test_slurm.py): start, yield, stop.
    Skips only when Slurm cannot be installed; a cluster that does not start fails the tests."""
    import pytest

    try:
        ensure_installed()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm: {e}")
    c = SlurmCluster.start()
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.root, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover - manual use
    c = SlurmCluster.start()
    print(f"export SLURM_CONF={c.conf}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
