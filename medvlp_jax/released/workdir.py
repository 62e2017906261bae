"""Shape checks against the model an imported config builds, and writing the pretraining workdir.

The workdir has the layout of one of our pretraining runs (what ``evaluators.common.load_run`` restores):
``config.json``, ``checkpoints/0/{state,data}`` (a whole ``TrainState`` at step 0: the imported encoder
variables, the method's parameters, a fresh optimiser state) and ``import_report.json``. Step 0 because
nothing was trained here; a pretraining run started in the workdir continues from the imported weights.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from medvlp_jax.released.namemap import CheckpointImportError, ReleasedImportReport, check_against


def _abstract(config) -> tuple[Any, Any]:
    """(abstract TrainState, optimiser) of ``config`` as ``train.setup.build`` makes them (no compilation, no
    data; the shapes do not depend on the mesh or the schedules, so one device and one step suffice)."""
    from medvlp_jax import sharding as sharding_lib
    from medvlp_jax.train.setup import build
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    setup = build(config, mesh, steps_per_epoch=1, total_steps=1, init_batch_size=1)
    return setup.abstract, setup.tx


def check_shapes(config, variables: dict, method_params: dict, report: ReleasedImportReport) -> None:
    """Compares every converted array with the model's (and objective's) variables; results go to ``report``."""
    abstract, _ = _abstract(config)
    checks = [check_against({"params": variables.get("params", {})}, {"params": abstract.params["encoders"]}),
              check_against({k: v for k, v in variables.items() if k != "params"}, abstract.model_state),
              check_against({"method": method_params}, {"method": abstract.params["method"]})]
    report.shapes_checked = sum(n for n, _ in checks)
    report.shape_mismatches = [p for _, problems in checks for p in problems]


def write_workdir(out: str, config, variables: dict, method_params: dict, report: ReleasedImportReport) -> str:
    """Writes config.json, the step-0 checkpoint and import_report.json into ``out`` (must be new or empty).

    Raises:
      CheckpointImportError: ``out`` is not empty, or the report is incomplete.
    """
    from medvlp_jax.train import checkpoint as ckpt_lib
    from medvlp_jax.train.state import TrainState
    report.raise_if_incomplete()
    if os.path.isdir(out) and os.listdir(out):
        raise CheckpointImportError(f"--out {out} is not empty ({sorted(os.listdir(out))[:5]}): choose a new directory")
    abstract, tx = _abstract(config)
    to_jnp = lambda tree: jax.tree.map(jnp.asarray, tree)
    params = to_jnp({"encoders": variables["params"], "method": method_params})
    model_state = to_jnp({k: v for k, v in variables.items() if k != "params"})
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                       opt_state=tx.init(params), rng=jax.random.split(jax.random.PRNGKey(config.seed), 3)[2],
                       ema_params=params["encoders"] if abstract.ema_params is not None else None,
                       nonfinite_steps=jnp.zeros((), jnp.int32))
    if jax.tree.structure(state) != jax.tree.structure(abstract):
        raise AssertionError("imported TrainState does not have the structure train.state.make_init_fn builds")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    ckpt = ckpt_lib.Checkpointer(out, every_steps=1, keep=1)
    ckpt.save(0, state, {"step": 0, "seed": int(config.seed), "examples_seen": 0}, force=True)
    ckpt.close()
    report.write(os.path.join(out, "import_report.json"))
    return out
