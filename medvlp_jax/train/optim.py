"""Optimiser: AdamW with linear warm-up and cosine decay (MGCA's schedule), global-norm clipping."""
from __future__ import annotations

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
