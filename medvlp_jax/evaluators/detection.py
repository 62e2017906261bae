"""Object detection on the pretrained image encoder (methods.md 10.3) with a CenterNet head.

Head: **CenterNet** ("Objects as Points", Zhou et al. 2019) at a single scale on the encoder's patch grid.
MGCA's YOLOv3 head needs three scales of CNN features (ResNet layer2/3/4); a ViT (or our ResNet's
``patch_feat``) gives one grid, and a centre-heatmap detector is the standard single-scale design.

* Trunk: ``cfg.trunk_widths`` stages of ``[conv3x3 -> GroupNorm -> ReLU -> bilinear up x2]`` on the frozen
  ``patch_feat`` grid [b, gh, gw, w] (default two stages: output stride patch/4, e.g. 4 px for ViT-B/16).
* Three branches ``conv3x3(head_width) -> ReLU -> conv1x1``: a class heatmap (sigmoid, bias initialised to
  the 0.1 prior), the box size (h, w) and the sub-cell centre offset, both in output-grid cells.
* Targets: per box an elliptical Gaussian at its centre cell (TTFNet's sigma = 0.54 * side / 6, so the
  peak cell is exactly 1); the size and offset are regressed at the centre cell only.
* Loss: CenterNet's penalty-reduced focal loss (alpha 2, beta 4) normalised by the number of boxes,
  + 0.1 * L1(size) + 1 * L1(offset). AdamW (lr 5e-4, wd 1e-6, MGCA's detector), early stopping on the
  validation loss.
* Inference: 3x3 max-pool peaks of the heatmap, top ``cfg.max_detections``, score >= ``cfg.score_threshold``
  (MGCA's confidence filter 0.5), greedy NMS per class at IoU ``cfg.nms_iou`` (0.5) with ``metrics.nms``.
* Metric: ``metrics.mean_ap`` over IoU 0.40:0.05:0.75 (torchmetrics' COCO-style ``map`` of MGCA) counting
  every test image (``map``), and MGCA's variant that drops images with no detection or no ground truth
  (``map_mgca``); ``ap50`` at IoU 0.5. Several classes: macro mean over the classes with ground truth,
  plus ``map/<class>``.
* Classes (``cfg.classes``): ``"single"`` (every finding is one class, as RSNA / Object-CXR), ``"per_name"``
  (one class per finding name of the training split), or finding names, comma-separated or a list (other
  findings are ignored: neither targets nor ground truth).
* Label fractions 1/10/100% of the training image ids (seeded), as segmentation.

Boxes are (ymin, xmin, ymax, xmax) fractions of the evaluation crop in the data; metrics use (x1, y1, x2, y2)
pixels of the crop.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medvlp_jax import metrics, sharding as sharding_lib
from medvlp_jax.evaluators import EVALUATORS
from medvlp_jax.evaluators.protocol import data_info, eval_config
from medvlp_jax.evaluators.dense import (HeadTrainer, batched_apply, dense_head_inputs, grid_shape, head_inputs_of,
                                         init_head, norm_groups_for, padded_batch_size, read_splits, upsample2x)
from medvlp_jax.evaluators.localized import LocalizedSplit, fraction_key, fraction_subset

Array = jax.Array
HEATMAP_PRIOR = 0.1          # CenterNet initialises the heatmap bias to -log((1 - 0.1) / 0.1)
GAUSSIAN_ALPHA = 0.54        # TTFNet's elliptical Gaussian: sigma = alpha * side / 6


class CenterNetHead(nn.Module):
    """Patch grid [b, gh, gw, w] -> (heat logits [b, H, W, c], size [b, H, W, 2], offset [b, H, W, 2]).

    Attributes:
        num_classes: heatmap channels.
        trunk_widths: one conv3x3 + up x2 stage per width (H = gh * 2**len(trunk_widths)).
        head_width: channels of the branches' hidden conv.
        norm_groups: GroupNorm groups.
    """
    num_classes: int = 1
    trunk_widths: Sequence[int] = (256, 128)
    head_width: int = 64
    norm_groups: int = 8

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array, Array]:
        x = x.astype(jnp.float32)
        for i, c in enumerate(self.trunk_widths):
            x = nn.Conv(int(c), (3, 3), name=f"conv{i}")(x)
            x = nn.relu(nn.GroupNorm(num_groups=norm_groups_for(int(c), self.norm_groups), name=f"norm{i}")(x))
            x = upsample2x(x)

        def branch(name, out, bias_init=nn.initializers.zeros):
            y = nn.relu(nn.Conv(self.head_width, (3, 3), name=f"{name}_hidden")(x))
            return nn.Conv(out, (1, 1), bias_init=bias_init, name=name)(y)

        prior = -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR)
        heat = branch("heat", self.num_classes, nn.initializers.constant(prior))
        return heat, branch("size", 2), branch("offset", 2)


def centernet_targets(boxes: Sequence[np.ndarray], classes: Sequence[np.ndarray], grid: tuple[int, int],
                      num_classes: int, max_objects: int) -> dict[str, np.ndarray]:
    """Training targets of a batch of images.

    Args:
        boxes: per image [k_i, 4] (ymin, xmin, ymax, xmax) fractions of the image.
        classes: per image [k_i] int class ids (boxes with id < 0 are ignored).
        grid: output (H, W).
        num_classes: heatmap channels.
        max_objects: boxes kept per image (the first ones).

    Returns:
        heat [n, H, W, c] float32 (Gaussian peaks, exactly 1 at each centre cell), ind [n, K] int32 (flat
        centre cell), size [n, K, 2] (h, w in cells), offset [n, K, 2] (centre - cell, in [0, 1)),
        obj [n, K] float32 (1 for a real box).
    """
    H, W = grid
    n = len(boxes)
    heat = np.zeros((n, H, W, num_classes), np.float32)
    ind = np.zeros((n, max_objects), np.int32)
    size = np.zeros((n, max_objects, 2), np.float32)
    offset = np.zeros((n, max_objects, 2), np.float32)
    obj = np.zeros((n, max_objects), np.float32)
    yy, xx = np.arange(H)[:, None], np.arange(W)[None, :]
    for i, (bs, cs) in enumerate(zip(boxes, classes)):
        k = 0
        for box, c in zip(np.asarray(bs).reshape(-1, 4), np.asarray(cs).reshape(-1)):
            if c < 0 or k >= max_objects:
                continue
            ymin, xmin, ymax, xmax = (float(v) for v in box)
            cy, cx = (ymin + ymax) / 2 * H, (xmin + xmax) / 2 * W
            h, w = (ymax - ymin) * H, (xmax - xmin) * W
            ci, cj = min(int(cy), H - 1), min(int(cx), W - 1)
            sy, sx = max(GAUSSIAN_ALPHA * h / 6, 0.25), max(GAUSSIAN_ALPHA * w / 6, 0.25)
            g = np.exp(-((yy - ci) ** 2 / (2 * sy ** 2) + (xx - cj) ** 2 / (2 * sx ** 2)))
            heat[i, :, :, c] = np.maximum(heat[i, :, :, c], g)
            ind[i, k] = ci * W + cj
            size[i, k] = (h, w)
            offset[i, k] = (cy - ci, cx - cj)
            obj[i, k] = 1.0
            k += 1
    return {"heat": heat, "ind": ind, "size": size, "offset": offset, "obj": obj}


def centernet_loss(heat_logits: Array, size_pred: Array, offset_pred: Array, targets: dict[str, Array],
                   valid: Array, *, size_weight: float = 0.1, offset_weight: float = 1.0) -> Array:
    """CenterNet loss: penalty-reduced focal loss on the heatmap + L1 on size and offset at the centres.

    Args:
        heat_logits: [b, H, W, c].
        size_pred: [b, H, W, 2].
        offset_pred: [b, H, W, 2].
        targets: ``centernet_targets`` arrays (heat [b, H, W, c], ind [b, K], size/offset [b, K, 2], obj [b, K]).
        valid: [b] bool; padding rows contribute nothing.
        size_weight: weight of the size L1 (CenterNet 0.1).
        offset_weight: weight of the offset L1 (1).

    Returns:
        scalar loss.
    """
    x = heat_logits.astype(jnp.float32)
    gt = targets["heat"].astype(jnp.float32)
    v = valid.astype(jnp.float32)
    pos = (gt >= 1.0 - 1e-6).astype(jnp.float32) * v[:, None, None, None]
    neg = (1.0 - pos) * v[:, None, None, None]
    p = jax.nn.sigmoid(x)
    pos_loss = jax.nn.log_sigmoid(x) * (1 - p) ** 2 * pos
    neg_loss = jax.nn.log_sigmoid(-x) * p ** 2 * (1 - gt) ** 4 * neg
    num_pos = jnp.sum(pos)
    focal = -(jnp.sum(pos_loss) + jnp.sum(neg_loss)) / jnp.maximum(num_pos, 1.0)
    b = x.shape[0]
    obj = targets["obj"].astype(jnp.float32) * v[:, None]

    def at_centres(pred):                            # [b, H, W, 2] -> [b, K, 2]
        flat = pred.reshape(b, -1, pred.shape[-1]).astype(jnp.float32)
        return jnp.take_along_axis(flat, targets["ind"][:, :, None].astype(jnp.int32), axis=1)

    n_obj = jnp.maximum(jnp.sum(obj), 1.0)
    l_size = jnp.sum(jnp.abs(at_centres(size_pred) - targets["size"]) * obj[..., None]) / n_obj
    l_off = jnp.sum(jnp.abs(at_centres(offset_pred) - targets["offset"]) * obj[..., None]) / n_obj
    return focal + size_weight * l_size + offset_weight * l_off


def _peaks(heat: np.ndarray) -> np.ndarray:
    """bool [H, W, c]: cells equal to the max of their 3x3 neighbourhood (CenterNet's max-pool 'NMS')."""
    H, W, _ = heat.shape
    padded = np.pad(heat, ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    neigh = np.max(np.stack([padded[dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)]), axis=0)
    return heat >= neigh


def decode_centernet(heat: np.ndarray, size: np.ndarray, offset: np.ndarray, image_size: tuple[int, int], *,
                     max_detections: int = 100, score_threshold: float = 0.5,
                     nms_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of one image from CenterNet outputs.

    Args:
        heat: [H, W, c] heatmap probabilities.
        size: [H, W, 2] box (h, w) in output cells.
        offset: [H, W, 2] centre offset within the cell (y, x).
        image_size: (height, width) in pixels the boxes are returned in.
        max_detections: peaks kept (top scores over all classes).
        score_threshold: minimum score (``>=``).
        nms_iou: per-class greedy NMS threshold (``metrics.nms``).

    Returns:
        boxes [m, 4] (x1, y1, x2, y2) pixels clipped to the image, scores [m], classes [m] int, by
        decreasing score.
    """
    H, W, _ = heat.shape
    img_h, img_w = image_size
    sy, sx = img_h / H, img_w / W
    scores = np.where(_peaks(heat), heat, -np.inf).reshape(-1)
    order = np.argsort(-scores, kind="mergesort")[:max_detections]
    order = order[scores[order] >= score_threshold]
    i, j, c = np.unravel_index(order, heat.shape)
    cy, cx = i + offset[i, j, 0], j + offset[i, j, 1]
    h, w = np.maximum(size[i, j, 0], 0), np.maximum(size[i, j, 1], 0)
    boxes = np.stack([(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy], axis=1)
    boxes = np.clip(boxes, 0, [img_w, img_h, img_w, img_h]).reshape(-1, 4)
    sc = scores[order]
    keep = [order_idx for k in np.unique(c)
            for order_idx in np.flatnonzero(c == k)[metrics.nms(boxes[c == k], sc[c == k], nms_iou)]]
    keep = np.asarray(sorted(keep, key=lambda t: -sc[t]), np.int64)
    return boxes[keep].reshape(-1, 4), sc[keep], c[keep].astype(np.int64)


def to_xyxy(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(ymin, xmin, ymax, xmax) fractions [k, 4] -> (x1, y1, x2, y2) pixels [k, 4]."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack([b[:, 1] * width, b[:, 0] * height, b[:, 3] * width, b[:, 2] * height], axis=1)


def class_names_of(cfg: ml_collections.ConfigDict, train: LocalizedSplit) -> list[str]:
    """The detection classes selected by ``cfg.classes`` (see module docstring)."""
    classes = cfg.get("classes", "single")
    if classes == "single":
        return ["finding"]
    if classes == "per_name":
        return train.finding_names()
    names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c) for c in classes]
    names = [c for c in names if c]
    if not names:
        raise ValueError(f"detection.classes must be 'single', 'per_name' or finding names, got {classes!r}")
    return names


def class_ids(split: LocalizedSplit, class_names: list[str]) -> list[np.ndarray]:
    """Per example, the class id of each finding (-1: not evaluated)."""
    if class_names == ["finding"]:
        return [np.zeros(len(n), np.int64) for n in split.names]
    lookup = {c: k for k, c in enumerate(class_names)}
    return [np.array([lookup.get(n, -1) for n in names], np.int64) for names in split.names]


def detection_metrics(preds: list[tuple[np.ndarray, np.ndarray, np.ndarray]], gt_boxes: list[np.ndarray],
                      gt_classes: list[np.ndarray], class_names: list[str]) -> dict[str, float]:
    """mAP (MGCA IoU range), MGCA skip-images mAP and AP50, macro over the classes with ground truth.

    Args:
        preds: per image (boxes [m, 4] xyxy, scores [m], classes [m]).
        gt_boxes: per image [k, 4] xyxy.
        gt_classes: per image [k] class ids (-1 ignored).
        class_names: names of the class ids.
    """
    out: dict[str, float] = {}
    per = {"map": [], "map_mgca": [], "ap50": []}
    for k, name in enumerate(class_names):
        pb = [b[c == k] for b, _, c in preds]
        ps = [s[c == k] for _, s, c in preds]
        gb = [g[gc == k] for g, gc in zip(gt_boxes, gt_classes)]
        if sum(len(g) for g in gb) == 0:
            continue
        vals = {"map": metrics.mean_ap(pb, ps, gb),
                "map_mgca": metrics.mean_ap(pb, ps, gb, skip_images_missing_preds_or_gt=True),
                "ap50": metrics.average_precision(pb, ps, gb, 0.5)}
        for key, v in vals.items():
            per[key].append(v)
            if len(class_names) > 1:
                out[f"{key}/{name}"] = v
    for key, vs in per.items():
        out[key] = float(np.nanmean(vs)) if vs and not np.all(np.isnan(vs)) else float("nan")
    return out


@EVALUATORS.register("detection")
def evaluate(run, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Trains a CenterNet head per label fraction and reports test mAP (see module docstring)."""
    config = eval_config(run, cfg)
    info = data_info(config)
    seed = int(cfg.get("seed", 42))
    batch_size = config.train.batch_size                      # feature extraction / inference
    head_batch = int(cfg.get("head_batch_size", 16))
    train, val, test = read_splits(config, cfg)
    class_names = class_names_of(cfg, train)
    head = CenterNetHead(num_classes=len(class_names), trunk_widths=tuple(cfg.get("trunk_widths", (256, 128))),
                         head_width=int(cfg.get("head_width", 64)))
    apply, finetune, enc_params, frozen = dense_head_inputs(run, cfg, head)
    grid = grid_shape(run, test.images[0])
    out_grid = (grid[0] * 2 ** len(head.trunk_widths), grid[1] * 2 ** len(head.trunk_widths))
    max_objects = int(cfg.get("max_objects", 32))
    target_keys = ("heat", "ind", "size", "offset", "obj")

    def loss_fn(params, frozen_, batch):
        heat, size, offset = apply(params, frozen_, batch)
        return centernet_loss(heat, size, offset, {k: batch[k] for k in target_keys}, batch["valid"],
                              size_weight=float(cfg.get("size_weight", 0.1)),
                              offset_weight=float(cfg.get("offset_weight", 1.0)))

    trainer = HeadTrainer(loss_fn, mesh=run.mesh, learning_rate=float(cfg.get("lr", 5e-4)),
                          weight_decay=float(cfg.get("weight_decay", 1e-6)))
    splits = [s for s in (train, val, test) if s is not None]
    inputs = {s.split: head_inputs_of(run, s, finetune, batch_size) for s in splits}
    targets = {s.split: centernet_targets(s.boxes, class_ids(s, class_names), out_grid, len(class_names), max_objects)
               for s in (train, val) if s is not None}
    def predict_fn(params, frozen_, batch):
        heat, size, offset = apply(params, frozen_, batch)
        return jax.nn.sigmoid(heat), size, offset

    predict = jax.jit(predict_fn, out_shardings=sharding_lib.replicated(run.mesh))
    size = test.size
    gt_boxes = [to_xyxy(b, size, size) for b in test.boxes]
    gt_classes = class_ids(test, class_names)
    decode_kw = dict(max_detections=int(cfg.get("max_detections", 100)),
                     score_threshold=float(cfg.get("score_threshold", 0.5)), nms_iou=float(cfg.get("nms_iou", 0.5)))
    res: dict[str, Any] = {
        "protocol/data": info.get("name", ""), "protocol/root": config.data.root,
        "protocol/splits": f"{train.split}/{val.split if val else '-'}/{test.split}",
        "protocol/num_train_images": len(train), "protocol/num_val_images": len(val) if val else 0,
        "protocol/num_test_images": len(test), "protocol/num_test_boxes": int(sum(len(g) for g in gt_boxes)),
        "protocol/classes": ", ".join(class_names), "protocol/seed": seed,
        "protocol/head": f"centernet stride {size // out_grid[0]} trunk {list(head.trunk_widths)}",
        "protocol/iou_thresholds": ", ".join(f"{t:.2f}" for t in metrics.MGCA_IOU_THRESHOLDS),
        "protocol/score_threshold": decode_kw["score_threshold"], "protocol/nms_iou": decode_kw["nms_iou"],
        "protocol/finetune_encoder": finetune, "protocol/head_batch_size": padded_batch_size(head_batch, run.mesh),
    }
    for fraction in cfg.get("fractions", (0.01, 0.1, 1.0)):
        key = fraction_key(float(fraction))
        rows = fraction_subset(train.ids, float(fraction), seed)
        head_params = init_head(head, grid, seed)
        params = {"head": head_params, "encoder": enc_params} if finetune else head_params
        train_arrays = {k: v[rows] for k, v in {**inputs[train.split], **targets[train.split]}.items()}
        val_arrays = {**inputs[val.split], **targets[val.split]} if val is not None else None
        fit = trainer.fit(params, train_arrays, val_arrays, batch_size=head_batch, epochs=int(cfg.get("epochs", 50)),
                          patience=int(cfg.get("patience", 10)), seed=seed, frozen=frozen, desc=f"detection {key}")
        heat, sz, off = batched_apply(lambda b: predict(fit.params, frozen, b), inputs[test.split], mesh=run.mesh,
                                      batch_size=batch_size)
        preds = [decode_centernet(heat[i], sz[i], off[i], (size, size), **decode_kw) for i in range(len(test))]
        for name, v in detection_metrics(preds, gt_boxes, gt_classes, class_names).items():
            res[f"{key}/{name}"] = v
        res[f"{key}/detections_per_image"] = float(np.mean([len(p[1]) for p in preds]))
        res[f"protocol/{key}/num_train_images"] = int(len(rows))
        res[f"protocol/{key}/train_boxes"] = int(targets[train.split]["obj"][rows].sum())
        res[f"protocol/{key}/best_epoch"] = fit.best_epoch
        res[f"protocol/{key}/epochs_run"] = fit.epochs_run
    return res
