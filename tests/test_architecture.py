"""The house rules, checked: the import rule between packages (import-linter's contracts in
pyproject.toml, plus no cycles and no private names across modules), and the size limits."""

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("inference", "peers")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS_ALLOWED: set[str] = set()  # "path:function" of generated code, if any


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _project_files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def test_the_import_contracts_hold():
    run = _lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_root_contract_names_every_root_module():
    """Nothing below the composition root imports it: the forbidden contract must list each
    module of peers/ itself, so that a new root module is covered too."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (forbidden,) = [c for c in config["contracts"] if c["type"] == "forbidden"]
    root = {f"peers.{p.stem}" for p in (ROOT / "peers").glob("*.py") if p.stem != "__init__"}
    assert set(forbidden["forbidden_modules"]) == root


def test_a_forbidden_import_breaks_the_contract(tmp_path):
    """The rule is not vacuous: a copy of the code where the swarm imports the API fails it."""
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    routing = tmp_path / "peers" / "swarm" / "routing.py"
    routing.write_text(routing.read_text() + "\nimport peers.api.runs  # noqa\n")
    run = _lint_imports(tmp_path)
    assert run.returncode != 0
    assert "peers.swarm.routing -> peers.api.runs" in run.stdout, run.stdout


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES)
    modules = sorted(graph.modules)
    edges = {
        m: {n for n in graph.find_modules_directly_imported_by(m) if n in graph.modules} for m in modules
    }
    # Tarjan's strongly connected components: any with two or more modules is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in edges[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in modules:
        if m not in index:
            visit(m)
    assert cycles == []


def test_no_private_names_imported_across_modules():
    found = []
    for path in _project_files(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                found += [
                    f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert found == []


def test_files_and_functions_stay_small():
    """No file over 450 lines, no function over 60 (the code that is read most stays readable)."""
    long_files, long_functions = [], []
    for path in _project_files(*PACKAGES, "tests", "scripts"):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_FUNCTIONS_ALLOWED:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    assert long_files == [] and long_functions == []
