"""Compare two runs file by file: model.h5 ('online') and every params/*, adam/* and replay/* dataset of
the newest checkpoint (online, target, Adam moments per layer; the replay shard). Exits 1 unless
every array is bitwise equal (np.array_equal, same dtype and shape).

    python tests/cluster/compare_runs.py RUN_A RUN_B
"""
import sys
from pathlib import Path

import h5py
import numpy as np


def arrays(run: Path) -> dict:
    out = {}
    with h5py.File(run / "model.h5", "r") as f:
        out["model.h5:online"] = f["online"][...]
    ck = run / "checkpoints"
    name = (ck / "latest").read_text().strip()
    with h5py.File(ck / name, "r") as f:
        def visit(k, obj):
            if isinstance(obj, h5py.Dataset) and k.startswith(("params/", "adam/", "replay/")):
                out[f"{name}:{k}"] = obj[...]
        f.visititems(visit)
    return out


a, b = arrays(Path(sys.argv[1])), arrays(Path(sys.argv[2]))
ok = set(a) == set(b)
n_el = 0
for k in sorted(a):
    same = k in b and a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k])
    ok &= same
    n_el += a[k].size
if set(a) != set(b):
    print("different array names:", sorted(set(a) ^ set(b)))
print(f"{'BITWISE-EQUAL' if ok else 'DIFFERENT'}: {len(a)} arrays, {n_el} values "
      f"({sys.argv[1]} vs {sys.argv[2]})")
sys.exit(0 if ok else 1)
