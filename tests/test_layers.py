"""The packages' layers: no import cycle within flaxdepth or torch_ref, or across the two, counting
imports inside functions too (they hide a cycle from Python's import machinery, not from a reader);
the light modules stay free of JAX and PyTorch; the public API resolves on first use."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("flaxdepth", "torch_ref")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))}


def imported(source: str, known: set[str]) -> set[str]:
    """The project modules a module's source imports anywhere (module level, functions, classes):
    `from flaxdepth import registry` names flaxdepth.registry, `from flaxdepth.cli import X` and
    `import flaxdepth.cli` name flaxdepth.cli, and a package's `_EXPORTS` table the modules of its
    names (imported on first use)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:  # a submodule, else a name the module itself defines
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in known else node.module)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            names.update(ast.literal_eval(node.value).values())  # a package's names imported on first use
    return {name for name in names if name in known}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(path.read_text(), set(found)) - {name} for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that returns to its start, or None."""
    state: dict[str, str] = {}  # "open" while on the path, "done" when every edge out is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for after in sorted(graph[node]):
            if state.get(after) == "open":
                return path[path.index(after):] + [after]
            if after not in state and (cycle := visit(after)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_or_across_the_packages():
    graph = import_graph()
    assert len(graph) > 20 and graph["flaxdepth.search"] >= {"flaxdepth.config", "flaxdepth.train"}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_scan_finds_a_cycle_hidden_in_a_function():
    """The negative control: an import inside a function that closes a loop is caught."""
    graph = import_graph()
    graph["flaxdepth.config"] = graph["flaxdepth.config"] | {"flaxdepth.search"}
    assert find_cycle(graph) is not None
    assert imported("def late():\n    from flaxdepth import search\n", set(graph)) == {"flaxdepth.search"}


@pytest.mark.parametrize("module", ["flaxdepth", "flaxdepth.registry", "flaxdepth.theory", "flaxdepth.trainability",
                                    "flaxdepth.config", "flaxdepth.cli", "flaxdepth.options", "torch_ref.models"])
def test_light_modules_import_neither_jax_nor_torch(module):
    """flaxdepth's public names are imported on first use: the registry, the theory, the
    trainability fits and the run configuration stay usable without JAX's or torch's start-up (torch_ref.models imports torch
    itself, and flaxdepth's registry without half-initializing flaxdepth)."""
    heavy = {"jax"} if module.startswith("torch_ref") else {"jax", "torch"}
    code = (f"import sys, {module}\n"
            f"print(sorted(name for name in {sorted(heavy)!r} if name in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_public_api_resolves_lazily():
    import flaxdepth

    assert flaxdepth.__version__
    for name in flaxdepth.__all__:
        assert getattr(flaxdepth, name) is not None, name
    assert flaxdepth.SweepConfig.__module__ == "flaxdepth.config"
    with pytest.raises(AttributeError):
        flaxdepth.no_such_name  # noqa: B018
