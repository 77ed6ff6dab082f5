#!/usr/bin/env bash
# hpcdqn quick start: every command sets itself up first (idempotent, cached).
#   ./quickstart.sh train [hpcdqn train args...]   train the default job (CartPole-v1)
#   ./quickstart.sh test  [pytest args...]         run the whole test suite
#   ./quickstart.sh setup                          only set up (.venv with MPI-enabled h5py)
#   ./quickstart.sh run CMD...                     run CMD inside the set-up environment
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="${HPCDQN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
log() { printf '[hpcdqn setup] %s\n' "$*" >&2; }

need_root_apt() {
  # System MPI + parallel HDF5. On a cluster, `module load` puts mpicc on PATH
  # (and sets HDF5_DIR): we honour those and install nothing.
  local pkgs=()
  command -v mpicc >/dev/null 2>&1 || pkgs+=(openmpi-bin libopenmpi-dev)
  command -v mpirun >/dev/null 2>&1 || pkgs+=(openmpi-bin)
  if [ -z "${HDF5_DIR:-}" ]; then
    command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
    if ! pkg-config --exists hdf5-openmpi 2>/dev/null && ! pkg-config --exists hdf5-mpich 2>/dev/null; then
      pkgs+=(libhdf5-openmpi-dev pkg-config)
    fi
  fi
  [ ${#pkgs[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "hpcdqn setup: missing system packages: ${pkgs[*]}." >&2
    echo "  On Debian/Ubuntu run as root: apt-get install ${pkgs[*]}" >&2
    echo "  On a cluster: module load an MPI and a parallel HDF5 (mpicc on PATH, HDF5_DIR set)." >&2
    exit 1
  fi
  log "apt-get install ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
}

need_slurm() {
  # The Slurm tests (tests/test_slurm.py) start a private one-node cluster: slurmctld, slurmd and
  # munged from these packages. Installed when missing and we can (root + apt); otherwise those
  # tests skip. Fast when already installed: only `command -v` checks.
  local b missing=0
  for b in slurmctld slurmd sbatch srun scontrol munged; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing=1
  done
  [ "$missing" = 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    log "Slurm not installed (apt-get install slurmctld slurmd slurm-client munge): Slurm tests will skip"
    return 0
  fi
  log "apt-get install slurmctld slurmd slurm-client munge (for the Slurm tests)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null 2>&1 || true
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null ||
      log "could not install Slurm: Slurm tests will skip"
  }
}

quiet_pip() {
  # Run pip quietly: its output (warnings from local wheel folders in pip configs, setuptools
  # deprecation notes) is shown only when it fails.
  local out rc=0
  out="$("$@" 2>&1)" || rc=$?
  if [ "$rc" != 0 ]; then printf '%s\n' "$out" >&2; fi
  return "$rc"
}

find_python() {
  for p in "${HPCDQN_PYTHON:-}" python3.11 python3; do
    [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 10))' && { echo "$p"; return; }
  done
  echo "hpcdqn setup: need Python >= 3.10 (set HPCDQN_PYTHON=/path/to/python)" >&2; exit 1
}

setup() {
  need_root_apt
  local stamp="$VENV/.hpcdqn-stamp"
  local want
  want="$(cat constraints.txt pyproject.toml "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
  if [ -x "$PY" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0   # fast path: nothing changed since the last set-up
  fi
  if [ ! -x "$PY" ]; then
    log "creating virtualenv $VENV"
    "$(find_python)" -m venv "$VENV"
  fi
  local pipargs=("$PY" -m pip install -q --disable-pip-version-check -c constraints.txt)
  local pip=(quiet_pip "${pipargs[@]}")
  log "installing python dependencies (pinned in constraints.txt)"
  "${pip[@]}" --upgrade pip setuptools wheel
  # runtime, tests (pytest, minari), Atari (ale-py, opencv), LunarLander (box2d, pygame),
  # benchmark peer (stable-baselines3); then MinAtar
  "${pip[@]}" numpy mpi4py "cython>=3" pkgconfig torch gymnasium tqdm tensorboardX matplotlib \
    pytest pytest-timeout minari ale-py opencv-python-headless box2d pygame stable-baselines3
  # MinAtar (configs/minatar_*.toml): --no-deps, since its declared pandas/scipy/seaborn serve
  # only its own rendering, which hpcdqn never uses
  "${pip[@]}" --no-deps minatar
  if ! "$PY" -c 'import h5py, sys; sys.exit(0 if h5py.get_config().mpi else 1)' 2>/dev/null; then
    log "building h5py against parallel HDF5 (about 2 minutes, cached afterwards)"
    "$PY" -m pip uninstall -q -y h5py 2>/dev/null || true
    local pcname=hdf5-openmpi
    pkg-config --exists hdf5-openmpi 2>/dev/null || { pkg-config --exists hdf5-mpich 2>/dev/null && pcname=hdf5-mpich; }
    local envs=(HDF5_MPI=ON CC="${CC:-mpicc}")
    if [ -n "${HDF5_DIR:-}" ]; then envs+=(HDF5_DIR="$HDF5_DIR"); else envs+=(HDF5_PKGCONFIG_NAME="$pcname"); fi
    # --no-build-isolation: otherwise pip compiles its own mpi4py in the build env (>20 GB RAM).
    quiet_pip env "${envs[@]}" "${pipargs[@]}" --no-build-isolation --no-binary=h5py h5py
  fi
  "${pip[@]}" --no-deps --no-build-isolation -e .
  "$PY" -c 'import h5py; assert h5py.get_config().mpi, "h5py has no MPI"'
  echo "$want" > "$stamp"
  log "ready: $VENV"
}

mpi_env() {
  # Open MPI refuses to run as root unless told; tests and benchmarks oversubscribe 2 cores.
  if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
  export OMPI_MCA_rmaps_base_oversubscribe="${OMPI_MCA_rmaps_base_oversubscribe:-1}"
  export PATH="$VENV/bin:$PATH"
}

kill_grace() {
  # mpirun's grace between SIGTERM (Ctrl-C) and SIGKILL: the ranks' time to checkpoint and exit.
  # mpirun (Open MPI 4.1) also waits it out twice after any abnormal end (an agreed error, a
  # watchdog abort), even once every rank has left, so it is kept short; the tests set their own.
  export OMPI_MCA_odls_base_sigkill_timeout="${OMPI_MCA_odls_base_sigkill_timeout:-5}"
}

cmd="${1:-}"; [ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  train) setup; mpi_env; exec "$VENV/bin/hpcdqn" train "$@" ;;
  test)  setup; need_slurm; mpi_env; exec "$PY" -m pytest -q --durations=25 "$@" tests ;;
  run)   setup; mpi_env; kill_grace; exec "$@" ;;
  *) sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
