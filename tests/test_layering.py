"""Imports run downward: each module of medvlp_jax may import only modules of a lower layer (or of its own package).

Read from the source with ``ast`` (module-level and function-level imports alike, nothing is executed). The
layers, bottom up (issue 12 describes the target):

  0  types, registry, errors, numerics, metrics, logging_lib, env        (numerics, types, errors, metrics)
  1  data, methods, sharding, viz                                        (components that know no model)
  2  models
  3  config_lib
  4  train
  5  evaluators, released                                               (released: checkpoint import)
  6  inference, benchmark_lib, run_summary, localization_study
  7  app                                                                 (launch/ sits above it)
"""
import ast
import os

from tests import helpers

LAYERS = {
    0: ("types", "registry", "errors", "numerics", "metrics", "logging_lib", "env"),
    1: ("data", "methods", "sharding", "viz"),
    2: ("models",),
    3: ("config_lib",),
    4: ("train",),
    5: ("evaluators", "released"),
    6: ("inference", "benchmark_lib", "run_summary", "localization_study"),
    7: ("app",),
}
RANK = {part: rank for rank, parts in LAYERS.items() for part in parts}

def _part(module: str) -> str:
    """'medvlp_jax.train.loop' -> 'train'; 'medvlp_jax' -> '' (the package's __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: str, module: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            if target in ("medvlp_jax",):                   # from medvlp_jax import train, viz, ...
                found.update(f"medvlp_jax.{a.name}" for a in node.names)
    return {m for m in found if m == "medvlp_jax" or m.startswith("medvlp_jax.")}


def _edges():
    root = os.path.join(helpers.ROOT, "medvlp_jax")
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            module = os.path.relpath(path[:-3], helpers.ROOT).replace(os.sep, ".")
            module = module[:-len(".__init__")] if module.endswith(".__init__") else module
            for target in _imports(path, module):
                yield module, target


def test_every_part_has_a_layer():
    root = os.path.join(helpers.ROOT, "medvlp_jax")
    parts = {n[:-3] if n.endswith(".py") else n for n in os.listdir(root)
             if (n.endswith(".py") and n != "__init__.py") or os.path.isdir(os.path.join(root, n, ""))
             and os.path.exists(os.path.join(root, n, "__init__.py"))}
    assert parts - set(RANK) == set(), f"give these a layer in LAYERS: {sorted(parts - set(RANK))}"


def test_imports_run_downward():
    upward = set()
    for module, target in _edges():
        src, dst = _part(module), _part(target)
        if not dst or src == dst or not src:
            continue
        if RANK[dst] >= RANK[src]:
            upward.add((module, dst))
    assert not upward, f"imports that run upward or sideways (importer, imported part): {sorted(upward)}"


def test_the_ast_walk_sees_function_level_and_relative_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from . import sibling\nfrom ..train import loop\ndef f():\n    from medvlp_jax import viz\n"
                    "    import medvlp_jax.metrics\n")
    got = _imports(str(path), "medvlp_jax.evaluators.m")
    assert {"medvlp_jax.evaluators", "medvlp_jax.train", "medvlp_jax.viz", "medvlp_jax.metrics"} <= got


def test_the_architecture_map_lists_these_layers():
    """docs/architecture.md's table names the same parts per layer as LAYERS."""
    import re
    table = {}
    for line in open(os.path.join(helpers.ROOT, "docs", "architecture.md")):
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if m:
            names = re.findall(r"`([^`]+)`", m.group(2))
            table[int(m.group(1))] = tuple(sorted(n.strip("/").removesuffix(".py") for n in names))
    assert table == {rank: tuple(sorted(parts)) for rank, parts in LAYERS.items()}
