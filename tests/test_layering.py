"""The house's layering: lens_core is usable from a notebook (it pulls in neither Prefect nor
Dask), imports go only downward (flows -> tasks -> lens_core), and no module imports itself back
through others (no import cycle, function-level imports included)."""

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import lens_core

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("flows", "tasks", "lens_core")  # each may import only itself and what comes after it


def test_lens_core_imports_no_orchestrator():
    modules = [
        m.name
        for m in pkgutil.walk_packages(lens_core.__path__, "lens_core.")
        if ".toy.train" not in m.name
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'dask', "
        "'distributed', 'prefect_dask'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert len(modules) > 15
    assert out.stdout.strip() == ""


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: project modules it imports}, from the source (every import statement,
    at any depth)."""
    files = {}
    for pkg in LAYERS:
        for path in (root / pkg).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {r for a in node.names if (r := resolve(a.name))}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    full = f"{base}.{a.name}"
                    if r := full if full in files else resolve(base):
                        deps.add(r)
        graph[mod] = deps - {mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_cycle_and_the_graph_is_real():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert (
        len(graph) > 40
        and "lens_core.store.run_store" in graph["lens_core.run"] | graph["lens_core.store"]
    )


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_imports_go_only_downward():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [
        (mod, dep)
        for mod, deps in import_graph().items()
        for dep in deps
        if rank[dep.split(".")[0]] < rank[mod.split(".")[0]]
    ]
    assert upward == []


def test_the_public_api_resolves_and_import_stays_light():
    code = (
        "import json, sys, lens_core\n"
        "light = 'torch' not in sys.modules\n"
        "missing = [n for n in lens_core.__all__ if getattr(lens_core, n, None) is None]\n"
        "print(json.dumps({'light': light, 'missing': missing, 'n': len(lens_core.__all__)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got == {"light": True, "missing": [], "n": got["n"]} and got["n"] > 15
