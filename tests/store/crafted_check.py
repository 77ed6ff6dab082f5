"""Open a (crafted) file the way hpcdqn does and report the outcome and this process's peak RSS
(VmHWM, from the kernel). argv: MODE PATH with MODE verify (a checkpoint file), resolve (a run
directory: the newest valid checkpoint, falling back) or model (a model.h5)."""
import json
import sys


def vmhwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return -1.0


mode, path = sys.argv[1], sys.argv[2]
from hpcdqn.store import resolve, verify  # noqa: E402
from hpcdqn.store.modelfile import load_model  # noqa: E402

base = vmhwm_mb()
out = {"ok": True, "kind": None, "error": None, "result": None}
try:
    if mode == "verify":
        verify(path)
    elif mode == "resolve":
        out["result"] = resolve(path).name
    else:
        load_model(path)
except Exception as e:  # noqa: BLE001 - the test checks which kind
    out.update(ok=False, kind=type(e).__name__, error=str(e))
out["rss_mb"], out["rss_base_mb"] = vmhwm_mb(), base
print(json.dumps(out))
