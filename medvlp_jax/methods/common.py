"""Building blocks shared by the objectives: masked softmax/means, InfoNCE, normalisation."""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e9  # finite "minus infinity": exp() underflows to 0 and gradients stay NaN-free


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along ``axis``."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, eps)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of ``x`` over entries where ``mask``; 0 where nothing is selected."""
    mask = mask.astype(x.dtype)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_log_softmax(logits: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """log_softmax over entries where ``mask`` (others get NEG_INF before the softmax)."""
    return jax.nn.log_softmax(jnp.where(mask, logits, NEG_INF), axis=axis)


def cross_entropy_rows(logits: jax.Array, valid_cols: jax.Array | None = None) -> jax.Array:
    """Per-row CE with the diagonal as target. logits: [n, n]; valid_cols: [n] bool. Returns [n]."""
    n = logits.shape[0]
    if valid_cols is not None:
        keep = valid_cols[None, :] | jnp.eye(n, dtype=bool)
        logits = jnp.where(keep, logits, NEG_INF)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.diagonal(logp)


def infonce(img: jax.Array, txt: jax.Array, temperature, valid: jax.Array | None = None,
            i2t_weight: float = 0.5, reduce_directions: str = "mean"):
    """Bidirectional InfoNCE with the matching pairs on the diagonal.

    Args:
      img: [b, d] L2-normalised image embeddings.
      txt: [b, d] L2-normalised text embeddings.
      temperature: scalar (float or traced).
      valid: [b] bool; padded rows neither count nor act as negatives.
      i2t_weight: weight of the image->text direction; text->image gets 1 - i2t_weight.
      reduce_directions: "mean" -> w*i2t + (1-w)*t2i ; "sum" -> i2t + t2i (MGCA/ConVIRT-in-MGCA).
    Returns:
      (loss [], i2t [], t2i [], logits [b, b]).
    """
    b = img.shape[0]
    if valid is None:
        valid = jnp.ones((b,), bool)
    logits = jnp.einsum("id,jd->ij", img, txt) / temperature
    i2t = cross_entropy_rows(logits, valid)
    t2i = cross_entropy_rows(logits.T, valid)
    i2t = masked_mean(i2t, valid)
    t2i = masked_mean(t2i, valid)
    if reduce_directions == "sum":
        loss = i2t + t2i
    elif reduce_directions == "mean":
        loss = i2t_weight * i2t + (1.0 - i2t_weight) * t2i
    else:
        raise ValueError(f"reduce_directions must be 'mean' or 'sum', got {reduce_directions!r}")
    return loss, i2t, t2i, logits


def retrieval_accuracy(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Fraction of valid rows whose argmax is the diagonal. logits: [b, b]; valid: [b]."""
    logits = jnp.where(valid[None, :], logits, NEG_INF)
    hit = jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0])
    return masked_mean(hit.astype(jnp.float32), valid)
