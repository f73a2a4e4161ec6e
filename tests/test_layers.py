"""The package's layering: every import inside genseg points down (or within its own layer), and no modules import
each other in a cycle. Imports inside functions count as much as those at the top of a module.

    foundation (genseg, errors, io, config, viz, distributed) < data < models < runs < inference < evaluation < pipeline
    < training < workflows < serve < cli

runs.py is the leaf that reads run directories (the train-seg config, threshold, folds, log.csv), so inference and
evaluation never import the trainers. Training sits above pipeline, evaluation and inference because it uses them:
a diffusion run is saved as a diffusers pipeline, a segmentation run is scored by evaluation when it ends, and
--init-from loads its source with inference's loader.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "genseg"

LAYERS = [
    ("foundation", ["genseg", "genseg.errors", "genseg.io", "genseg.config", "genseg.viz", "genseg.distributed"]),
    ("data", ["genseg.data"]),
    ("models", ["genseg.models"]),
    ("runs", ["genseg.runs"]),
    ("inference", ["genseg.inference"]),
    ("evaluation", ["genseg.evaluation"]),
    ("pipeline", ["genseg.pipeline"]),
    ("training", ["genseg.training"]),
    ("workflows", ["genseg.workflows"]),
    ("serve", ["genseg.serve"]),
    ("cli", ["genseg.cli", "genseg.__main__"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """Index into LAYERS of the longest prefix naming `module` (the bare "genseg" only names the package itself)."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "genseg" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def import_edges(modules: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(importer, imported genseg module, "file:line") for every import statement in the tree, at any depth."""
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from genseg.x import y` imports the module genseg.x.y when there is one, else a name of genseg.x
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            else:
                continue
            found = []
            for target in targets:
                if target == "genseg" or target.startswith("genseg."):
                    while target not in modules:  # `import genseg.x.y` of a name: the module that holds it
                        target = target.rpartition(".")[0]
                    found.append(target)
            edges += [(name, target, where) for target in dict.fromkeys(found)]
    return edges


def upward(edges: list[tuple[str, str, str]]) -> list[str]:
    return [f"{where}: {src} ({LAYERS[layer_of(src)][0]}) imports {dst} ({LAYERS[layer_of(dst)][0]})"
            for src, dst, where in edges if layer_of(dst) > layer_of(src)]


def cycles(edges: list[tuple[str, str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), by Tarjan."""
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges:
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    modules = all_modules()
    assert len(modules) > 50, sorted(modules)
    for name in modules:
        layer_of(name)


def test_imports_point_down_and_form_no_cycle():
    modules = all_modules()
    edges = import_edges(modules)
    # a walk that missed most imports (or all function-local ones) would pass vacuously
    assert len(edges) > 200, len(edges)
    local = [e for e in edges if e[0] == "genseg.cli"]
    assert len(local) > 20, local  # cli imports almost everything inside its commands
    assert ("genseg.training.seg", "genseg.evaluation.evaluate") in {(s, d) for s, d, _ in edges}
    problems = upward(edges)
    assert not problems, "imports that point up a layer:\n" + "\n".join(problems)
    loops = cycles(edges)
    assert not loops, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in loops)


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checkers themselves, on made-up edges: an inference module importing training, and a two-module loop."""
    fake = [("genseg.inference.files", "genseg.training.seg", "genseg/inference/files.py:3"),
            ("genseg.data.records", "genseg.data.prepared", "x:1"), ("genseg.data.prepared", "genseg.data.records", "x:2")]
    assert upward(fake) == ["genseg/inference/files.py:3: genseg.inference.files (inference) imports "
                            "genseg.training.seg (training)"]
    assert cycles(fake) == [["genseg.data.prepared", "genseg.data.records"]]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("genseg_other.thing")


def test_function_local_imports_are_seen():
    """A relative import inside a function body resolves like one at the top of the module."""
    modules = all_modules()
    edges = import_edges(modules)
    cli_targets = {dst for src, dst, _ in edges if src == "genseg.cli"}
    assert {"genseg.workflows.demo", "genseg.serve.app", "genseg.training.seg"} <= cli_targets


def test_serving_loads_no_trainer():
    """`import genseg.serve.app` in a fresh interpreter loads no genseg.training module, and none of the genseg
    modules it loads imports accelerate. (accelerate itself still ends up in sys.modules: diffusers' ModelMixin,
    which the segmenter is, imports it, diffusers/quantizers/bfl/utils.py in diffusers 0.42; that is not ours.)"""
    code = "import json, sys; import genseg.serve.app; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    ours = [name for name in loaded if name == "genseg" or name.startswith("genseg.")]
    assert "genseg.serve.app" in ours and "genseg.inference.segmenter" in ours
    assert not [name for name in ours if name.startswith("genseg.training")], ours
    modules = all_modules()
    for name in ours:
        for node in ast.walk(ast.parse(modules[name].read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not [n for n in names if n.split(".")[0] == "accelerate"], f"{name} imports accelerate"
