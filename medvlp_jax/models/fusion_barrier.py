"""A backward-pass fusion barrier between transformer blocks, for XLA:CPU.

Why: in the backward pass the residual stream's cotangent is accumulated block by block with element-wise
adds (plus each LayerNorm's element-wise backward). XLA:CPU's fusion pass fuses a cheap element-wise producer
into every consumer, duplicating it, so the cotangent at block i was recomputed inside each of its consumers
from the cotangents of all blocks above it: fusions of ~160 operands and ~550 operations per element, one per
consumer and block, i.e. work quadratic in the depth (profile in docs/benchmarks.md: "layer norm" backward,
24% of the ViT-B + BERT step on CPU; it also made compilation ~4x slower). A ``conditional`` is a boundary XLA
cannot fuse across, so passing the cotangent through one materialises it once per block.

``backward_fusion_barrier(x)`` is the identity in the forward pass; its backward returns the cotangent through
``lax.cond(isfinite(g[0]), identity, all-NaN)``: the same values whenever the cotangent's first element is
finite, and an all-NaN cotangent otherwise, so a non-finite gradient stays non-finite (the train step's
finiteness guard then skips the update, as before). The predicate reads data so XLA cannot fold the
conditional away (a constant one, or two identical branches, is removed and the fusion comes back).
GPU/TPU fusion does not duplicate like this, so the towers use it on CPU only (``enabled("auto")``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def backward_fusion_barrier(x: jax.Array) -> jax.Array:
    """Identity; its cotangent is materialised once (see the module docstring). x: any shape."""
    return x


def _fwd(x):
    return x, None


def _bwd(_, g):
    finite = jnp.isfinite(g.reshape(-1)[0])
    return (jax.lax.cond(finite, lambda t: t, lambda t: jnp.full_like(t, jnp.nan), g),)


backward_fusion_barrier.defvjp(_fwd, _bwd)


def enabled(setting) -> bool:
    """``config.model.fusion_barrier``: "auto" (the default: on when JAX's default backend is the CPU, where the
    duplicated fusions occur), "on" / "off" (or True / False)."""
    if isinstance(setting, str):
        value = setting.strip().lower()
        if value == "auto":
            return jax.default_backend() == "cpu"
        if value in ("on", "true", "1"):
            return True
        if value in ("off", "false", "0"):
            return False
        raise ValueError(f"config.model.fusion_barrier must be 'auto', 'on' or 'off', got {setting!r}")
    return bool(setting)
