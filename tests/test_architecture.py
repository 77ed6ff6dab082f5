"""The package's shape, checked from its source: rooms depend one way, no import circles, no module
reaches for another module's underscore names, and functions stay short enough to read."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "hpcdqn"

# lower never imports higher: a room may import only itself and the rooms listed
ALLOWED = {
    "config": set(),
    "testing": set(),
    "sysinfo": {"config"},
    "rl": {"config"},
    "parallel": {"config", "rl", "sysinfo", "testing"},
    "learner": {"config", "rl", "parallel", "sysinfo"},
    "store": {"config", "rl", "parallel", "testing"},
    "metrics": {"sysinfo"},
    "plots": set(),
    "cluster": {"config", "rl", "parallel", "store", "metrics", "plots"},
    "train": {"config", "rl", "parallel", "learner", "store", "metrics", "plots", "sysinfo"},
    "actors": {"config", "rl", "parallel", "learner", "store", "metrics", "sysinfo", "train",
               "testing"},
    "info": {"config", "rl", "parallel", "store"},
    "cli": {"config", "rl", "parallel", "learner", "store", "cluster", "train", "info", "sysinfo",
            "actors"},
}
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PKG.rglob("*.py"))}


def resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_pkg = (PKG.parent / mod.replace(".", "/") / "__init__.py").is_file()
    base = mod.split(".")[: len(mod.split(".")) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(mod: str, tree: ast.Module, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported hpcdqn module, names taken from it, line) for every import, at any depth."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("hpcdqn")]
        elif isinstance(node, ast.ImportFrom):
            src = resolve(mod, node)
            if not src.startswith("hpcdqn"):
                continue
            for a in node.names:   # `from hpcdqn.store import modelfile` imports a module
                sub = f"{src}.{a.name}"
                out.append((sub, [], node.lineno) if sub in known else (src, [a.name], node.lineno))
    return out


def room(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_rooms_depend_one_way():
    mods = modules()
    bad = []
    for mod, tree in mods.items():
        r = room(mod)
        if r == "__init__":
            continue
        assert r in ALLOWED, f"{mod}: room '{r}' is not in the layering table of this test"
        for dep, _, line in imports(mod, tree, set(mods)):
            d = room(dep)
            if d not in (r, "__init__") and d not in ALLOWED[r]:
                bad.append(f"{mod}:{line} imports {dep} ({r} may import {sorted(ALLOWED[r])})")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    mods = modules()
    graph = {m: sorted({d for d, _, _ in imports(m, t, set(mods)) if d in mods and d != m})
             for m, t in mods.items()}
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_module_uses_another_modules_underscore_names():
    mods = modules()
    bad = []
    for mod, tree in mods.items():
        aliases = {}
        for dep, names, line in imports(mod, tree, set(mods)):
            bad += [f"{mod}:{line} imports {dep}.{n}" for n in names
                    if n.startswith("_") and n != "__version__" and dep != mod]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and resolve(mod, node).startswith("hpcdqn"):
                for a in node.names:
                    aliases[a.asname or a.name] = f"{resolve(mod, node)}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("hpcdqn"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and aliases.get(node.value.id) in mods):
                bad.append(f"{mod}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def longest_functions(n=5):
    rows = []
    for p in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{module_name(p)}.{node.name}"))
    return sorted(rows, reverse=True)[:n]


def test_functions_are_short():
    rows = longest_functions()
    assert rows[0][0] <= MAX_FUNCTION_LINES, f"longest functions: {rows}"


@pytest.mark.parametrize("probe", ["cycle", "underscore", "layering"])
def test_the_checks_catch_what_they_look_for(probe, tmp_path, monkeypatch):
    """Each check fails on a package that breaks its rule (so the checks above can fail)."""
    pkg = tmp_path / "hpcdqn"
    (pkg / "rl").mkdir(parents=True)
    (pkg / "parallel").mkdir()
    for f in ("__init__.py", "rl/__init__.py", "parallel/__init__.py", "config.py"):
        (pkg / f).write_text("")
    if probe == "cycle":
        (pkg / "rl" / "a.py").write_text("from hpcdqn.rl import b\n")
        (pkg / "rl" / "b.py").write_text("from hpcdqn.rl.a import x\n")
        check = test_no_import_circles
    elif probe == "underscore":
        (pkg / "rl" / "a.py").write_text("_hidden = 1\n")
        (pkg / "rl" / "b.py").write_text("from hpcdqn.rl import a\nprint(a._hidden)\n")
        check = test_no_module_uses_another_modules_underscore_names
    else:
        (pkg / "rl" / "a.py").write_text("from hpcdqn.parallel.b import x\n")
        (pkg / "parallel" / "b.py").write_text("x = 1\n")
        check = test_rooms_depend_one_way
    monkeypatch.setattr(__import__(__name__), "PKG", pkg)
    with pytest.raises(AssertionError):
        check()


def h5py_file_opens(tree: ast.Module) -> list[int]:
    """Lines that open an HDF5 file: ``h5py.File(...)``, or ``File(...)`` imported from h5py."""
    names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
             and n.module == "h5py" for a in n.names if a.name == "File"}
    return [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and (
        (isinstance(n.func, ast.Attribute) and n.func.attr == "File"
         and isinstance(n.func.value, ast.Name) and n.func.value.id == "h5py")
        or (isinstance(n.func, ast.Name) and n.func.id in names))]


def test_only_store_opens_hdf5_files():
    """Bytes on disk are ``store``'s business (its storage backends): no module outside
    ``hpcdqn.store`` opens an ``h5py.File``; the probe checks that the check can fail."""
    bad = [f"{mod}:{line}" for mod, tree in modules().items() if not mod.startswith("hpcdqn.store")
           for line in h5py_file_opens(tree)]
    assert not bad, "h5py.File opened outside hpcdqn.store: " + ", ".join(bad)
    probe = ast.parse("import h5py\nfrom h5py import File as F\nh5py.File('x')\nF('y')\n")
    assert h5py_file_opens(probe) == [3, 4]


def test_the_function_length_rule_flags_81_lines_and_passes_79(tmp_path, monkeypatch):
    """The length check fails on a package holding an 81-line function and passes a 79-line one."""
    import sys

    pkg = tmp_path / "hpcdqn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")

    def function(lines: int) -> str:       # a def line and lines - 1 body lines
        return "def f():\n" + "".join(f"    x{i} = {i}\n" for i in range(lines - 1))

    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    (pkg / "a.py").write_text(function(79))
    assert longest_functions(1)[0][0] == 79
    test_functions_are_short()
    (pkg / "a.py").write_text(function(81))
    assert longest_functions(1)[0][0] == 81
    with pytest.raises(AssertionError, match="longest functions"):
        test_functions_are_short()


# the loss functions of ``rl.td``: the learners get a loss object (``rl.losses``) and call it
LOSS_FUNCTIONS = {"td_loss", "td_target"}


def loss_calls_outside_rl(pkg: Path = None) -> list[str]:
    """Every call of (or import of) a loss function in a module outside ``hpcdqn.rl``."""
    pkg = pkg or PKG
    bad = []
    for p in sorted(pkg.rglob("*.py")):
        mod = ".".join(p.relative_to(pkg.parent).with_suffix("").parts)
        if mod == "hpcdqn.rl" or mod.startswith("hpcdqn.rl."):
            continue
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            name = None
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            elif isinstance(node, ast.ImportFrom):
                name = next((a.name for a in node.names if a.name in LOSS_FUNCTIONS), None)
            if name in LOSS_FUNCTIONS:
                bad.append(f"{mod}:{node.lineno} uses {name}")
    return bad


def test_only_rl_calls_the_loss_functions(tmp_path):
    """The learners and the pipeline runtime call the loss they are handed, never ``td_loss``
    / ``td_target`` themselves (so a new loss is ``rl/`` work); the check catches a call."""
    assert not loss_calls_outside_rl(), "\n".join(loss_calls_outside_rl())
    pkg = tmp_path / "hpcdqn"
    (pkg / "learner").mkdir(parents=True)
    (pkg / "rl").mkdir()
    (pkg / "rl" / "td.py").write_text("def td_loss(*a):\n    return a\n")
    (pkg / "learner" / "x.py").write_text("from hpcdqn.rl import td\ntd.td_loss(1)\n")
    assert loss_calls_outside_rl(pkg) == ["hpcdqn.learner.x:2 uses td_loss"]
