"""The package's layers, read from the source with `ast` (function-local imports included):
imports point down, no module imports another in a cycle, and the method core imports no
framework.  docs/layout.md shows the same table."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ds_smoes"

# bottom to top; a module may import modules of its own layer or of a layer below
LAYERS = [
    # test instruments (host-sync counting): any test may import them, no module of the package does
    ("testing", ["ds_smoes.testing"]),
    ("core", ["ds_smoes.core"]),
    ("parallel", ["ds_smoes.parallel"]),
    ("moe", ["ds_smoes.moe"]),
    ("models and data", ["ds_smoes.model", "ds_smoes.hf", "ds_smoes.data", "ds_smoes.compress"]),
    ("app", ["ds_smoes.app"]),
    ("sweeps and benchmarks", ["ds_smoes.sweep", "ds_smoes.bench"]),
    # the package root: `python -m` entry points and the 0.1 module names (aliases); nothing imports them
    ("entry points and aliases", ["ds_smoes"]),
]
FRAMEWORKS_BANNED = {
    "testing": {"deepspeed", "ray", "mlflow", "transformers"},
    "core": {"deepspeed", "ray", "mlflow", "transformers"},
    "parallel": {"ray", "mlflow", "transformers"},
    "moe": {"ray", "mlflow", "transformers"},
    "models and data": {"ray", "mlflow"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(ds_smoes modules, third-party top-level names) that `path` imports anywhere in its body."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()

    def add(target: str) -> None:
        if target == "ds_smoes" or target.startswith("ds_smoes."):
            internal.add(target)
        else:
            external.add(target.split(".")[0])

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:   # `from ds_smoes.pkg import submodule` imports the submodule
                sub = f"{target}.{alias.name}"
                add(sub if sub in modules else target)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            add(node.args[0].value)   # importlib.import_module("ds_smoes....")
    internal.discard(name)
    return internal, external


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer: add its package to LAYERS and to docs/layout.md"
    return best[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str]]]:
    modules = all_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_imports_point_down(graph):
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, (deps, _) in graph.items() for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_module_imports_the_root_aliases(graph):
    root = {m for m in graph if layer_of(m) == len(LAYERS) - 1 and m != "ds_smoes"}
    users = [f"{m} imports {d}" for m, (deps, _) in graph.items() for d in deps & root]
    assert not users, "import the real module, not the alias:\n" + "\n".join(users)


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, (set(), set()))[0]):
            if d not in graph:
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_lower_layers_import_no_framework_above_them(graph):
    bad = []
    for m, (_, external) in graph.items():
        banned = FRAMEWORKS_BANNED.get(LAYERS[layer_of(m)][0], set())
        bad += [f"{m} imports {e}" for e in sorted(external & banned)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_what_it_must(tmp_path):
    """The reader itself: function-local, relative and submodule imports are all seen."""
    pkg = tmp_path / "ds_smoes" / "core"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from ds_smoes.app import session\n    import mlflow\n")
    (pkg / "b.py").write_text("from . import a\nfrom .a import f\n")
    modules = {"ds_smoes.core.a": pkg / "a.py", "ds_smoes.core.b": pkg / "b.py", "ds_smoes.app.session": None}
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "ds_smoes"
    try:
        assert imports_of(pkg / "a.py", modules) == ({"ds_smoes.app.session"}, {"mlflow"})
        assert imports_of(pkg / "b.py", modules) == ({"ds_smoes.core.a"}, set())
    finally:
        PACKAGE = saved
    assert layer_of("ds_smoes.app.session") > layer_of("ds_smoes.core.a")
    assert layer_of("ds_smoes.train") == len(LAYERS) - 1


def test_modules_that_share_a_layer_with_the_model_import_first():
    """Importing a module of the models-and-data layer first, in a fresh interpreter, works: a package `__init__`
    that imports a sibling eagerly can make a first import circular (ds_smoes.compress.in_llm -> model.attention
    -> ds_smoes.model's __init__ -> model.vlm -> compress.in_llm, half-initialised), which the graph above does not
    see because it does not count a submodule import as an import of its package's `__init__`."""
    import json
    import subprocess
    import sys

    modules = sorted(m for m in all_modules() if m.startswith(("ds_smoes.compress", "ds_smoes.model.")))
    # one interpreter: before each module, every ds_smoes module is forgotten, so each is the package's first
    # import (torch and DeepSpeed stay loaded: a cycle inside ds_smoes does not depend on them)
    script = ("import importlib, json, sys\n"
              "failed = {}\n"
              "for m in sys.argv[1:]:\n"
              "    for name in [n for n in sys.modules if n == 'ds_smoes' or n.startswith('ds_smoes.')]:\n"
              "        del sys.modules[name]\n"
              "    try:\n"
              "        importlib.import_module(m)\n"
              "    except Exception as err:\n"
              "        failed[m] = f'{type(err).__name__}: {err}'\n"
              "print(json.dumps(failed))\n")
    proc = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(modules) > 10 and not failed, failed
