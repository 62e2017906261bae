"""TrainState and its creation directly on the mesh (eval_shape -> shardings -> jit(init, out_shardings))."""
from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from medvlp_jax import sharding as sharding_lib
from medvlp_jax.data.example_batch import example_batch_for


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; saved whole in checkpoints.

    params: {"encoders": DualEncoder params, "method": objective-owned params}.
    model_state: non-trainable collections (BatchNorm "batch_stats"), {} when none.
    ema_params: EMA copy of params["encoders"] when the objective uses a teacher, else None.
    nonfinite_steps: how many updates were skipped because the loss or a gradient was not finite.
    """
    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Optional[Any]
    nonfinite_steps: jax.Array


def make_init_fn(config, model, objective, tx: optax.GradientTransformation, init_batch_size: int):
    """init(rng) -> TrainState (pure; jit it with out_shardings)."""

    def init(rng):
        model_rng, method_rng, state_rng = jax.random.split(rng, 3)
        batch = example_batch_for(config, init_batch_size, words=1)     # shapes only matter
        variables = model.init({"params": model_rng, "dropout": model_rng}, batch, train=False)
        variables = dict(variables)
        enc_params = variables.pop("params")
        out = model.apply({"params": enc_params, **variables}, batch, train=False)
        params = {"encoders": enc_params, "method": objective.init(method_rng, out)}
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, model_state=variables, opt_state=tx.init(params),
            rng=state_rng, ema_params=enc_params if objective.ema_decay else None,
            nonfinite_steps=jnp.zeros((), jnp.int32))

    return init


def state_shardings(config, abstract_state: TrainState, mesh) -> TrainState:
    """Shardings for every leaf: parameter-shaped leaves by the config's regex rules, the rest replicated."""
    return sharding_lib.tree_shardings(abstract_state, config.param_sharding, mesh)
