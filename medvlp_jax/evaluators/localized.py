"""Localized evaluation data: images with their finding names, phrases, boxes and masks, and label fractions.

:class:`LocalizedSplit` / :func:`read_localized_split` give a prepared split's images and annotations in the
evaluation crop's coordinates (the same resize / zero-pad / centre crop as the images); the segmentation,
detection and grounding evaluators and the heatmap pictures read through them. :func:`fraction_subset`,
:func:`balance_negatives` and :func:`fraction_key` draw the 1/10/100% label fractions.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import ml_collections
import numpy as np

from medvlp_jax import metrics
from medvlp_jax.data import decode, pipeline, schema
from medvlp_jax.evaluators.protocol import data_info


@dataclasses.dataclass
class LocalizedSplit:
    """One split with its findings, geometry matched to the evaluation images.

    Attributes:
        split: split name.
        ids: image id per example [n].
        index: example index within the split [n].
        images: [n, crop, crop, channels] float32 in [-1, 1] (the pipeline's evaluation preprocessing).
        reports: report text per example [n].
        names: per example, the finding names [k_i].
        phrases: per example, the phrase naming each finding [k_i].
        boxes: per example, [k_i, 4] float32 boxes (ymin, xmin, ymax, xmax) normalised to the crop.
        masks: per example, [k_i, crop, crop] bool finding masks in the crop.
        masks_from_boxes: number of examples whose masks were rasterised from their boxes (no PNG masks).
        findings_dropped: findings whose box lies outside the centre crop (removed from the lists).
    """
    split: str
    ids: list[str]
    index: np.ndarray
    images: np.ndarray
    reports: list[str]
    names: list[list[str]]
    phrases: list[list[str]]
    boxes: list[np.ndarray]
    masks: list[np.ndarray]
    masks_from_boxes: int = 0
    findings_dropped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def size(self) -> int:
        """Side of the (square) crop in pixels."""
        return int(self.images.shape[1])

    def target_masks(self, finding: str = "") -> np.ndarray:
        """[n, crop, crop] bool: union of each example's finding masks (only ``finding`` when given)."""
        out = np.zeros((len(self), self.size, self.size), bool)
        for i, (names, masks) in enumerate(zip(self.names, self.masks)):
            keep = [j for j, name in enumerate(names) if not finding or name == finding]
            if keep:
                out[i] = masks[keep].any(axis=0)
        return out

    def finding_names(self) -> list[str]:
        """Sorted distinct finding names of the split."""
        return sorted({n for names in self.names for n in names})


def crop_boxes(boxes: np.ndarray, height: int, width: int, resize: int, crop: int) -> np.ndarray:
    """Maps boxes normalised to the stored image into the evaluation crop (``decode.decode_image``).

    The image's longer side is resized to ``resize`` (aspect kept, sizes rounded as TF does in float32),
    zero-padded to a centred square, and centre-cropped to ``crop``.

    Args:
        boxes: [k, 4] (ymin, xmin, ymax, xmax) as fractions of the stored image's height/width.
        height: stored image height in pixels.
        width: stored image width in pixels.
        resize: side of the padded square.
        crop: side of the centre crop.

    Returns:
        [k, 4] float32 boxes (ymin, xmin, ymax, xmax) as fractions of the crop, clipped to [0, 1].
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    scale = np.float32(resize) / np.float32(max(height, width))
    new_h = int(np.round(np.float32(height) * scale))
    new_w = int(np.round(np.float32(width) * scale))
    off = (resize - crop) // 2
    pad_y, pad_x = (resize - new_h) // 2 - off, (resize - new_w) // 2 - off
    y = (b[:, [0, 2]] * new_h + pad_y) / crop
    x = (b[:, [1, 3]] * new_w + pad_x) / crop
    out = np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], axis=1)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _split_dataset(tf, data_cfg, root: str, split: str, num_classes: int):
    info = schema.read_info(root)
    if split not in info.get("splits", {}):
        raise ValueError(f"data set at {root!r} has no split {split!r}; it has {sorted(info.get('splits', {}))}")
    files = [os.path.join(root, s["file"]) for s in info["splits"][split]["shards"]]
    spec = schema.feature_spec(num_classes)
    resize, crop, channels = int(data_cfg.resize), int(data_cfg.crop), int(data_cfg.channels)
    seed = tf.constant([0, 0], tf.int64)

    def one_mask(png):
        # Masks are "nonzero inside": binarise first so 8- and 16-bit masks of any value resample alike,
        # then reuse the image geometry exactly (a pixel is inside when > half of it was covered).
        raw = tf.io.decode_image(png, channels=1, expand_animations=False)
        binary = tf.io.encode_png(tf.cast(raw > 0, tf.uint8) * 255)
        m = decode.decode_image(tf, binary, resize=resize, crop=crop, channels=1, train=False, seed=seed,
                                  random_flip=False)
        return m > 0.0

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        image = decode.decode_image(tf, ex["image"], resize=resize, crop=crop, channels=channels, train=False,
                                      seed=seed, random_flip=False)
        masks = tf.map_fn(one_mask, tf.sparse.to_dense(ex["finding_masks"], default_value=b""),
                          fn_output_signature=tf.TensorSpec([crop, crop, 1], tf.bool))
        return {"id": ex["id"], "index": ex["index"], "image": image, "report": ex["report"],
                "hw": decode.image_header(tf, ex["image"])[:2],
                "names": tf.sparse.to_dense(ex["finding_names"], default_value=b""),
                "phrases": tf.sparse.to_dense(ex["finding_phrases"], default_value=b""),
                "boxes": tf.reshape(tf.sparse.to_dense(ex["finding_boxes"]), [-1, 4]),
                "masks": masks[..., 0]}

    return tf.data.TFRecordDataset(files).map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def read_localized_split(config: ml_collections.ConfigDict, split: str, *,
                         limit: Optional[int] = None) -> LocalizedSplit:
    """Reads ``split`` of ``config.data.root`` with its findings (every process reads the whole split).

    Args:
        config: a pretraining-style config (``evaluators.eval_config``): ``data.root/resize/crop/channels``.
        split: split name.
        limit: read only the first ``limit`` examples (None or 0: all).

    Returns:
        LocalizedSplit in the split's index order.
    """
    tf = pipeline.import_tf()
    root = config.data.root
    info = schema.read_info(root)
    ds = _split_dataset(tf, config.data, root, split, len(info["class_names"]))
    if limit:
        ds = ds.take(int(limit))
    crop, resize = int(config.data.crop), int(config.data.resize)
    rows = []
    from_boxes = dropped = 0
    for ex in ds.as_numpy_iterator():
        h, w = (int(v) for v in ex["hw"])
        names = [n.decode("utf-8") for n in ex["names"]]
        phrases = [p.decode("utf-8") for p in ex["phrases"]]
        if len(phrases) != len(names):          # records written without phrases: the name is the phrase
            phrases = list(names)
        boxes = crop_boxes(ex["boxes"], h, w, resize, crop) if len(names) else np.zeros((0, 4), np.float32)
        masks = np.asarray(ex["masks"], bool)
        if len(names) and masks.shape[0] != len(names):
            masks = np.stack([metrics.box_to_mask(b, crop, crop) if _area(b) > 0 else np.zeros((crop, crop), bool)
                              for b in boxes])
            from_boxes += 1
        keep = [j for j in range(len(names)) if _area(boxes[j]) > 0]
        dropped += len(names) - len(keep)
        rows.append(dict(id=ex["id"].decode("utf-8"), index=int(ex["index"]), image=ex["image"],
                         report=ex["report"].decode("utf-8", errors="replace"),
                         names=[names[j] for j in keep], phrases=[phrases[j] for j in keep],
                         boxes=boxes[keep].reshape(-1, 4), masks=masks[keep].reshape(-1, crop, crop)))
    rows.sort(key=lambda r: r["index"])
    images = np.stack([r["image"] for r in rows]).astype(np.float32) if rows else \
        np.zeros((0, crop, crop, int(config.data.channels)), np.float32)
    col = lambda key: [r[key] for r in rows]  # noqa: E731
    return LocalizedSplit(split=split, ids=col("id"), index=np.array(col("index"), np.int64), images=images,
                          reports=col("report"), names=col("names"), phrases=col("phrases"), boxes=col("boxes"),
                          masks=col("masks"), masks_from_boxes=from_boxes, findings_dropped=dropped)


def _area(box) -> float:
    return float(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]))


def has_split(config: ml_collections.ConfigDict, split: str) -> bool:
    """True when the evaluation data set has a non-empty ``split``."""
    info = data_info(config)
    return bool(split) and int(info.get("splits", {}).get(split, {}).get("num_examples", 0)) > 0



def fraction_subset(ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Rows whose image id is in a seeded random subset of ``fraction`` of the distinct ids.

    Args:
        ids: image id per row [n] (several rows may share an id).
        fraction: in (0, 1]; at least one id is kept.
        seed: ``np.random.RandomState`` seed (MGCA draws with ``np.random.choice`` seeded 42).

    Returns:
        int64 row indices [m], increasing.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    ids = list(ids)
    if fraction >= 1:
        return np.arange(len(ids), dtype=np.int64)
    distinct = sorted(set(ids))
    k = max(1, int(round(fraction * len(distinct))))
    chosen = {distinct[i] for i in np.random.RandomState(seed).choice(len(distinct), k, replace=False)}
    return np.array([i for i, x in enumerate(ids) if x in chosen], dtype=np.int64)


def balance_negatives(rows: np.ndarray, positive: np.ndarray, seed: int) -> np.ndarray:
    """SIIM's balanced training set: every positive row plus as many random negative rows (or all of them).

    Args:
        rows: candidate row indices [m].
        positive: bool per row of the whole split [n].
        seed: random seed.

    Returns:
        sorted row indices.
    """
    pos = rows[positive[rows]]
    neg = rows[~positive[rows]]
    k = min(len(neg), len(pos))
    neg = np.random.RandomState(seed).choice(neg, k, replace=False) if k < len(neg) else neg
    return np.sort(np.concatenate([pos, neg])).astype(np.int64)


def fraction_key(fraction: float) -> str:
    """0.01 -> '1%', 0.1 -> '10%', 1.0 -> '100%', 0.005 -> '0.5%'."""
    pct = round(fraction * 100, 6)
    return f"{int(pct)}%" if float(pct).is_integer() else f"{pct:g}%"
