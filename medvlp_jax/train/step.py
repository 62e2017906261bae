"""The train step: one jitted function with explicit shardings and a donated state.

    state, metrics = train_step(state, batch)

Inside: objective-owned parameter preparation (outside the gradient), optional EMA-teacher forward,
forward + objective + gradient (optionally accumulated over micro-batches with lax.scan), the optimiser
update (``tx.update(..., step=step)``: AdamW, and the objective's frozen leaves when it declares any,
``train.optim.freeze_untrainable``), a finiteness guard (a non-finite loss or gradient
leaves params, optimiser and BatchNorm state untouched and is counted), the objective's running-statistics
update (``objective.update_state``, finite steps only) and the EMA update.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from medvlp_jax.train.state import TrainState
from medvlp_jax.types import LossContext


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


# config.train.prng_impl: the generator of the model's dropout bits. "threefry2x32" uses the step key as is (the
# state's key); the others draw a key of that implementation from it (jax.random.wrap_key_data), so runs stay
# reproducible and resumable from the same state key, only the masks differ (docs/benchmarks.md: why and when).
PRNG_IMPLS = ("threefry2x32", "philox4x32", "philox2x32", "threefry4x32", "rbg", "unsafe_rbg")
_KEY_WORDS = {"threefry2x32": 2, "philox4x32": 2, "philox2x32": 1, "threefry4x32": 4, "rbg": 4, "unsafe_rbg": 4}


def dropout_key(rng: jax.Array, prng_impl: str = "threefry2x32") -> jax.Array:
    """The dropout key of one step: ``rng`` (a raw threefry uint32[2] key) itself, or a typed key of
    ``prng_impl`` whose data are threefry bits drawn from ``rng``."""
    if prng_impl not in PRNG_IMPLS:
        raise ValueError(f"config.train.prng_impl={prng_impl!r}; use one of {PRNG_IMPLS}")
    if prng_impl == "threefry2x32":
        return rng
    words = jax.random.bits(rng, (_KEY_WORDS[prng_impl],), jnp.uint32)
    return jax.random.wrap_key_data(words, impl=prng_impl)


def map_diagnostic_metrics(objective, method_params, out, batch: dict) -> dict[str, jax.Array]:
    """The objective's ``map_diagnostics`` on the batch's own pairs, as ``attention/<name>`` scalars.

    Means over the valid rows of the batch (``batch["valid"]``, all rows when absent), taken on
    stop-gradient copies: the loss and its gradient are untouched. {} when the objective has none.
    """
    if objective.map_diagnostics is None:
        return {}
    out = jax.tree.map(jax.lax.stop_gradient, out)
    stats = objective.map_diagnostics(jax.lax.stop_gradient(method_params), out)
    b = out.img_emb.shape[0]
    valid = batch.get("valid", jnp.ones((b,), bool)).astype(jnp.float32)
    return {f"attention/{k}": jnp.sum(v * valid) / jnp.maximum(jnp.sum(valid), 1.0) for k, v in stats.items()}


def make_train_step(model, objective, tx: optax.GradientTransformation, schedule: Callable, *,
                    grad_accum_steps: int = 1, prng_impl: str = "threefry2x32",
                    map_diagnostics: bool = True) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns the (un-jitted) pure train step; ``jit_train_step`` adds shardings and donation.

    ``prng_impl`` (``config.train.prng_impl``) generates the dropout masks (``dropout_key``); the objective's
    ``rng`` stays the threefry step key. ``map_diagnostics`` (``config.train.map_diagnostics``) adds the
    objective's map statistics on the training batch to the metrics (``map_diagnostic_metrics``; with dropout,
    as the loss sees the batch), so a collapse of the word-to-region maps shows in the training curves.
    """
    if prng_impl not in PRNG_IMPLS:            # fail here, not inside jit
        raise ValueError(f"config.train.prng_impl={prng_impl!r}; use one of {PRNG_IMPLS}")

    def forward_loss(params, model_state, batch, step, rng, teacher_out):
        variables = {"params": params["encoders"], **model_state}
        mutable = list(model_state.keys())
        rngs = {"dropout": dropout_key(rng, prng_impl)}
        if mutable:
            out, new_model_state = model.apply(variables, batch, train=True, rngs=rngs, mutable=mutable)
        else:
            out, new_model_state = model.apply(variables, batch, train=True, rngs=rngs), {}
        loss, metrics = objective.loss(params["method"], out, batch, LossContext(step, rng, teacher_out))
        if map_diagnostics:
            metrics = dict(metrics, **map_diagnostic_metrics(objective, params["method"], out, batch))
        return loss, (metrics, dict(new_model_state))

    grad_fn = jax.value_and_grad(forward_loss, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict[str, jax.Array]]:
        step = state.step
        rng = jax.random.fold_in(state.rng, step)
        params = dict(state.params, method=objective.prepare_params(state.params["method"]))

        def teacher(b):
            if state.ema_params is None:
                return None
            out = model.apply({"params": state.ema_params, **state.model_state}, b, train=False)
            return jax.tree.map(jax.lax.stop_gradient, out)

        if grad_accum_steps == 1:
            (loss, (metrics, new_model_state)), grads = grad_fn(
                params, state.model_state, batch, step, rng, teacher(batch))
        else:
            micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

            def body(carry, xs):
                grads_acc, loss_acc, metrics_acc, model_state = carry
                i, mb = xs
                (l, (m, ms)), g = grad_fn(params, model_state, mb, step, jax.random.fold_in(rng, i), teacher(mb))
                add = lambda a, b: jax.tree.map(jnp.add, a, b)
                return (add(grads_acc, g), loss_acc + l, add(metrics_acc, m), ms or model_state), None

            first = jax.tree.map(lambda x: x[0], micro)
            _, (m_shape, _) = jax.eval_shape(forward_loss, params, state.model_state, first, step, rng, teacher(first))
            zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), t)
            init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), zeros(m_shape),
                    state.model_state)
            (grads, loss, metrics, new_model_state), _ = jax.lax.scan(
                body, init, (jnp.arange(grad_accum_steps), micro))
            scale = 1.0 / grad_accum_steps
            grads = jax.tree.map(lambda g: g * scale, grads)
            loss = loss * scale
            metrics = jax.tree.map(lambda m: m * scale, metrics)

        finite = jnp.isfinite(loss) & _all_finite(grads)
        tx_step = optax.with_extra_args_support(tx)      # freeze_untrainable reads the step
        updates, new_opt_state = tx_step.update(grads, state.opt_state, params, step=step)
        new_params = optax.apply_updates(params, updates)
        new_params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params)
        new_opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_opt_state, state.opt_state)
        new_model_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_model_state, state.model_state)
        if objective.update_state is not None:    # running statistics reported by the loss (no gradient)
            method, metrics = objective.update_state(new_params["method"], metrics)
            method = jax.tree.map(lambda n, o: jnp.where(finite, n, o), method, new_params["method"])
            new_params = dict(new_params, method=method)
        ema = state.ema_params
        if ema is not None:
            d = objective.ema_decay
            ema = jax.tree.map(lambda e, p: jnp.where(finite, d * e + (1 - d) * p, e), ema, new_params["encoders"])
        metrics = dict(metrics)
        metrics.update({
            "train/loss": loss,
            "train/grad_norm": optax.global_norm(grads),
            "train/param_norm": optax.global_norm(new_params["encoders"]),
            "train/lr": schedule(step),
            "train/finite": finite.astype(jnp.float32),
        })
        new_state = state.replace(step=step + 1, params=new_params, opt_state=new_opt_state,
                                  model_state=new_model_state, ema_params=ema,
                                  nonfinite_steps=state.nonfinite_steps + (1 - finite.astype(jnp.int32)))
        return new_state, metrics

    return train_step


def jit_train_step(train_step, state_shardings, batch_sharding, replicated):
    """jit with explicit in/out shardings; the state is donated (updated in place)."""
    return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))
