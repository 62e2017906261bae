"""A tiny synthetic image-report data set for tests and smoke runs (seconds to make, no assets needed).

Each example has 0-2 "findings" from ``CLASS_NAMES``; the image shows a bright blob where each finding
lives and the report names the findings, so the pairs carry a learnable signal.
"""
from __future__ import annotations

import os

import numpy as np

from medvlp_jax.data import tokenizer as tokenizer_lib
from medvlp_jax.data.writer import ShardedWriter

CLASS_NAMES = ["normal", "opacity", "effusion", "cardiomegaly"]
_PHRASES = {
    "opacity": ("patchy opacity in the right upper lobe", (0.15, 0.15, 0.45, 0.45)),
    "effusion": ("small left pleural effusion", (0.6, 0.6, 0.9, 0.9)),
    "cardiomegaly": ("the heart is enlarged", (0.45, 0.3, 0.8, 0.7)),
}


def _png(tf, arr: np.ndarray) -> bytes:
    return tf.io.encode_png(arr[..., None]).numpy()


def make_examples(n: int, image_size: int, seed: int):
    import tensorflow as tf
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:image_size, 0:image_size] / image_size
    for i in range(n):
        k = rng.integers(0, 3)
        found = list(rng.choice(list(_PHRASES), size=k, replace=False))
        img = 0.3 + 0.05 * rng.standard_normal((image_size, image_size))
        names, boxes, masks, phrases = [], [], [], []
        for f in found:
            phrase, (y0, x0, y1, x1) = _PHRASES[f]
            inside = (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)
            img = img + 0.5 * inside
            names.append(f)
            phrases.append(phrase)
            boxes.append((y0, x0, y1, x1))
            masks.append(_png(tf, (inside * 255).astype(np.uint8)))
        labels = np.array([float(not found)] + [float(c in found) for c in CLASS_NAMES[1:]], np.float32)
        report = ". ".join(phrases) if found else "no acute cardiopulmonary abnormality. lungs are clear"
        yield {
            "id": f"syn-{seed}-{i:05d}", "patient_id": f"p{seed}-{i:05d}", "study_id": f"s{i:05d}",
            "image": _png(tf, (np.clip(img, 0, 1) * 255).astype(np.uint8)), "report": report + ".",
            "labels": labels, "finding_names": names, "finding_phrases": phrases,
            "finding_boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "finding_masks": masks,
        }


def prepare_synthetic(out_dir: str, *, num_train: int = 64, num_test: int = 32, image_size: int = 40,
                      num_shards: int = 4, seed: int = 0, vocab_size: int = 200) -> dict:
    """Writes train/validation/test splits and a WordPiece tokenizer under ``out_dir``."""
    sizes = {"train": num_train, "validation": max(8, num_test // 2), "test": num_test}
    texts = []
    for s, (split, n) in enumerate(sizes.items()):
        with ShardedWriter(out_dir, split, num_shards=num_shards, class_names=CLASS_NAMES, name="synthetic") as w:
            for ex in make_examples(n, image_size, seed * 10 + s):
                if split == "train":
                    texts.append(ex["report"])
                w.write(ex)
    tokenizer_lib.train_wordpiece(texts, os.path.join(out_dir, "tokenizer"), vocab_size=vocab_size)
    return sizes
