"""The package's layering, read from the source with ``ast``: no import runs back up a layer, no modules import
each other in a loop (function-level and ``TYPE_CHECKING`` imports count: they are arrows all the same).

Run as a script (``python tests/test_layers.py [PACKAGE_DIR]``) it prints the house figures: the imports that
run back up, the cycles, and the largest modules and classes.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from fnmatch import fnmatchcase
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medgcsam"

# Lowest first. A module may import from its own layer or any lower one. A module's layer is that of the
# pattern matching it most closely: an exact name, else the longest pattern.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["medgcsam", "medgcsam.files", "medgcsam.progress", "medgcsam.cuda_capture", "medgcsam.devices",
              "medgcsam.checkpoint", "medgcsam.metrics"]),
    ("parts", ["medgcsam.data", "medgcsam.data.*", "medgcsam.models", "medgcsam.models.*", "medgcsam.optim",
               "medgcsam.optim.*"]),
    ("config", ["medgcsam.config"]),
    ("tracking", ["medgcsam.tracking", "medgcsam.tracking.*"]),
    ("measures", ["medgcsam.evaluation.metrics", "medgcsam.evaluation.calibration",
                  "medgcsam.evaluation.operating_point", "medgcsam.evaluation.predict", "medgcsam.evaluation.plots"]),
    ("inference", ["medgcsam.inference", "medgcsam.inference.*"]),
    ("analysis", ["medgcsam.evaluation", "medgcsam.evaluation.*", "medgcsam.sharpness", "medgcsam.sharpness.*"]),
    ("engine", ["medgcsam.engine", "medgcsam.engine.*"]),
    ("experiments", ["medgcsam.experiments", "medgcsam.experiments.*"]),
    ("api", ["medgcsam.cli", "medgcsam.__main__"]),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific pattern that matches ``module``."""
    matches = [(p == module, len(p), i) for i, (_, patterns) in enumerate(LAYERS) for p in patterns
               if fnmatchcase(module, p)]
    if not matches:
        raise KeyError(f"{module} is in no layer of tests/test_layers.py LAYERS; add it there")
    return max(matches)[2]


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> Iterator[str]:
    """Every ``medgcsam`` module that ``path`` imports anywhere in its body."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            targets = submodules or [base]  # `from pkg import submodule` is an arrow to the submodule
        else:
            continue
        yield from (t for t in targets if t in known)


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(package)
    return {name: set(imports(path, name, set(found))) - {name} for name, path in found.items()}


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in edges.items() for b in targets if layer_of(b) > layer_of(a))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def sizes(package: Path = PACKAGE) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines, module) and (lines, module.Class), largest first."""
    mods, classes = [], []
    for name, path in modules(package).items():
        text = path.read_text(encoding="utf-8")
        mods.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
    return sorted(mods, reverse=True), sorted(classes, reverse=True)


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_import_runs_back_up_a_layer() -> None:
    bad = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})" for a, b in upward(graph())]
    assert not bad, "imports that run back up a layer:\n  " + "\n  ".join(bad)


def test_no_import_cycles() -> None:
    found = cycles(graph())
    assert not found, f"modules that import each other in a loop: {found}"


def test_the_checks_see_a_back_up_import_and_a_cycle() -> None:
    """The walk itself works: a made-up graph with one arrow up and one loop is caught."""
    edges = {"medgcsam.files": {"medgcsam.engine.loop"}, "medgcsam.engine.loop": {"medgcsam.engine.state"},
             "medgcsam.engine.state": {"medgcsam.engine.loop"}}
    assert upward(edges) == [("medgcsam.files", "medgcsam.engine.loop")]
    assert cycles(edges) == [["medgcsam.engine.loop", "medgcsam.engine.state"]]


def main(package: Path) -> None:
    edges = graph(package)
    up, loops = upward(edges), cycles(edges)
    print(f"imports that run back up a layer: {len(up)}")
    for a, b in up:
        print(f"  {a} -> {b}")
    print(f"import cycles: {len(loops)}")
    for loop in loops:
        print("  " + " <-> ".join(loop))
    mods, classes = sizes(package)
    print("largest modules (lines): " + ", ".join(f"{n} {m}" for n, m in mods[:5]))
    print("largest classes (lines): " + ", ".join(f"{n} {c}" for n, c in classes[:5]))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE)
