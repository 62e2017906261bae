"""The dual encoder: image tower + text tower + four projection heads -> ``EncoderOutputs``.

This is the single ``apply`` the train step calls::

    model = build_model(config.model)
    variables = model.init({"params": rng}, example_batch(config.model), train=False)
    out, updates = model.apply(variables, batch, train=True, rngs={"dropout": rng},
                               mutable=["batch_stats"])         # only when "batch_stats" in variables
    img = model.apply(variables, batch, method=DualEncoder.encode_image)   # ImageOutputs, eval mode
    txt = model.apply(variables, batch, method=DualEncoder.encode_text)    # TextOutputs, eval mode

``batch_stats`` exists when a tower or head has BatchNorm (ResNet, ``mlp_bn`` heads); ViT + linear heads
have none. The text tower needs the ``dropout`` rng when ``train=True`` and ``text.dropout > 0``.

Text slots (methods.md 1.4). ``batch["word_ids"]`` [b, l] gives the slot of each token after word-piece
merging: [CLS] -> 0, pieces of the k-th word -> k ([UNK] is an ordinary word), [SEP] -> n_words + 1,
padding -> -1 (data/tokenizer.py). With
``text.merge_word_pieces`` a slot's feature is the SUM of its pieces' features (every layer that is summed
by ``sum_last_layers`` included) and its attention the SUM of its pieces' [CLS]-row attentions; slots are
padded with zero vectors up to l. Otherwise every token is its own slot (``word_ids`` may then be absent:
it is derived from ``attention_mask``). Slot 0 is always [CLS]; ``word_mask`` marks the real words (not
[CLS], [SEP] or padding), ``slot_mask`` every occupied slot. Unoccupied slots have zero features before the
word head (as in MGCA, whose local head then makes them non-zero).

Submodule / parameter names: ``image``, ``text``, ``img_head``, ``txt_head``, ``patch_head``,
``word_head``. ``hf_import.load_text_tower`` replaces ``params["text"]``.

``config.model`` fields: ``model_config.py`` (ImageConfig, TextConfig, ProjConfig, ModelConfig), each with its
default; ``model_config.read`` rejects unknown keys and treats a None value as absent. ``image.name`` picks
the size defaults (``VIT_PRESETS`` / ``RESNET_PRESETS``): every size field set in the config overrides them.
``text.full_length_tail="drop"`` reproduces MGCA's ``aggregate_tokens`` (methods.md 1.4): its loop zips the l
tokens with the l-1 attention entries, so for a report that fills all l tokens ([SEP] at position l-1, e.g.
every truncated report) it stops before position l-1, never reaches [SEP] and never flushes the word in
progress: the last word's and [SEP]'s slots stay empty (zero features and attention, outside
``slot_mask``/``word_mask``). Only with ``merge_word_pieces`` (MGCA's token path has no such loop);
configs/mgca.py sets it (faithful default). ``fusion_barrier`` materialises the residual stream's cotangent
between ViT blocks / BERT layers (``fusion_barrier.py``); values are unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from medvlp_jax import numerics
from medvlp_jax.data.example_batch import example_batch as data_example_batch
from medvlp_jax.models import fusion_barrier, model_config
from medvlp_jax.models.bert import Bert
from medvlp_jax.models.heads import ProjectionHead
from medvlp_jax.models.model_config import RESNET_PRESETS, VIT_PRESETS
from medvlp_jax.models.resnet import ResNet
from medvlp_jax.models.vit import ViT
from medvlp_jax.types import EncoderOutputs

Array = jax.Array



@flax.struct.dataclass
class ImageOutputs:
    """``encode_image`` result; fields as in ``EncoderOutputs``.

    Attributes:
      img_emb: [b, d]; patch_emb: [b, p, d]; patch_attn: [b, p] or None (CNN);
      img_feat: [b, w_img]; patch_feat: [b, p, w_loc] (w_loc = w_img for ViT, layer3 width for ResNet);
      grid: (gh, gw) static; grid_centres: static cell centres or None (``EncoderOutputs.grid_centres``).
    """
    img_emb: Array
    patch_emb: Array
    patch_attn: Optional[Array]
    img_feat: Array
    patch_feat: Array
    grid: tuple[int, int] = flax.struct.field(pytree_node=False, default=(1, 1))
    grid_centres: Optional[tuple] = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class TextOutputs:
    """``encode_text`` result; fields as in ``EncoderOutputs``.

    Attributes:
      txt_emb: [b, d]; word_emb: [b, t, d]; word_mask, slot_mask: [b, t] bool; word_attn: [b, t];
      txt_feat: [b, w_txt]; word_feat: [b, t, w_txt]. t == l (slots padded to the token length).
    """
    txt_emb: Array
    word_emb: Array
    word_mask: Array
    slot_mask: Array
    word_attn: Array
    txt_feat: Array
    word_feat: Array


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """cfg.get(key) for ConfigDict/dict/None; a None value counts as absent (``example_batch`` reads raw keys)."""
    if cfg is None:
        return default
    value = cfg.get(key, default)
    return default if value is None else value


def compute_dtype(model_cfg: Any) -> Any:
    """The compute dtype named by ``config.model.dtype``."""
    return jnp.dtype(model_config.read(model_cfg).dtype)


def build_image_tower(model_cfg: Any) -> nn.Module:
    """ViT or ResNet from ``config.model.image`` (``model_config.ImageConfig``)."""
    m = model_config.read(model_cfg)
    icfg, dtype = m.image, jnp.dtype(m.dtype)
    if icfg.name in VIT_PRESETS:
        sizes = {k: v if getattr(icfg, k) is None else getattr(icfg, k) for k, v in VIT_PRESETS[icfg.name].items()}
        eps = {} if icfg.layer_norm_eps is None else {"layer_norm_eps": icfg.layer_norm_eps}
        return ViT(**sizes, **eps, dtype=dtype, remat=m.remat, fusion_barrier=fusion_barrier.enabled(m.fusion_barrier))
    preset = RESNET_PRESETS[icfg.name]        # ImageConfig checked the name
    local = {} if icfg.local_stage is None else {"local_stage": icfg.local_stage}
    return ResNet(stage_sizes=tuple(preset["stage_sizes"] if icfg.stage_sizes is None else icfg.stage_sizes),
                  base_width=preset["width"] if icfg.width is None else icfg.width,
                  resize_to=icfg.resize_to or None, dtype=dtype, remat=m.remat, **local)


def build_text_tower(model_cfg: Any) -> Bert:
    """BERT from ``config.model.text``; unset fields take ``Bert``'s defaults (BERT-base)."""
    m = model_config.read(model_cfg)
    return Bert(**m.text.bert_kwargs(), dtype=jnp.dtype(m.dtype), remat=m.remat,
                fusion_barrier=fusion_barrier.enabled(m.fusion_barrier))


def build_head(model_cfg: Any, role: str) -> ProjectionHead:
    """Projection head for ``role`` in HEAD_ROLES from ``config.model.proj``."""
    m = model_config.read(model_cfg)
    return ProjectionHead(kind=m.proj.kind_of(role), dim=m.proj.dim, hidden=m.proj.hidden,
                          use_bias=bool(getattr(m.proj, f"{role}_bias")), dtype=jnp.dtype(m.dtype))


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||_2, eps) on the last axis, in float32 (torch F.normalize).

    As x * rsqrt(max(||x||^2, eps^2)): same values, and a finite gradient at x = 0 (an empty word slot), where
    the derivative of the norm is 0/0 and would turn even a zero cotangent into NaN.
    """
    return numerics.l2_normalize(x.astype(jnp.float32), axis=-1, eps=eps)


def token_word_ids(attention_mask: Array) -> Array:
    """``word_ids`` for 'every token is its own slot': [CLS] 0, tokens 1.., last real token ([SEP]) n+1, pad -1.

    Args:
      attention_mask: [b, l] with contiguous ones from position 0.

    Returns:
      [b, l] int32.
    """
    mask = attention_mask > 0
    return jnp.where(mask, jnp.arange(mask.shape[1], dtype=jnp.int32), -1)


def merge_slots(values: Array, word_ids: Array, num_slots: int) -> Array:
    """Sums token values into their slots: out[b, s] = sum_{t: word_ids[b, t] == s} values[b, t].

    A one-hot matmul instead of a scatter: [b, l, l] is small (l <= 112) and shards over the batch.

    Args:
      values: [b, l] or [b, l, w].
      word_ids: [b, l] int, -1 (or any id outside [0, num_slots)) drops the token.
      num_slots: number of output slots.

    Returns:
      [b, num_slots] or [b, num_slots, w] float32; slots without tokens are 0.
    """
    onehot = (word_ids[:, :, None] == jnp.arange(num_slots)[None, None, :]).astype(jnp.float32)
    v = values.astype(jnp.float32)
    if v.ndim == 2:
        return jnp.einsum("bts,bt->bs", onehot, v, precision="highest")
    return jnp.einsum("bts,btw->bsw", onehot, v, precision="highest")


def slot_masks(word_ids: Array, num_slots: int) -> tuple[Array, Array]:
    """(slot_mask, word_mask) [b, num_slots] bool from slot ids; the last occupied slot is [SEP]."""
    slots = jnp.arange(num_slots)[None, :]
    last = word_ids.max(axis=1, keepdims=True)                         # [SEP]'s slot (-1: empty row)
    slot_mask = (word_ids[:, :, None] == slots[:, None, :]).any(axis=1)
    word_mask = slot_mask & (slots >= 1) & (slots < last)
    return slot_mask, word_mask


def full_length_tail(word_ids: Array) -> Array:
    """[b, l] bool: the tokens that MGCA's aggregation loop never flushes (``text.full_length_tail="drop"``).

    For a row whose last position is occupied ([SEP] at l-1), the tokens of its last word slot and of
    [SEP]; nothing for shorter rows. (A row with no word keeps [CLS]: the authors' loop fails on it.)

    Args:
      word_ids: [b, l] int slots (-1 padding).
    """
    full = word_ids[:, -1:] >= 0
    last = word_ids.max(axis=1, keepdims=True)                         # [SEP]'s slot
    return full & (word_ids >= jnp.maximum(last - 1, 1))


def token_masks(word_ids: Array) -> tuple[Array, Array]:
    """(slot_mask, word_mask) [b, l] bool when every token is a slot: real tokens / word pieces only."""
    last = word_ids.max(axis=1, keepdims=True)
    return word_ids >= 0, (word_ids >= 1) & (word_ids < last)


class DualEncoder(nn.Module):
    """Image and text towers with global and local projection heads.

    Attributes:
      config: the ``config.model`` ConfigDict (or dict); see the module docstring.
    """
    config: Any

    def setup(self):
        self.settings = model_config.read(self.config)
        self.image = build_image_tower(self.config)
        self.text = build_text_tower(self.config)
        self.img_head = build_head(self.config, "image")
        self.txt_head = build_head(self.config, "text")
        self.patch_head = build_head(self.config, "patch")
        self.word_head = build_head(self.config, "word")

    def _emb(self, x: Array) -> Array:
        return l2_normalize(x) if self.settings.proj.normalize else x.astype(jnp.float32)

    def encode_image(self, batch: dict, train: bool = False) -> ImageOutputs:
        """Image side only.

        Args:
          batch: needs ``image`` [b, h, w, c] float32.
          train: training mode (BatchNorm statistics, dropout).

        Returns:
          ImageOutputs (float32 arrays).
        """
        out = self.image(batch["image"], train)
        # Global feature: the [CLS] token (papers) or the mean of the patch tokens ("gap"), which gives distinct
        # embeddings per image from step 0 and makes small models learn much faster.
        pooled = out["cls"] if self.settings.image.pool == "cls" else \
            jnp.mean(out["patches"], axis=1)
        img_feat = pooled.astype(jnp.float32)
        patch_feat = out["patches"].astype(jnp.float32)
        attn = out["attn"]
        return ImageOutputs(
            img_emb=self._emb(self.img_head(pooled, train=train)),
            patch_emb=self._emb(self.patch_head(out["patches"], train=train)),
            patch_attn=None if attn is None else attn.astype(jnp.float32),
            img_feat=img_feat, patch_feat=patch_feat, grid=tuple(out["grid"]), grid_centres=out.get("centres"))

    def encode_text(self, batch: dict, train: bool = False) -> TextOutputs:
        """Text side only.

        Args:
          batch: needs ``input_ids`` [b, l] int32, ``attention_mask`` [b, l]; ``word_ids`` [b, l] when
            ``text.merge_word_pieces`` (optional otherwise); optional ``position_ids``.
          train: training mode (dropout, BatchNorm statistics).

        Returns:
          TextOutputs with t == l slots (float32 arrays, bool masks).
        """
        tcfg = self.settings.text
        merge = bool(tcfg.merge_word_pieces)
        ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        l = ids.shape[1]
        word_ids = batch.get("word_ids")
        if word_ids is None:
            if merge:
                raise KeyError("config.model.text.merge_word_pieces needs batch['word_ids'] (slot of each token)")
            word_ids = token_word_ids(attention_mask)
        out = self.text(ids, attention_mask, train, position_ids=batch.get("position_ids"))

        token_attn = out["attn"].astype(jnp.float32)
        shift = int(tcfg.word_attn_shift)
        if shift:
            # MGCA zips the attention on keys 1..l-1 with tokens 0..l-1: token i gets the attention on i+shift.
            token_attn = jnp.pad(token_attn[:, shift:], ((0, 0), (0, shift)))
        if merge:
            slot_mask, word_mask = slot_masks(word_ids, l)
            if tcfg.full_length_tail == "drop":       # TextConfig checked the value
                dropped = full_length_tail(word_ids)
                # The dropped slots are exactly the ones their tokens would have filled.
                gone = (jnp.where(dropped, word_ids, -1)[:, :, None] == jnp.arange(l)[None, None, :]).any(axis=1)
                word_ids = jnp.where(dropped, -1, word_ids)
                slot_mask, word_mask = slot_mask & ~gone, word_mask & ~gone
            word_feat = merge_slots(out["tokens"], word_ids, l)
            word_attn = merge_slots(token_attn, word_ids, l)
        else:
            slot_mask, word_mask = token_masks(word_ids)
            # Tokens are slots; padded ones are zeroed so both modes hand the word head the same padding.
            word_feat = jnp.where(slot_mask[:, :, None], out["tokens"].astype(jnp.float32), 0.0)
            word_attn = jnp.where(slot_mask, token_attn, 0.0)
        # Global feature: [CLS] (papers), the mean over the occupied token positions ("mean"), or GLoRIA's
        # sentence vector ("mean_all_slots": the merged slot features summed over all l slots, padding included,
        # divided by l).
        pool = tcfg.pool
        if pool == "cls":
            pooled = out["cls"]
        elif pool == "mean_all_slots":
            pooled = jnp.mean(word_feat, axis=1).astype(out["tokens"].dtype)
        else:
            m = attention_mask.astype(out["tokens"].dtype)[:, :, None]
            pooled = jnp.sum(out["tokens"] * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        txt_feat = pooled.astype(jnp.float32)
        return TextOutputs(
            txt_emb=self._emb(self.txt_head(pooled, train=train)),
            word_emb=self._emb(self.word_head(word_feat.astype(out["tokens"].dtype), train=train)),
            word_mask=word_mask, slot_mask=slot_mask, word_attn=word_attn,
            txt_feat=txt_feat, word_feat=word_feat)

    def __call__(self, batch: dict, *, train: bool) -> EncoderOutputs:
        """Both towers and all heads.

        Args:
          batch: ``image`` [b, h, w, c] float32, ``input_ids`` / ``attention_mask`` / ``word_ids`` [b, l] int32.
          train: training mode.

        Returns:
          EncoderOutputs (float32 embeddings/features, bool masks, static grid).
        """
        img = self.encode_image(batch, train=train)
        txt = self.encode_text(batch, train=train)
        return EncoderOutputs(
            img_emb=img.img_emb, txt_emb=txt.txt_emb, patch_emb=img.patch_emb, word_emb=txt.word_emb,
            word_mask=txt.word_mask, slot_mask=txt.slot_mask, word_attn=txt.word_attn,
            patch_attn=img.patch_attn, img_feat=img.img_feat, txt_feat=txt.txt_feat,
            patch_feat=img.patch_feat, word_feat=txt.word_feat, grid=img.grid, grid_centres=img.grid_centres)


def build_model(model_cfg: Any) -> DualEncoder:
    """The DualEncoder for ``config.model``; every field is checked eagerly (``model_config.read``)."""
    model_config.read(model_cfg)
    return DualEncoder(config=model_cfg)


def example_batch(model_cfg: Any, batch_size: int = 2, text_len: int = 8) -> dict[str, np.ndarray]:
    """A zero batch with the shapes ``init`` needs (``data.example_batch``: every report fills ``text_len``;
    parameter shapes do not depend on text_len). The image side and channels come from ``config.model.image``
    (ViT presets: their image_size; otherwise 224)."""
    icfg = model_config.read(model_cfg).image
    size = icfg.image_size or (VIT_PRESETS[icfg.name]["image_size"] if icfg.name in VIT_PRESETS else 224)
    return data_example_batch(batch_size, image_size=size, channels=icfg.channels, text_len=text_len)
