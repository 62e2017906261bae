"""BERT text tower with Hugging Face ``BertModel`` semantics (methods.md 1.3).

Embeddings (word + position + token type) -> LayerNorm -> dropout, then post-LN layers:
``x = LN(x + Attn(x))``, ``x = LN(x + Dense(GELU(Dense(x))))`` with the exact (erf) GELU, LayerNorm eps
1e-12, padding removed from the keys by an additive mask. ``hf_import.py`` maps Hugging Face checkpoints onto
this parameter tree; the parity tests compare against PyTorch ``BertModel``.

Options for the peers' choices:
  * ``use_position_ids=False`` reproduces MGCA's quirk: every token gets the position-0 embedding (MGCA
    passes token-type ids in the position-id slot; authors confirm in MGCA issue #13).
  * ``sum_last_layers=4`` is GLoRIA: ``tokens`` is the sum of the last 4 layers' hidden states.

Every layer ``sow``s its attention probabilities ([b, heads, l, l]) into ``intermediates`` and the tower
sows every hidden state (``hidden_states``: embeddings output, then each layer), so tests can compare all
layers with ``mutable=["intermediates"]`` while training pays nothing.

Parameter tree (``params``)::

    word_embeddings/embedding [vocab, w]
    position_embeddings/embedding [max_position, w]
    token_type_embeddings/embedding [type_vocab, w]   (absent when type_vocab_size == 0)
    embeddings_ln/{scale, bias}
    layer_{i}/{attn/{query, key, value, out}, attn_ln, mlp_in, mlp_out, mlp_ln}
    pooler/{kernel, bias}                      (only with add_pooler=True)
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from medvlp_jax.models.fusion_barrier import backward_fusion_barrier
from medvlp_jax.models.vit import SelfAttention, gelu

Array = jax.Array
Dtype = Any

# BERT initialises every Linear and Embedding with N(0, 0.02) (HF ``initializer_range``).
_INIT = nn.initializers.normal(0.02)


class BertLayer(nn.Module):
    """One post-LN encoder layer."""
    num_heads: int
    mlp_dim: int
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, bias: Array, train: bool = False) -> tuple[Array, Array]:
        """Args: x [b, l, w]; bias [b, 1, 1, l] additive key mask. Returns (x [b, l, w], probs [b, h, l, l])."""
        ln = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, use_fast_variance=False, name=name)
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
        y, probs = SelfAttention(self.num_heads, dtype=self.dtype, dropout_rate=self.attention_dropout,
                                 kernel_init=_INIT, name="attn")(x, bias, train=train)
        x = ln("attn_ln")(x + drop(y))
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_INIT, name="mlp_in")(x)
        y = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_INIT, name="mlp_out")(gelu(y))
        return ln("mlp_ln")(x + drop(y)), probs


class Bert(nn.Module):
    """BERT encoder (defaults: BERT-base / Bio_ClinicalBERT sizes).

    Attributes:
      vocab_size: WordPiece vocabulary size (28,996 Bio_ClinicalBERT; 30,522 uncased BERT/MiniLM).
      width: hidden size w.
      depth: number of layers (MGCA keeps the first 6 of Bio_ClinicalBERT's 12).
      num_heads: attention heads.
      mlp_dim: intermediate size.
      max_position: number of learned positions (512).
      type_vocab_size: token-type vocabulary (2); 0 builds no token-type embedding (MGCA's BLIP BERT).
      layer_norm_eps: 1e-12 as in BERT.
      dropout: hidden dropout (embeddings, attention output, MLP output), active only when train=True.
      attention_dropout: dropout on attention probabilities, active only when train=True.
      use_position_ids: False reproduces MGCA (all tokens at position 0); True uses 0..l-1.
      sum_last_layers: ``tokens`` = sum of the last k layers' hidden states (1: last layer; GLoRIA: 4).
      add_pooler: also build BERT's pooler (tanh(Dense(cls))) and return ``pooled``.
      dtype: compute dtype (params float32; softmax float32).
      remat: recompute each layer in the backward pass.
      fusion_barrier: materialise the hidden state's cotangent between layers (``fusion_barrier.py``; XLA:CPU).
    """
    vocab_size: int = 28996
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    use_position_ids: bool = True
    sum_last_layers: int = 1
    add_pooler: bool = False
    dtype: Dtype = jnp.float32
    remat: bool = False
    fusion_barrier: bool = False

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array, train: bool = False,
                 position_ids: Optional[Array] = None, token_type_ids: Optional[Array] = None) -> dict[str, Any]:
        """Encodes token sequences.

        Args:
          input_ids: [b, l] int token ids.
          attention_mask: [b, l] 1 for real tokens ([CLS], pieces, [SEP]), 0 for padding.
          train: enables dropout (needs the ``dropout`` rng).
          position_ids: optional [b, l] or [l] explicit positions; overrides ``use_position_ids``.
          token_type_ids: optional [b, l]; zeros by default (single-segment input).

        Returns:
          dict with
            cls: [b, w] ``tokens[:, 0]`` (the [CLS] hidden state; with sum_last_layers > 1 the summed one).
            tokens: [b, l, w] last layer's hidden states, or the sum of the last ``sum_last_layers``.
            attn: [b, l] last layer's [CLS]-query attention probabilities (pre-dropout), head-averaged,
              float32; exactly 0 on padding keys.
            pooled: [b, w] only with add_pooler=True.
        """
        b, l = input_ids.shape
        if not 1 <= self.sum_last_layers <= self.depth:
            raise ValueError(f"sum_last_layers={self.sum_last_layers} must be in [1, depth={self.depth}]")
        if l > self.max_position and position_ids is None and self.use_position_ids:
            # jnp.take would return NaN rows for positions past the table instead of failing.
            raise ValueError(f"text length {l} exceeds max_position {self.max_position}")
        if position_ids is None:
            position_ids = jnp.arange(l) if self.use_position_ids else jnp.zeros((l,), jnp.int32)
        position_ids = jnp.broadcast_to(position_ids, (b, l))
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, l), jnp.int32)

        embed = lambda n, name: nn.Embed(n, self.width, embedding_init=_INIT, name=name)
        x = (embed(self.vocab_size, "word_embeddings")(input_ids)
             + embed(self.max_position, "position_embeddings")(position_ids))
        if self.type_vocab_size > 0:   # 0: no token-type table at all (MGCA's BLIP BERT has none)
            x = x + embed(self.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = nn.LayerNorm(self.layer_norm_eps, use_fast_variance=False, name="embeddings_ln")(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train).astype(self.dtype)

        # HF adds finfo(dtype).min on masked keys; any very negative float32 gives exact zeros after softmax.
        bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
        hidden = [x]
        probs = None
        for i in range(self.depth):
            x, probs = layer_cls(self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dropout,
                                 self.attention_dropout, self.dtype, name=f"layer_{i}")(x, bias, train)
            if self.fusion_barrier:
                x = backward_fusion_barrier(x)
            hidden.append(x)
        self.sow("intermediates", "hidden_states", tuple(hidden))

        tokens = hidden[-1]
        if self.sum_last_layers > 1:
            tokens = sum(h.astype(jnp.float32) for h in hidden[-self.sum_last_layers:]).astype(self.dtype)
        out = dict(cls=tokens[:, 0], tokens=tokens, attn=probs[:, :, 0, :].mean(axis=1))
        if self.add_pooler:
            out["pooled"] = jnp.tanh(nn.Dense(self.width, dtype=self.dtype, kernel_init=_INIT,
                                              name="pooler")(hidden[-1][:, 0]))
        return out
