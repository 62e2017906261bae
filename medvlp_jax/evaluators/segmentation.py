"""Segmentation on the pretrained image encoder (methods.md 10.2).

Protocol (MGCA's ``mgca_segmenter.py`` / ``ssl_segmenter.py``, adapted to one feature grid):

* Features: the encoder's pre-projection local features ``patch_feat`` [b, p, w] reshaped to the patch
  grid [b, gh, gw, w]. The encoder is frozen (MGCA) and its features are computed once; with
  ``cfg.finetune_encoder`` it is trained with the decoder (GLoRIA's SIIM protocol), BatchNorm statistics
  kept frozen (eval mode).
* Decoder (:class:`ProgressiveDecoder`): MGCA's ViT segmenter, a SETR decoder with progressive upsampling:
  ``[conv3x3 -> GroupNorm -> ReLU -> bilinear up x2]`` per stage (widths 512/256/128/64 for ViT-B/16 at 224:
  14 -> 224), a 1x1 conv to one logit per pixel, and a bilinear resize of the logits when the stages stop
  short of the image size (``cfg.decoder_stages``, or a grid that does not divide the image). GroupNorm
  replaces SETR's BatchNorm so the head has no mutable statistics. A U-Net needs multi-scale CNN features,
  which the single patch grid does not provide.
* Loss: ``10 * focal(gamma=2) - log(soft Dice, smooth 1)`` over the batch (:func:`segmentation_loss`,
  MGCA's ``MixedLoss``). AdamW (lr 5e-4, wd 0.05); at most ``cfg.epochs`` epochs; early stopping on the
  validation loss with ``cfg.patience``; the best-validation parameters are tested.
* Targets: the union of an example's finding masks (``cfg.finding`` = one finding name only), decoded with
  the same resize / zero-pad / centre-crop as the evaluation images (``decode.decode_image`` on the
  binarised mask); records without masks get their boxes rasterised (RSNA: boxes as masks).
* Label fractions (``cfg.fractions``, e.g. 1/10/100%): a subset of the distinct training image ids drawn
  with ``cfg.seed``, one independent draw per fraction (MGCA: ``np.random.choice`` seeded 42).
  ``cfg.balance_negatives`` (SIIM) keeps every positive training image and as many random negatives.
* Metric: MGCA Dice (``metrics.dice_per_image``: sigmoid > 0.5; an empty truth scores 1 only for an empty
  prediction), mean over test images (``dice``) and MGCA's mean of per-batch means (``mgca_dice``).
  No ShiftScaleRotate augmentation: frozen features are computed once (documented deviation).

The data it reads (:class:`LocalizedSplit`, label fractions) is in ``evaluators/localized.py``; the
machinery it shares with detection and grounding (batched inference, the patch grid, :class:`HeadTrainer`)
in ``evaluators/dense.py``.

Results (``"<pct>%/<metric>"``): ``dice``, ``mgca_dice``, ``val_dice``; protocol facts under ``protocol/``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medvlp_jax import metrics, sharding as sharding_lib
from medvlp_jax.evaluators import EVALUATORS
from medvlp_jax.evaluators.protocol import data_info, eval_config
from medvlp_jax.evaluators.dense import (HeadTrainer, batched_apply, dense_head_inputs, grid_shape, head_inputs_of,
                                         init_head, norm_groups_for, padded_batch_size, read_splits, upsample2x)
from medvlp_jax.evaluators.localized import balance_negatives, fraction_key, fraction_subset

Array = jax.Array



def num_upsamplings(grid: int, size: int) -> int:
    """Number of x2 stages that bring a ``grid`` side closest to ``size`` without overshooting twice."""
    return max(0, int(round(math.log2(size / grid)))) if grid < size else 0


class ProgressiveDecoder(nn.Module):
    """SETR progressive-upsampling decoder: patch grid [b, gh, gw, w] -> logits [b, H, W, out_channels].

    Attributes:
        out_size: (H, W) of the output (the input image size).
        widths: channels of the successive conv3x3 + up x2 stages (the last one repeats if more are needed).
        out_channels: logits per pixel.
        norm_groups: GroupNorm groups (gcd with the stage width).
        upsample_stages: number of x2 stages; -1 = as many as bring the grid to ``out_size``. Fewer stages
            predict at a lower resolution and resize the logits bilinearly (much cheaper on a CPU).
    """
    out_size: tuple[int, int]
    widths: Sequence[int] = (512, 256, 128, 64)
    out_channels: int = 1
    norm_groups: int = 8
    upsample_stages: int = -1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_up = num_upsamplings(x.shape[1], self.out_size[0]) if self.upsample_stages < 0 else self.upsample_stages
        x = x.astype(jnp.float32)
        for i in range(n_up):
            c = int(self.widths[min(i, len(self.widths) - 1)])
            x = nn.Conv(c, (3, 3), name=f"conv{i}")(x)
            x = nn.GroupNorm(num_groups=norm_groups_for(c, self.norm_groups), name=f"norm{i}")(x)
            x = upsample2x(nn.relu(x))
        x = nn.Conv(self.out_channels, (1, 1), name="logits")(x)
        if tuple(x.shape[1:3]) != tuple(self.out_size):
            # After the 1x1 conv: both are linear (bilinear weights sum to 1), so this equals resizing the
            # features first, on out_channels instead of the stage width.
            x = jax.image.resize(x, (x.shape[0], *self.out_size, x.shape[-1]), "bilinear")
        return x


def segmentation_loss(logits: Array, target: Array, valid: Array, *, focal_weight: float = 10.0,
                      gamma: float = 2.0, smooth: float = 1.0) -> Array:
    """MGCA's ``MixedLoss``: ``focal_weight * focal(gamma) - log(soft Dice)`` over the whole batch.

    Focal term per pixel: ``exp(gamma * log_sigmoid(-x * (2t - 1))) * BCE(x, t)`` averaged over the real
    pixels; soft Dice ``(2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth)`` over all real pixels of the batch.

    Args:
        logits: [b, h, w].
        target: [b, h, w] in {0, 1}.
        valid: [b] bool; padding rows contribute nothing.
        focal_weight: weight of the focal term (10).
        gamma: focal exponent (2).
        smooth: Dice smoothing (1).

    Returns:
        scalar loss.
    """
    x = logits.astype(jnp.float32)
    t = target.astype(jnp.float32)
    w = jnp.broadcast_to(valid.astype(jnp.float32)[:, None, None], x.shape)
    bce = optax.sigmoid_binary_cross_entropy(x, t)
    focal = jnp.exp(gamma * jax.nn.log_sigmoid(-x * (2.0 * t - 1.0))) * bce
    focal = jnp.sum(focal * w) / jnp.maximum(jnp.sum(w), 1.0)
    p = jax.nn.sigmoid(x) * w
    t = t * w
    dice = (2.0 * jnp.sum(p * t) + smooth) / (jnp.sum(p) + jnp.sum(t) + smooth)
    return focal_weight * focal - jnp.log(dice)



@EVALUATORS.register("segmentation")
def evaluate(run, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains a segmentation decoder per label fraction and reports test Dice (see module docstring)."""
    config = eval_config(run, cfg)
    info = data_info(config)
    seed = int(cfg.get("seed", 42))
    batch_size = config.train.batch_size                      # feature extraction / inference
    head_batch = int(cfg.get("head_batch_size", 16))
    finding = str(cfg.get("finding", "") or "")
    train, val, test = read_splits(config, cfg)
    size = test.size
    head = ProgressiveDecoder(out_size=(size, size), widths=tuple(cfg.get("decoder_widths", (512, 256, 128, 64))),
                              upsample_stages=int(cfg.get("decoder_stages", -1)))
    apply, finetune, enc_params, frozen = dense_head_inputs(run, cfg, head)

    def loss_fn(params, frozen_, batch):
        logits = apply(params, frozen_, batch)[..., 0]
        return segmentation_loss(logits, batch["mask"], batch["valid"],
                                 focal_weight=float(cfg.get("focal_weight", 10.0)),
                                 gamma=float(cfg.get("focal_gamma", 2.0)))

    trainer = HeadTrainer(loss_fn, mesh=run.mesh, learning_rate=float(cfg.get("lr", 5e-4)),
                          weight_decay=float(cfg.get("weight_decay", 0.05)))
    masks = {s.split: s.target_masks(finding).astype(np.float32) for s in (train, val, test) if s is not None}
    inputs = {s.split: head_inputs_of(run, s, finetune, batch_size) for s in (train, val, test) if s is not None}
    grid = grid_shape(run, test.images[0])
    rep = sharding_lib.replicated(run.mesh)
    predict = jax.jit(lambda p, fr, b: jax.nn.sigmoid(apply(p, fr, b)[..., 0]), out_shardings=rep)

    def probs(params, split):
        return batched_apply(lambda b: predict(params, frozen, b), inputs[split.split], mesh=run.mesh,
                             batch_size=batch_size)

    n_up = num_upsamplings(grid[0], size) if head.upsample_stages < 0 else head.upsample_stages
    decoder = f"progressive, {n_up} x2 stages {list(head.widths)[:n_up]}"
    if grid[0] * 2 ** n_up != size:
        decoder += f", logits resized x{size / (grid[0] * 2 ** n_up):g}"
    positive_train = masks[train.split].reshape(len(train), -1).any(axis=1)
    res: dict[str, Any] = {
        "protocol/data": info.get("name", ""), "protocol/root": config.data.root,
        "protocol/splits": f"{train.split}/{val.split if val else '-'}/{test.split}",
        "protocol/num_train_images": len(train), "protocol/num_val_images": len(val) if val else 0,
        "protocol/num_test_images": len(test),
        "protocol/test_positive_images": int(masks[test.split].reshape(len(test), -1).any(axis=1).sum()),
        "protocol/finding": finding or "any", "protocol/seed": seed, "protocol/grid": "x".join(map(str, grid[:2])),
        "protocol/decoder": decoder, "protocol/finetune_encoder": finetune, "protocol/image_size": size,
        "protocol/masks_from_boxes": sum(s.masks_from_boxes for s in (train, val, test) if s is not None),
        "protocol/head_batch_size": padded_batch_size(head_batch, run.mesh),
    }
    for fraction in cfg.get("fractions", (0.01, 0.1, 1.0)):
        key = fraction_key(float(fraction))
        rows = fraction_subset(train.ids, float(fraction), seed)
        if cfg.get("balance_negatives", False):
            rows = balance_negatives(rows, positive_train, seed)
        head_params = init_head(head, grid, seed)
        params = {"head": head_params, "encoder": enc_params} if finetune else head_params
        train_arrays = {k: v[rows] for k, v in inputs[train.split].items()} | {"mask": masks[train.split][rows]}
        val_arrays = (inputs[val.split] | {"mask": masks[val.split]}) if val is not None else None
        fit = trainer.fit(params, train_arrays, val_arrays, batch_size=head_batch, epochs=int(cfg.get("epochs", 50)),
                          patience=int(cfg.get("patience", 10)), seed=seed, frozen=frozen, desc=f"segmentation {key}")
        p_test = probs(fit.params, test)
        res[f"{key}/dice"] = metrics.mean_dice(p_test, masks[test.split])
        res[f"{key}/mgca_dice"] = metrics.mean_dice(p_test, masks[test.split], batch_size=head_batch)
        if val is not None:
            res[f"{key}/val_dice"] = metrics.mean_dice(probs(fit.params, val), masks[val.split])
        res[f"protocol/{key}/num_train_images"] = int(len(rows))
        res[f"protocol/{key}/positive_train_images"] = int(positive_train[rows].sum())
        res[f"protocol/{key}/best_epoch"] = fit.best_epoch
        res[f"protocol/{key}/epochs_run"] = fit.epochs_run
    return res
