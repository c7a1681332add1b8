"""The layering rules as tests: `many` (the method) loads no orchestration library; imports point down only —
flows → tasks → many, never back; and no package's modules import each other in a cycle, whether the import sits at
module level or inside a function (a function-level import hides a cycle from Python, not from a reader)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("many", "tasks", "flows")
ORCHESTRATION = ("prefect", "ray", "fsspec", "s3fs")  # what `many` must never load
FORBIDDEN = {"many": ("tasks", "flows", *ORCHESTRATION), "tasks": ("flows",)}  # package → what it must not import


def module_files(package: str, root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} of every module of `package` under `root` (packages by their __init__.py)."""
    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(path: Path, module: str) -> Iterator[str]:
    """Every dotted name an import statement anywhere in the file names — module level, inside functions and
    classes, under `if TYPE_CHECKING:` — relative imports resolved against `module`. `from X import a` names X.a:
    the module X.a when there is one, else the name a in X (`import_graph` keeps the longest existing module)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts[: len(parts) - node.level + (1 if is_package else 0)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            yield from (source if alias.name == "*" else f"{source}.{alias.name}" for alias in node.names)


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the modules of the same package it imports}; `import a.b.c` of a non-module counts as its longest
    module prefix (the module that defines the name)."""
    files = module_files(package, root)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(path, module):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [m1, m2, …, m1], or None when it is acyclic (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # absent: unvisited, 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            following = next(stack[-1], None)
            if following is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(following) == 1:
                return path[path.index(following):] + [following]
            elif following not in state:
                state[following] = 1
                path.append(following)
                stack.append(iter(sorted(graph.get(following, ()))))
    return None


def test_importing_every_module_of_many_loads_no_orchestration_library() -> None:
    # peft itself imports fsspec (peft.peft_model → huggingface_hub.HfFileSystem), so `many` may load what `import
    # peft` loads and no more; no `many` module names an orchestration library itself (test_imports_point_down_only).
    script = (
        "import importlib, json, pkgutil, sys\n"
        f"def loaded(): return sorted(k for k in sys.modules if k.split('.')[0] in {ORCHESTRATION!r})\n"
        "import peft\n"
        "by_peft = loaded()\n"
        "import many\n"
        "names = [m.name for m in pkgutil.walk_packages(many.__path__, 'many.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({'modules': names, 'by_peft': by_peft, 'loaded': loaded()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["modules"]) == set(module_files("many")) - {"many"}  # the walk saw every file
    assert not {name.split(".")[0] for name in result["by_peft"]} - {"fsspec"}, result["by_peft"]
    extra = sorted(set(result["loaded"]) - set(result["by_peft"]))
    assert extra == [], f"importing many loads {extra}"


@pytest.mark.parametrize("package", FORBIDDEN)
def test_imports_point_down_only(package: str) -> None:
    upward = sorted(
        f"{module} imports {name}"
        for module, path in module_files(package).items()
        for name in set(imported_names(path, module))
        if name.split(".")[0] in FORBIDDEN[package]
    )
    assert upward == [], f"{package} must not import {FORBIDDEN[package]}: " + "; ".join(upward)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package: str) -> None:
    graph = import_graph(package)
    assert len(graph) > 3 and any(graph.values())  # the scan found modules and imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in {package}: " + " → ".join(cycle)


def test_the_cycle_check_can_fail(tmp_path: Path) -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    # Through the scan: a module-level import one way, a function-level (relative) import back.
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "low.py").write_text("import os\n\ndef f():\n    from .sub.high import g\n    return g\n")
    (package / "sub" / "high.py").write_text("from pkg.low import f\n\ndef g():\n    return f\n")
    (package / "side.py").write_text("from pkg import low\n")
    graph = import_graph("pkg", tmp_path)
    assert graph == {"pkg": set(), "pkg.sub": set(), "pkg.low": {"pkg.sub.high"}, "pkg.sub.high": {"pkg.low"},
                     "pkg.side": {"pkg.low"}}
    assert find_cycle(graph) == ["pkg.low", "pkg.sub.high", "pkg.low"]
    # And the upward-import scan sees function-level imports too.
    assert "pkg.sub.high.g" in set(imported_names(package / "low.py", "pkg.low"))
