"""Optimiser: AdamW with linear warm-up and cosine decay (MGCA's schedule), global-norm clipping, and the
objective's frozen leaves (``freeze_untrainable``)."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warm-up from min_lr to lr over warmup_fraction * total_steps, then cosine down to min_lr."""
    warmup = int(round(optim_cfg.warmup_fraction * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=optim_cfg.min_lr, peak_value=optim_cfg.lr, warmup_steps=max(warmup, 0),
        decay_steps=max(total_steps, warmup + 1), end_value=optim_cfg.min_lr)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=optim_cfg.weight_decay))
    return optax.chain(*parts), schedule


def freeze_untrainable(inner: optax.GradientTransformation, trainable: Callable[[Any], Any]
                       ) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that leaves an objective declares untrainable are left alone at that step.

    ``trainable(step)`` returns a pytree of bool scalars matching the parameters, or a prefix of them (a bool
    for a whole subtree); ``step`` is passed to ``update`` as the extra argument ``step=``. Where it is False
    the update is 0 (no step, no weight decay) and every parameter-shaped part of ``inner``'s state (Adam's
    moments, found by ``optax.tree_utils.tree_map_params``) keeps its old value; the other parts (counts)
    advance as usual. The state is ``inner``'s own, so checkpoints do not change layout.
    """
    def update(updates, state, params=None, *, step, **extra_args):
        keep = jax.tree.map(lambda k, sub: jax.tree.map(lambda _: jnp.asarray(k), sub), trainable(step), updates)
        new_updates, new_state = optax.with_extra_args_support(inner).update(updates, state, params, **extra_args)
        new_updates = jax.tree.map(lambda k, u: jnp.where(k, u, jnp.zeros_like(u)), keep, new_updates)
        state_keep = optax.tree_utils.tree_map_params(
            inner, lambda _, k: k, new_state, keep, transform_non_params=lambda _: jnp.asarray(True))
        new_state = jax.tree.map(lambda k, n, o: jnp.where(k, n, o), state_keep, new_state, state)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update)


def freeze_objective_leaves(tx: optax.GradientTransformation, objective) -> optax.GradientTransformation:
    """``tx`` with the leaves ``objective.trainable(step)`` declares frozen left alone (``freeze_untrainable``
    over the state's {"encoders": ..., "method": ...} parameters; encoders always train), or ``tx`` itself
    when the objective freezes nothing."""
    if objective.trainable is None:
        return tx
    trainable = objective.trainable
    return freeze_untrainable(tx, lambda step: {"encoders": True, "method": trainable(step)})
