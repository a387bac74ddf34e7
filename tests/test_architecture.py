"""The layering of ARCHITECTURE.md, checked: imports flow one way, no cycles, no oversized module."""

import ast
from pathlib import Path

from conftest import ROOT

LAYERS = ["common", "vae", "ldm", "pipelines"]  # a package imports only itself and the ones to its left
MAX_LINES = 400


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports; `from pkg import sub` counts as importing `pkg.sub`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def test_packages_import_only_the_ones_to_their_left():
    wrong = [f"{name} imports {target}" for name, targets in import_graph().items() for target in targets
             if LAYERS.index(target.split(".")[0]) > LAYERS.index(name.split(".")[0])]
    assert wrong == []


def test_no_import_cycle_between_modules():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_over_400_lines():
    long = {name: n for name, path in project_modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_the_checker_sees_a_backward_import_and_a_cycle(tmp_path):
    """The checks above can fail: a planted `common` module that imports `pipelines` is flagged."""
    planted = ROOT / "common" / "_planted_for_test.py"
    planted.write_text("from pipelines import latent_pipeline\n")
    try:
        graph = import_graph()
        assert "pipelines.latent_pipeline" in graph["common._planted_for_test"]
        assert "common.data.listing" in graph["common.data.folders"]
        assert "common.data.devanagari" in graph["common.data.folders"]  # `from common.data import devanagari`
    finally:
        planted.unlink()
