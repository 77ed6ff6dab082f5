"""Two real network hosts on one machine, for tests: network + UTS namespaces ("node1", "node2")
joined by a veth pair with private addresses 10.77.0.1/24 and 10.77.0.2/24, each with its own
hostname and loopback, sharing the machine's file system. ``tests/netns_nodes.sh`` makes and
removes them (and documents the layout); this module wraps it for pytest and launches ``mpirun``
across the nodes over TCP:

    nodes = NetnsNodes.start()            # NetnsUnavailable: not root / no namespaces here
    r = nodes.run_mpi(4, ["-m", "hpcdqn.cli", "train", ...], map_by="slot")
    nodes.stop()                          # kills every process inside, removes namespaces + links

mpirun runs inside node1 (so its hostname is node1 and it reaches node2 over the veth); it starts
its daemon on node2 through ``plm_rsh_agent`` = ``tests/netns_nodes.sh rsh`` (nsenter into node2
instead of ssh), and both the out-of-band channel and the MPI byte-transfer layer are limited to
the veth interface ``hpn0`` (``oob_tcp_if_include``, ``btl_tcp_if_include``; ``pml`` = ``ob1``
with ``btl`` = ``tcp,vader,self``: shared memory only between ranks of one node, TCP between the
nodes; no UCX, which could find the shared memory of the one machine underneath).

By hand: ``tests/netns_nodes.sh up`` / ``down`` (see the script's header), or
``python tests/netns_nodes.py`` to make them, print the mpirun line, and wait for Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = HERE / "netns_nodes.sh"
IFACE = "hpn0"
TAG_RE = re.compile(r"^hq(\d+)-(?:node\d+|hub)$")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, tools missing, kernel refuses): tests skip."""


def _sh(*args, timeout=60, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"netns_nodes.sh {' '.join(map(str, args))} failed ({r.returncode}): "
                           f"{r.stderr[-2000:]}")
    return r


def why_unavailable() -> str | None:
    """None when this machine can host the nodes; else the reason (for pytest.skip)."""
    if os.geteuid() != 0:
        return "needs root for network and UTS namespaces"
    missing = [t for t in ("ip", "nsenter", "unshare") if not shutil.which(t)]
    if missing:
        return f"missing tools {missing} (apt-get install iproute2 util-linux)"
    if not shutil.which("mpirun"):
        return "mpirun not found"
    return None


def clean_stale() -> None:
    """Remove nodes left by a test process that died without its finalizer (tag hq<pid>)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for pid in {int(m.group(1)) for m in map(TAG_RE.match, (l.split()[0] for l in out.splitlines()
                                                            if l.strip())) if m}:
        if not Path(f"/proc/{pid}").exists():
            _sh("down", f"hq{pid}", check=False)


class NetnsNodes:
    def __init__(self, tag: str, n: int):
        self.tag, self.n = tag, n
        self.names = [f"node{i}" for i in range(1, n + 1)]
        self.addresses = {f"node{i}": f"10.77.0.{i}" for i in range(1, n + 1)}
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{tag}-"))      # host files; removed by stop()

    @classmethod
    def start(cls, n: int = 2, tag: str | None = None) -> "NetnsNodes":
        why = why_unavailable()
        if why:
            raise NetnsUnavailable(why)
        clean_stale()
        tag = tag or f"hq{os.getpid() % 100000}"
        _sh("down", tag, check=False)
        r = _sh("up", tag, n, check=False)
        if r.returncode != 0:
            _sh("down", tag, check=False)
            raise NetnsUnavailable(f"cannot make namespaces: {r.stderr.strip()[-1000:]}")
        return cls(tag, n)

    def stop(self) -> None:
        _sh("down", self.tag, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- inside a node ---------------------------------------------------------------------------
    def exec_cmd(self, node: str, cmd: list) -> list:
        return ["bash", str(SCRIPT), "exec", self.tag, node, *map(str, cmd)]

    def run_in(self, node: str, cmd: list, timeout=60, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_cmd(node, cmd), capture_output=True, text=True,
                              timeout=timeout, **kw)

    def pids(self, node: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", f"{self.tag}-{node}"], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split()]

    def iface_bytes(self, node: str) -> dict:
        """rx/tx byte counters of the node's veth end."""
        import json

        out = subprocess.run(["ip", "-n", f"{self.tag}-{node}", "-s", "-j", "link", "show", IFACE],
                             capture_output=True, text=True, check=True).stdout
        st = json.loads(out)[0]["stats64"]
        return {"rx": int(st["rx"]["bytes"]), "tx": int(st["tx"]["bytes"])}

    # -- mpirun across the nodes -------------------------------------------------------------------
    def hostfile(self, slots: int) -> Path:
        f = self.tmp / f"hosts-{slots}"
        f.write_text("".join(f"{n} slots={slots}\n" for n in self.names))
        return f

    def mpirun_cmd(self, n: int, map_by: str = "slot", slots: int | None = None,
                   extra: list | None = None) -> list:
        """``mpirun`` inside node1 over all nodes: ``map_by="slot"`` fills node1 first (block
        placement: ranks 0..slots-1 on node1), ``"node"`` deals ranks round-robin (cyclic)."""
        slots = slots or -(-n // self.n)
        mpirun = shutil.which("mpirun")
        cmd = [mpirun, "-n", str(n), "--hostfile", str(self.hostfile(slots)), "--map-by", map_by,
               "--bind-to", "none",
               "--mca", "plm_rsh_agent", f"bash {SCRIPT} rsh",
               "--mca", "pml", "ob1", "--mca", "btl", "tcp,vader,self",
               "--mca", "btl_tcp_if_include", IFACE, "--mca", "oob_tcp_if_include", IFACE,
               # the nodes share this machine's cores: ranks yield while they wait, as Open MPI
               # does by itself when it knows a node is oversubscribed
               "--mca", "mpi_yield_when_idle", "1",
               *(extra or [])]
        return self.exec_cmd("node1", cmd)

    def env(self, extra: dict | None = None) -> dict:
        e = dict(os.environ)
        e.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                  "PYTHONUNBUFFERED": "1", "HPCDQN_NETNS_TAG": self.tag,
                  "PYTHONPATH": str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")})
        e.pop("OMPI_MCA_rmaps_base_oversubscribe", None)   # the host file's slots decide
        e.update(extra or {})
        return e

    def run_mpi(self, n: int, args: list, timeout=300, map_by="slot", check=True, env=None,
                cwd=None, extra=None, slots=None) -> subprocess.CompletedProcess:
        """mpirun across the nodes: python ARGS on n ranks; kills everything on timeout.
        ``slots`` per node (default: n / nodes; ``slots=n`` with ``map_by="slot"``: all on node1)."""
        cmd = self.mpirun_cmd(n, map_by=map_by, slots=slots, extra=extra) + [sys.executable,
                                                                              *map(str, args)]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=cwd or ROOT, env=self.env(env), start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            self.kill_all()
            out, err = p.communicate()
            raise AssertionError(f"MPI job across nodes timed out after {timeout}s\n{cmd}\n"
                                 f"stdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
        r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
        if check and r.returncode != 0:
            raise AssertionError(f"MPI job across nodes failed ({r.returncode}): {cmd}\n"
                                 f"stdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}")
        return r

    def kill_all(self) -> None:
        """SIGKILL every process inside every node (what is left of a job)."""
        for node in self.names:
            for pid in self.pids(node):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def netns_nodes_fixture(n: int = 2):
    """Body of a ``netns_nodes`` fixture: start, yield, stop (also when a test fails). Skips with
    the reason when namespaces cannot be made here."""
    import pytest

    try:
        nodes = NetnsNodes.start(n)
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces: {e}")
    try:
        yield nodes
    finally:
        nodes.stop()


if __name__ == "__main__":  # pragma: no cover - manual use
    nodes = NetnsNodes.start()
    print(f"nodes {nodes.names} (tag {nodes.tag}); mpirun across them:\n  HPCDQN_NETNS_TAG={nodes.tag} "
          + " ".join(nodes.mpirun_cmd(4)), flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        nodes.stop()
