"""The package boundaries of docs/architecture.md, read off the source: which covshift
package imports which, and no import cycle between modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "covshift"

# package -> the covshift packages it must not import (docs/architecture.md)
FORBIDDEN = {
    "nn": {"models", "data", "probe", "experiments", "store", "report", "integrations", "cli",
           "training", "checkpoints", "callbacks"},
    "models": {"probe", "experiments", "store", "report", "integrations", "cli"},
    "data": {"nn", "models", "probe", "experiments", "store", "report", "integrations", "cli"},
    "probe": {"experiments", "store", "report", "integrations", "cli", "training"},
    "store": {"nn", "models", "data", "probe", "experiments", "report", "integrations", "cli",
              "training", "checkpoints"},
    "report": {"cli"},
    "integrations": {"experiments", "report", "cli"},
    "batched": {"experiments", "report", "integrations", "cli"},
    "experiments": {"cli"},
}  # fmt: skip


def _imports(path: Path) -> set[str]:
    """The covshift modules ``path`` imports (absolute, dotted), anywhere in the file."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("covshift")}
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("covshift")
        ):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_they_may(package: str) -> None:
    bad = []
    for path in sorted((SRC / package).rglob("*.py")):
        for module in _imports(path):
            if _package(module) in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(SRC)} imports {module}")
    assert not bad, "\n".join(bad)


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_no_import_cycle_at_module_level() -> None:
    """Module-level imports (those run on import) form no cycle."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:  # top level only
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    # a package's __init__ importing its own submodules is how packages work: the
    # cycle that matters is between modules that need each other to load
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep.startswith(node + ".") or node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                cycle.extend(
                    [*stack[stack.index(dep) :], node, dep] if dep in stack else [node, dep]
                )
                return True
            if state.get(dep) is None and visit(dep, [*stack, node]):
                return True
        state[node] = 2
        return False

    for module in sorted(graph):
        if state.get(module) is None and visit(module, []):
            break
    assert not cycle, " -> ".join(cycle)
