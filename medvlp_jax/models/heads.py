"""Projection heads from encoder width to the joint embedding space (methods.md 1.5, 3.1).

Kinds:
  * ``"linear"``: Dense(dim) (ConVIRT/CLIP; GLoRIA's global head; GLoRIA's local 1x1 conv has no bias,
    so ``use_bias`` is a field).
  * ``"mlp_bn"``: MGCA's head: Dense(hidden) -> BatchNorm -> ReLU -> Dense(dim) -> BatchNorm without scale
    or bias (torch ``BatchNorm1d(dim, affine=False)``).
  * ``"identity"``: no projection (GLoRIA's text side); ``dim`` is ignored.

Local features ([b, n, w]) go through the same stack position by position (MGCA's 1x1 Conv1d). The BatchNorm
statistics are taken over **batch x positions, every position included**: MGCA's local head sees the padded
word slots (zero vectors) too, so they count in the mean and variance and come out non-zero. We keep that on
purpose (faithful mode); the objectives mask padded slots afterwards. A masked-statistics BatchNorm would be
the "fixed" variant, not implemented here.

Under ``jit`` over a global batch the statistics span the global batch; MGCA's (DDP, no SyncBN) are
per device (methods.md 12.1) — that difference is the train step's to reproduce, not the head's.
BatchNorm uses torch defaults: eps 1e-5, momentum 0.1 (flax momentum 0.9).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

HEAD_KINDS = ("linear", "mlp_bn", "identity")


class ProjectionHead(nn.Module):
    """Projects features on their last axis; every leading axis is treated as batch.

    Attributes:
      kind: one of ``HEAD_KINDS``.
      dim: output width (128 MGCA, 768 GLoRIA, 512 ConVIRT).
      hidden: hidden width of ``mlp_bn`` (2048).
      use_bias: bias of the Dense layers (``linear`` and ``mlp_bn``).
      dtype: compute dtype of the Dense layers; BatchNorm statistics are float32.
    """
    kind: str = "linear"
    dim: int = 128
    hidden: int = 2048
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool = False) -> Array:
        """Args: x [..., w]; train: BatchNorm batch statistics + ``batch_stats`` update.

        Returns:
          [..., dim] (``identity``: x unchanged).
        """
        if self.kind == "identity":
            return x
        if self.kind == "linear":
            return nn.Dense(self.dim, use_bias=self.use_bias, dtype=self.dtype, name="dense")(x)
        if self.kind == "mlp_bn":
            # Flax BatchNorm reduces over every axis but the last: batch x positions for local features.
            norm = lambda name, **kw: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                                   dtype=self.dtype, use_fast_variance=False, name=name, **kw)
            x = nn.Dense(self.hidden, use_bias=self.use_bias, dtype=self.dtype, name="dense_in")(x)
            x = nn.relu(norm("bn_in")(x))
            x = nn.Dense(self.dim, use_bias=self.use_bias, dtype=self.dtype, name="dense_out")(x)
            return norm("bn_out", use_scale=False, use_bias=False)(x)
        raise ValueError(f"unknown projection head kind {self.kind!r}; known: {HEAD_KINDS}")
