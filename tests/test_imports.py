"""The `bidirlm` package has no import circle (a static walk of every module's imports).

Every `import` / `from ... import` statement of every module counts, at module level or inside a
function, with relative imports resolved against the module's package. `from pkg import name`
counts as an import of `pkg.name` when that is a module, else of `pkg`. Importing `a.b.c` runs
`a/__init__` and `a/b/__init__` first, so those count as edges too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bidirlm

ROOT = Path(bidirlm.__file__).resolve().parent


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (packages by their __init__)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _with_parents(name: str, modules: dict[str, Path]) -> list[str]:
    """`a.b.c` -> the known modules among `a`, `a.b`, `a.b.c` (importing runs every __init__)."""
    parts = name.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in modules]


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module `name` imports (resolved, with parent packages)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(_with_parents(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.update(_with_parents(target, modules))
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    found.add(sub)
    found.discard(name)
    # a package's own parents are already imported when it runs: not an edge of interest
    return {m for m in found if not name.startswith(m + ".")}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_walker_finds_a_planted_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from pkg import a\n")
    (pkg / "c.py").write_text("from pkg.sub.b import x\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.b"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def test_no_import_circle_in_bidirlm() -> None:
    graph = import_graph()
    assert len(graph) > 50, sorted(graph)  # the walk saw the package
    cycles = find_cycles(graph)
    assert cycles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("bidirlm.runtime.safetensors_io", "bidirlm.runtime.merging"),
        ("bidirlm.runtime.safetensors_io", "bidirlm.runtime.models"),
        ("bidirlm.runtime.models.checkpoint", "bidirlm.runtime.merging"),
        ("bidirlm.runtime.models.encoder", "bidirlm.runtime.models.heads"),
        ("bidirlm.runtime.models.encoder", "bidirlm.runtime.models.omni"),
    ],
)
def test_no_upward_import(low: str, high: str) -> None:
    graph = import_graph()
    bad = sorted(m for m in graph[low] if m == high or m.startswith(high + "."))
    assert bad == [], f"{low} imports {bad}"


# Runtime folders from the bottom up: a module may import only from its own folder or a lower
# rank (the single-file modules at the runtime root are the floor; kernels sit below them all).
RANKS = {
    "bidirlm.kernels": 0,
    "bidirlm.runtime.safetensors_io": 1,
    "bidirlm.runtime.outputs": 1,
    "bidirlm.runtime.retrieval_task": 1,
    "bidirlm.runtime.jsonl": 1,
    "bidirlm.runtime.models": 2,
    "bidirlm.runtime.embedded": 2,
    "bidirlm.runtime.merging": 3,
    "bidirlm.runtime.training": 3,
    "bidirlm.runtime.evaluation": 4,
}


def _folder(module: str) -> str | None:
    return next((f for f in RANKS if module == f or module.startswith(f + ".")), None)


def test_no_upward_arrow_between_runtime_folders() -> None:
    graph = import_graph()
    bad = []
    for module, imported in graph.items():
        low = _folder(module)
        if low is None:
            continue
        for target in imported:
            high = _folder(target)
            if high is None or high == low:
                if high is None and target.startswith("bidirlm.") and target != "bidirlm.runtime":
                    bad.append(f"{module} -> {target} (outside the ranked layers)")
                continue
            if RANKS[high] >= RANKS[low]:
                bad.append(f"{module} -> {target}")
    assert bad == [], "upward or sideways imports: " + "; ".join(sorted(bad))
