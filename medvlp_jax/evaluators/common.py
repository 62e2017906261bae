"""What every evaluator starts from: a pretraining run's config, model, encoder variables, mesh, tokenizer.

    run = load_run("runs/convirt_demo")                 # latest checkpoint of that workdir
    run = load_run("runs/convirt_demo", untrained=True) # same architecture, encoders at initialisation
    run.variables -> {"params": ..., "batch_stats": ...} for run.model.apply(...)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import ml_collections

from medvlp_jax import sharding as sharding_lib
from medvlp_jax.data import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Run:
    config: ml_collections.ConfigDict      # the pretraining config (workdir/config.json)
    workdir: str
    step: Optional[int]                    # checkpoint step, None when untrained
    model: Any                             # DualEncoder
    variables: dict[str, Any]              # encoder variables (params + batch_stats)
    method_params: Any                     # objective-owned params (e.g. MGCA prototypes)
    objective: Any
    mesh: Any
    tokenizer: Any
    state: Any                             # the whole TrainState
    untrained: bool = False                # encoders at initialisation (the baseline), not the checkpoint


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir!r} is not a pretraining workdir ({path} is missing)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, *, untrained: bool = False, step: Optional[int] = None, devices=None,
             overrides: Optional[dict[str, Any]] = None) -> Run:
    """Rebuilds the model of a pretraining workdir and restores (or, untrained, initialises) its state."""
    from medvlp_jax.train import checkpoint as ckpt_lib, loop
    config = load_config(workdir)
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config.param_sharding = [tuple(r) for r in config.param_sharding]
    s = loop.setup(config, devices=devices)
    if untrained:
        state = s.init_state()
        got = None
    else:
        state, got = ckpt_lib.restore_params(workdir, s.abstract, s.shardings, step)
    variables = {"params": state.params["encoders"], **state.model_state}
    return Run(config=config, workdir=workdir, step=got, model=s.model, variables=variables,
               method_params=state.params["method"], objective=s.objective, mesh=s.mesh,
               tokenizer=tokenizer_lib.load_tokenizer(config.data.tokenizer_dir), state=state,
               untrained=untrained)


def replicated(run: Run):
    return sharding_lib.replicated(run.mesh)
