"""Token-level helpers shared by the reconstructed objectives (SISTA, AGA, PLAN).

Owns: masked min-max normalisation, sparse word->patch grouping and a config reader with typo detection.
The diagonal cross-entropies (``common.diag_ce``, ``common.bidirectional_ce``), MGCA-style word weights
(``common.quantile_clipped_weights``) and the chunk mapper of the cross-sample local terms
(``common.map_in_chunks``; methods.md section 12.6: never build [b, b, t, p] at full batch) live in
``common``, shared with MGCA and GLoRIA.

Shapes: b = batch, t = text slots, p = patches, d = embedding width, c = report chunk.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from medvlp_jax.methods import common

Array = jax.Array


def read_config(settings_cls, cfg) -> Any:
    """Builds the frozen settings dataclass ``settings_cls`` from ``cfg`` (ConfigDict or dict).

    Keys of ``cfg`` that are not fields of ``settings_cls`` raise (a misspelt switch of a reconstructed
    method would otherwise be ignored silently); ``name`` is always allowed. Missing keys take the
    dataclass default. Tuples given as lists are converted.
    """
    fields = {f.name for f in dataclasses.fields(settings_cls)}
    items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
    unknown = sorted(set(items) - fields - {"name"})
    if unknown:
        raise ValueError(f"{settings_cls.__name__}: unknown config keys {unknown}; known: {sorted(fields)}")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in items.items() if k in fields}
    return settings_cls(**kwargs)


def epochs_to_steps(epochs: float | None, steps_per_epoch: int) -> int | None:
    """A duration in epochs as a whole number of optimiser steps (None stays None)."""
    if epochs is None:
        return None
    return int(round(float(epochs) * steps_per_epoch))


def wide(x: Array) -> Array:
    """x in at least float32 (bf16/f16 activations are widened for the losses; float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def masked_minmax(s: Array, mask: Array | None, axis: int = -1, eps: float = 1e-6) -> Array:
    """(s - min) / (max - min + eps) along ``axis``, min/max over masked-in entries; masked-out -> 0.

    Args:
      s: [..., n] scores.
      mask: [..., n] bool (broadcastable) or None (all valid).
    Returns:
      [..., n] in [0, 1); rows with no valid entry are all 0.
    """
    if mask is None:
        lo = jnp.min(s, axis=axis, keepdims=True)
        hi = jnp.max(s, axis=axis, keepdims=True)
        return (s - lo) / (hi - lo + eps)
    mask = jnp.broadcast_to(mask, s.shape)
    any_valid = jnp.any(mask, axis=axis, keepdims=True)
    lo = jnp.min(jnp.where(mask, s, jnp.inf), axis=axis, keepdims=True)
    hi = jnp.max(jnp.where(mask, s, -jnp.inf), axis=axis, keepdims=True)
    # Rows without any valid entry would give inf - inf: give them finite bounds (output is masked anyway).
    lo = jnp.where(any_valid, lo, 0.0)
    hi = jnp.where(any_valid, hi, 1.0)
    return jnp.where(mask, (s - lo) / (hi - lo + eps), 0.0)


def topk_mask(s: Array, k: int, mask: Array | None = None) -> Array:
    """Boolean mask of the k largest entries along the last axis (exactly k, ties broken by index).

    Args:
      s: [..., n]; mask: [..., n] bool or None (masked-out entries are never picked unless fewer than
        k entries are valid; the result is and-ed with the mask).
    Returns:
      [..., n] bool.
    """
    n = s.shape[-1]
    k = int(min(k, n))
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(s), k)                    # [..., k]
    chosen = jnp.sum(jax.nn.one_hot(idx, n, dtype=jnp.int32), axis=-2) > 0  # [..., n]
    return chosen if mask is None else chosen & mask


def uniform_word_weights(mask: Array) -> Array:
    """1/|T_b| on the valid words of each row, 0 elsewhere. mask: [b, t] bool. Returns [b, t]."""
    m = mask.astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)


def group_vectors(weights: Array, keys: Array) -> Array:
    """L2-normalised weighted sums: weights [..., n, m], keys [..., m, d] -> [..., n, d]."""
    return common.l2_normalize(jnp.einsum("...nm,...md->...nd", weights, keys))
