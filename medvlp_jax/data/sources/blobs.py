"""A synthetic world where localization is unambiguous: bright blobs at random places, reports that name them.

Each image shows one or two findings of different kinds ("nodule": a small bright disc, "opacity": a soft
hazy patch, "mass": a larger lobulated disc) in different zones of a 3 x 2 layout (upper / middle / lower
x the patient's right / left; the film is PA, so the patient's right is the image's left), over a smoothly
varying, noisy background. The report names every finding and its zone, one phrase each ("nodule in the
left lower zone"), plus an optional filler sentence, and each finding carries its box and mask, so the
grounding evaluator scores word-to-region maps against where the blob really is. Positions are uniform
within their zone, so the same kind appears anywhere: a map can only point into the blob by reading the
image, and with two kinds per image it has to read the phrase too.

    python launch/prepare_data.py blobs --out=data/blobs
    python launch/pretrain.py --config=configs/gloria.py:test --workdir=runs/gloria_blobs \\
        --config.data.root=data/blobs --config.data.tokenizer_dir=data/blobs/tokenizer ...

(tests/test_localization.py trains every local method here and checks that its own maps point into the blobs.)
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from medvlp_jax.data import tokenizer as tokenizer_lib
from medvlp_jax.data.writer import ShardedWriter

KINDS = ("nodule", "opacity", "mass")
CLASS_NAMES = ["normal", *KINDS]
ROWS = ("upper", "middle", "lower")
SIDES = ("right", "left")        # patient's side; column 0 (image left) is the patient's right on a PA film
FILLERS = ("heart size is normal", "no pneumothorax", "the mediastinum is unremarkable",
           "bony structures are intact", "")


def _draw(kind: str, cy: float, cx: float, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator):
    """(intensity to add [h, w], mask [h, w] bool) of one finding centred at (cy, cx) (fractions)."""
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    if kind == "nodule":
        mask = d2 <= 0.05 ** 2
        return 0.6 * mask, mask
    if kind == "opacity":
        sigma = 0.07
        value = 0.45 * np.exp(-d2 / (2 * sigma ** 2))
        mask = d2 <= (2 * sigma) ** 2
        return value * (1 + 0.3 * rng.standard_normal(value.shape)), mask
    radius = 0.09 * (1 + 0.15 * np.sin(5 * np.arctan2(yy - cy, xx - cx)))      # mass: lobulated disc
    mask = d2 <= radius ** 2
    return 0.45 * mask, mask


def make_examples(n: int, image_size: int, seed: int) -> Iterator[dict]:
    """``n`` records in the schema of ``data/schema.py`` (PNG image, report, labels, boxes, masks, phrases)."""
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:image_size, 0:image_size] + 0.5) / image_size
    png = lambda a: tf.io.encode_png(a[..., None]).numpy()
    for i in range(n):
        kinds = list(rng.choice(KINDS, size=1 + int(rng.random() < 0.5), replace=False))
        image = (0.25 + 0.1 * np.sin(2 * np.pi * (yy * rng.uniform(0.5, 1.5) + rng.uniform()))
                 + 0.04 * rng.standard_normal((image_size, image_size)))
        zones = rng.permutation(len(ROWS) * len(SIDES))[:len(kinds)]         # distinct zones
        names, phrases, boxes, masks = [], [], [], []
        for kind, zone in zip(kinds, zones):
            row, col = divmod(int(zone), len(SIDES))
            cy = (row + rng.uniform(0.25, 0.75)) / len(ROWS)
            cx = (col + rng.uniform(0.2, 0.8)) / len(SIDES)
            value, mask = _draw(kind, cy, cx, yy, xx, rng)
            image = image + value
            ys, xs = np.nonzero(mask)
            boxes.append((ys.min() / image_size, xs.min() / image_size,
                          (ys.max() + 1) / image_size, (xs.max() + 1) / image_size))
            masks.append(png((mask * 255).astype(np.uint8)))
            names.append(str(kind))
            phrases.append(f"{kind} in the {SIDES[col]} {ROWS[row]} zone")
        filler = FILLERS[int(rng.integers(len(FILLERS)))]
        yield {
            "id": f"blobs-{seed}-{i:05d}", "patient_id": f"p{seed}-{i:05d}", "study_id": f"s{seed}-{i:05d}",
            "image": png((np.clip(image, 0, 1) * 255).astype(np.uint8)),
            "report": ". ".join(phrases + ([filler] if filler else [])) + ".",
            "labels": np.array([0.0] + [float(k in kinds) for k in KINDS], np.float32),
            "finding_names": names, "finding_phrases": phrases,
            "finding_boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "finding_masks": masks,
        }


def prepare_blobs(out_dir: str, *, num_train: int = 2048, num_test: int = 256, image_size: int = 64,
                  num_shards: int = 4, seed: int = 0, vocab_size: int = 100) -> dict[str, int]:
    """Writes train / validation / test splits and a WordPiece tokenizer under ``out_dir``; returns the sizes."""
    sizes = {"train": num_train, "validation": max(16, num_test // 4), "test": num_test}
    texts = []
    for s, (split, n) in enumerate(sizes.items()):
        with ShardedWriter(out_dir, split, num_shards=num_shards, class_names=CLASS_NAMES, name="blobs") as w:
            for ex in make_examples(n, image_size, seed * 10 + s):
                if split == "train":
                    texts.append(ex["report"])
                w.write(ex)
    tokenizer_lib.train_wordpiece(texts, os.path.join(out_dir, "tokenizer"), vocab_size=vocab_size)
    return sizes
