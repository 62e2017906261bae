"""Imports run downward: each module of medvlp_jax may import only modules of a lower layer (or of its own package).

Read from the source with ``ast`` (module-level and function-level imports alike, nothing is executed). The
layers, bottom up (issue 12 describes the target; KNOWN_UPWARD lists what is left):

  0  types, registry, errors, numerics, metrics, logging_lib, env        (numerics, types, errors, metrics)
  1  data, methods, sharding                                             (components that know no model)
  2  models
  3  config_lib
  4  train
  5  evaluators, viz
  6  inference, benchmark_lib, run_summary
  7  app                                                                 (launch/ sits above it)
"""
import ast
import os

from tests import helpers

LAYERS = {
    0: ("types", "registry", "errors", "numerics", "metrics", "logging_lib", "env"),
    1: ("data", "methods", "sharding"),
    2: ("models",),
    3: ("config_lib",),
    4: ("train",),
    5: ("evaluators", "viz"),
    6: ("inference", "benchmark_lib", "run_summary"),
    7: ("app",),
}
RANK = {part: rank for rank, parts in LAYERS.items() for part in parts}

# Imports that still run upward or sideways (issue 12 is open): (importing module, imported part). The test fails
# on any other such import, and on an entry here that no longer occurs (remove it when you fix one).
KNOWN_UPWARD = {
    ("medvlp_jax.models.released.workdir", "train"),        # writing an imported workdir needs TrainState
    ("medvlp_jax.train.loop", "evaluators"),                # end-of-run evaluation (quick.evaluate_state)
    ("medvlp_jax.evaluators.grounding", "viz"),             # evaluators <-> viz
    ("medvlp_jax.viz", "evaluators"),                       # viz.save_heatmaps reads a localized split
}


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
    new = sorted(upward - KNOWN_UPWARD)
    fixed = sorted(KNOWN_UPWARD - upward)
    assert not new, f"imports that run upward or sideways (importer, imported part): {new}"
    assert not fixed, f"no longer upward: remove from KNOWN_UPWARD: {fixed}"


def test_the_ast_walk_sees_function_level_and_relative_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("from . import sibling\nfrom ..train import loop\ndef f():\n    from medvlp_jax import viz\n"
                    "    import medvlp_jax.metrics\n")
    got = _imports(str(path), "medvlp_jax.evaluators.m")
    assert {"medvlp_jax.evaluators", "medvlp_jax.train", "medvlp_jax.viz", "medvlp_jax.metrics"} <= got
