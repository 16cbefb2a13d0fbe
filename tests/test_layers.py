"""The package's shape: the layers contract holds, no module takes part in an import cycle, and the top-level
names a new user types first exist."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

import steadygrad as sg

ROOT = Path(__file__).resolve().parents[1]


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_cycle_finder_finds_a_cycle_and_nothing_else():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(edges) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_takes_part_in_an_import_cycle():
    # grimp reads every import statement, those inside functions too: a lazy import is still a dependency
    graph = grimp.build_graph("steadygrad")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert import_cycles(edges) == []


def test_layers_contract_is_kept():
    # import-linter is a dev dependency: a missing lint-imports fails here rather than skipping the contract
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports is not None, "lint-imports is not installed beside this Python: pip install -e '.[dev]'"
    result = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_top_level_names():
    from steadygrad.diagnose import diagnose
    from steadygrad.measure import Monitor
    from steadygrad.train import TrainConfig, Trainer

    assert sg.Monitor is Monitor
    assert sg.Trainer is Trainer
    assert sg.TrainConfig is TrainConfig
    assert sg.diagnose is diagnose and callable(sg.diagnose)
    for name in ("Monitor", "Trainer", "TrainConfig", "diagnose", "doctor", "probe", "build", "NetSpec"):
        assert name in sg.__all__
    assert all(hasattr(sg, name) for name in sg.__all__)
