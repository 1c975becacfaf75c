"""Static checks of the package's shape: what each stage script imports, and the import graph.

Imports are read from the source with :mod:`ast`, lazy imports inside functions included, and
so are module names written as strings (the head registry and the CLI import their modules by
name with :mod:`importlib`). Nothing is imported, so the checks are fast and see every branch.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

PACKAGE = "transferlab"
_MODULE_STRING = re.compile(rf"^{PACKAGE}(\.\w+)+$")


def module_file(source_root: Path, name: str) -> Path | None:
    """The file of module ``name`` (``transferlab.data.split``) below ``source_root`` (``src``)."""
    base = source_root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(source_root: Path, path: Path) -> str:
    """The dotted name of the module in ``path``."""
    parts = list(path.relative_to(source_root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source_root: Path, path: Path) -> set[str]:
    """The package modules that ``path`` imports anywhere (top level, functions, importlib strings)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from a.b import c`: c is a module when a file says so, otherwise a name in a.b
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if module_file(source_root, name) else node.module for name in names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(node.value):
            names = [node.value]
        for name in names:
            if (name == PACKAGE or name.startswith(PACKAGE + ".")) and module_file(source_root, name):
                found.add(name)
    return found


def import_graph(source_root: Path) -> dict[str, set[str]]:
    """Module name -> the package modules it imports, for every module of the package."""
    graph = {}
    for path in sorted((source_root / PACKAGE).rglob("*.py")):
        name = module_name(source_root, path)
        graph[name] = imported_modules(source_root, path) - {name}
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None when the graph is acyclic."""
    state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def files_run_by(script: Path, source_root: Path) -> set[Path]:
    """Every package file a stage script runs: its transitive imports plus their packages' __init__.py."""
    pending = list(imported_modules(source_root, script))
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(imported_modules(source_root, module_file(source_root, name)))
    files = set()
    for name in seen:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = module_file(source_root, ".".join(parts[:depth]))
            if path is not None:
                files.add(path)
    return files


def uncovered(files: Iterable[Path], deps: Iterable[str], repository: Path) -> list[str]:
    """The files (relative POSIX paths) that no dep names, itself or through a folder above it."""
    dep_paths = [Path(dep.rstrip("/")) for dep in deps]
    missing = []
    for path in files:
        relative = path.relative_to(repository)
        if not any(relative == dep or dep in relative.parents for dep in dep_paths):
            missing.append(relative.as_posix())
    return sorted(missing)


def stage_script(command: str) -> str | None:
    """The `stages/<name>.py` script that a dvc.yaml `cmd` runs, if any."""
    match = re.search(r"(stages/\w+\.py)", command)
    return match.group(1) if match else None


def deps_problems(dvc_yaml: Mapping, repository: Path, source_root: Path) -> dict[str, list[str]]:
    """Stage name -> package files its script runs that its dvc.yaml deps do not cover."""
    problems = {}
    for stage, definition in dvc_yaml["stages"].items():
        script = stage_script(definition["cmd"])
        if script is None:
            continue
        deps = [dep if isinstance(dep, str) else next(iter(dep)) for dep in definition.get("deps", [])]
        files = files_run_by(repository / script, source_root) | {repository / script}
        if missing := uncovered(files, deps, repository):
            problems[stage] = missing
    return problems


# Sub-packages from the bottom up: a module may import from its own sub-package and those before it.
LAYERS = ("core", "data", "tflite", "backbones", "features", "heads", "reports", "export", "cli")


def layer_of(module: str) -> str | None:
    """The sub-package of ``transferlab.<sub>.<module>``, or None for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def layer_violations(graph: Mapping[str, Iterable[str]], layers: Sequence[str] = LAYERS) -> list[str]:
    """Imports that point up the layer order, as ``"importer -> imported"`` lines."""
    rank = {name: index for index, name in enumerate(layers)}
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            source, destination = layer_of(module), layer_of(target)
            if source in rank and destination in rank and rank[destination] > rank[source]:
                found.append(f"{module} -> {target}")
    return found
