"""Numerics shared by models and objectives (the bottom layer: imports only JAX)."""
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps) along ``axis``, with a finite gradient at x = 0.

    Written as x * rsqrt(max(||x||^2, eps^2)): the same value, but a zero vector (a padding word's empty
    group, say) gets gradient x / eps instead of sqrt's infinite derivative times zero = NaN.
    """
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.asarray(eps, sq.dtype) ** 2))
