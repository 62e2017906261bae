"""Pre-LN Vision Transformer (ViT/DeiT layout) that also returns the last block's [CLS] attention.

MGCA reads the post-softmax attention of the last block, row of the [CLS] query, averaged over heads, as
patch importance (methods.md 1.2), so the blocks return their attention probabilities; only the last
block's are kept (inside ``jit`` the others are dead code). Every block also ``sow``s its probabilities
into the ``intermediates`` collection, so tests and visualisations can read all layers with
``mutable=["intermediates"]`` at no cost to training.

``SelfAttention`` is shared with ``bert.py``: both towers use separate query/key/value projections
(the Hugging Face layout; fused timm ``qkv`` weights are split on import) and a float32 softmax.

Parameter tree (``params``)::

    patch_embed/{kernel [ps, ps, c, w], bias [w]}
    cls_token [1, 1, w]
    pos_embed [1, 1 + gh * gw, w]
    block_{i}/{ln_1, attn/{query, key, value, out}, ln_2, mlp_in, mlp_out}
    ln_final/{scale, bias}
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.fusion_barrier import backward_fusion_barrier

Array = jax.Array
Dtype = Any


def gelu(x: Array) -> Array:
    """Exact (erf) GELU in torch.nn.GELU's form, x / 2 * (1 + erf(x / sqrt(2))), computed in x's dtype.

    ``jax.nn.gelu(approximate=False)`` computes x / 2 * erfc(-x / sqrt(2)): the same function (it differs by
    float rounding, ~1e-6 absolute, smaller in the far negative tail) but XLA:CPU expands erfc into three
    fusions that ran ~1.6x slower in wall time in a ViT-B/16 step on 2 cores (docs/benchmarks.md).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class SelfAttention(nn.Module):
    """Multi-head self-attention returning its post-softmax probabilities.

    Attributes:
      num_heads: number of heads; the width must be divisible by it.
      dtype: compute dtype of the projections (params stay float32); the softmax is float32.
      dropout_rate: dropout on the attention probabilities (BERT: 0.1); the returned probabilities are
        taken *before* dropout, so they do not depend on the dropout rng.
      kernel_init: initialiser of the four projections.
    """
    num_heads: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    kernel_init: Any = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: Array, bias: Optional[Array] = None, *, train: bool = False) -> tuple[Array, Array]:
        """Attends every position to every position.

        Args:
          x: [b, n, w] inputs.
          bias: optional additive logit bias broadcastable to [b, heads, n, n] (0 keep, very negative
            drop), e.g. the BERT padding mask [b, 1, 1, n].
          train: enables attention dropout.

        Returns:
          out: [b, n, w] in ``dtype``.
          probs: [b, heads, n, n] float32 post-softmax probabilities (before dropout).
        """
        b, n, w = x.shape
        if w % self.num_heads:
            raise ValueError(f"width {w} is not divisible by num_heads {self.num_heads}")
        hd = w // self.num_heads
        dense = lambda name: nn.Dense(w, dtype=self.dtype, kernel_init=self.kernel_init, name=name)
        split = lambda t: t.reshape(b, n, self.num_heads, hd)
        q, k, v = (split(dense(name)(x)) for name in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        self.sow("intermediates", "attn_probs", probs)
        dropped = nn.Dropout(self.dropout_rate)(probs, deterministic=not train)
        out = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(self.dtype), v).reshape(b, n, w)
        return dense("out")(out), probs


class ViTBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) with exact (erf) GELU."""
    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> tuple[Array, Array]:
        """Args: x [b, n, w]. Returns: (x [b, n, w], attention probabilities [b, heads, n, n])."""
        ln = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name=name)
        y, probs = SelfAttention(self.num_heads, dtype=self.dtype, name="attn")(ln("ln_1")(x), train=train)
        x = x + y
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(ln("ln_2")(x))
        # timm, DeiT and HF ViT all use the exact GELU (torch.nn.GELU default), not the tanh approximation.
        y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(gelu(y))
        return x + y, probs


class ViT(nn.Module):
    """ViT image tower: patch conv embedding, [CLS] token, learned absolute positions, pre-LN blocks.

    Defaults are ViT-B/16 at 224 (MGCA's DeiT-B/16). Demo size: width 192, depth 4, heads 3, mlp 768,
    image 128 (grid 8x8).

    Attributes:
      patch_size: square patch side (conv kernel and stride).
      width: token width w.
      depth: number of blocks.
      num_heads: attention heads.
      mlp_dim: hidden width of the MLP.
      image_size: side of the square input the position embedding is built for.
      layer_norm_eps: 1e-6 (timm/DeiT, MGCA); Hugging Face ViT configs default to 1e-12.
      dtype: compute dtype; parameters are always float32.
      remat: recompute each block in the backward pass (``nn.remat``) to save activation memory.
      fusion_barrier: materialise the residual stream's cotangent between blocks (``fusion_barrier.py``; XLA:CPU).
    """
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    image_size: int = 224
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    remat: bool = False
    fusion_barrier: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.patch_size
        return g, g

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> dict[str, Any]:
        """Encodes images.

        Args:
          images: [b, h, w, c] float, h == w == image_size.
          train: training mode (no dropout in this ViT; kept for a uniform tower interface).

        Returns:
          dict with
            cls: [b, width] final-LN [CLS] token.
            patches: [b, p, width] final-LN patch tokens, row-major over the (gh, gw) grid.
            attn: [b, p] last block's [CLS]-query attention on the patch keys, head-averaged, float32;
              the [CLS] key is excluded, so a row sums to 1 - attn_row[:, 0].
            attn_row: [b, 1 + p] the same row including the [CLS] key (sums to 1).
            grid: (gh, gw) static ints.
        """
        b, h, w, _ = images.shape
        gh, gw = self.grid
        if (h, w) != (gh * self.patch_size, gw * self.patch_size):
            raise ValueError(f"ViT built for {self.image_size}x{self.image_size} images, got {h}x{w}")
        x = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                    dtype=self.dtype, name="patch_embed")(images.astype(self.dtype))
        x = x.reshape(b, gh * gw, self.width)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + gh * gw, self.width), jnp.float32)
        x = x + pos.astype(x.dtype)

        # static_argnums=(2,): argument 0 is the module, 1 is x, 2 is the Python bool `train`.
        block_cls = nn.remat(ViTBlock, static_argnums=(2,)) if self.remat else ViTBlock
        probs = None
        for i in range(self.depth):
            x, probs = block_cls(self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dtype,
                                 name=f"block_{i}")(x, train)
            if self.fusion_barrier:
                x = backward_fusion_barrier(x)
        x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name="ln_final")(x)

        attn_row = probs[:, :, 0, :].mean(axis=1)                      # [b, 1 + p]
        return dict(cls=x[:, 0], patches=x[:, 1:], attn=attn_row[:, 1:], attn_row=attn_row, grid=(gh, gw))
