"""Shared data types: what the encoders hand to the objectives.

Shapes: b = batch, p = image patches/regions, t = text slots (tokens, or words after word-piece
merging), d = joint embedding width, w = encoder width.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax

Array = jax.Array
Batch = dict[str, Any]   # see medvlp_jax/data/pipeline.py for the keys
# ((scale_y, offset_y), (scale_x, offset_x)): cell (i, j) of a local feature grid is centred at the fraction
# (scale_y * i + offset_y, scale_x * j + offset_x) of the input image (see EncoderOutputs.grid_centres).
GridCentres = tuple[tuple[float, float], tuple[float, float]]


@flax.struct.dataclass
class EncoderOutputs:
    """Everything an objective may read. Embeddings named *_emb are projected and L2-normalised.

    Attributes:
      img_emb: [b, d] global image embedding.
      txt_emb: [b, d] global report embedding.
      patch_emb: [b, p, d] local image embeddings (ViT patch tokens or CNN grid cells, row-major).
      word_emb: [b, t, d] local text embeddings, one per text slot (word after merging pieces, or token).
      word_mask: [b, t] bool, True for real words (not [CLS], [SEP] or padding).
      slot_mask: [b, t] bool, True for every occupied slot ([CLS]/[SEP] included, padding excluded).
      word_attn: [b, t] last text layer's [CLS]-row attention on each slot, head-averaged (0 on padding).
      patch_attn: [b, p] last ViT block's [CLS]->patch attention, head-averaged; None for CNNs.
      img_feat: [b, w_img] pre-projection global image feature (what linear probes read).
      txt_feat: [b, w_txt] pre-projection global text feature.
      patch_feat: [b, p, w_img] pre-projection local image features (segmentation/detection heads).
      word_feat: [b, t, w_txt] pre-projection local text features.
      grid: (gh, gw) static patch grid, gh * gw == p.
      grid_centres: static ((scale_y, offset_y), (scale_x, offset_x)): the centre of grid cell (i, j) lies at
        the fraction (scale_y * i + offset_y, scale_x * j + offset_x) of the input image's height and width
        (``GridCentres``); None for the half-pixel convention ((i + 0.5) / gh, (j + 0.5) / gw), exact for ViT
        patches. CNN grids are offset from it (torchvision ResNets: cell i of a stride-s stage is centred on
        input pixel s * i, not s * (i + 0.5)).
    """
    img_emb: Array
    txt_emb: Array
    patch_emb: Array
    word_emb: Array
    word_mask: Array
    slot_mask: Array
    word_attn: Array
    patch_attn: Optional[Array]
    img_feat: Array
    txt_feat: Array
    patch_feat: Array
    word_feat: Array
    grid: tuple[int, int] = flax.struct.field(pytree_node=False, default=(1, 1))
    grid_centres: Optional[tuple] = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class LossContext:
    """What an objective may know about the step besides the parameters, the encoder outputs and the batch.

    Attributes:
      step: [] int32 optimizer step (schedules are functions of it; a Python int outside jit).
      rng: the step's PRNG key (threefry uint32[2]), or None where nothing random is drawn.
      teacher_out: the EMA encoders' stop-gradient outputs on the same batch when ``Objective.ema_decay`` is
        set, else None.
    """
    step: Any
    rng: Optional[Array] = None
    teacher_out: Optional[EncoderOutputs] = None
