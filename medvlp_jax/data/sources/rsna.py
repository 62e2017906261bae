"""RSNA Pneumonia Detection (stage 2) → TFRecord shards for classification, detection and segmentation.

Layout read (``source_dir`` = the unpacked Kaggle download)::

    <source_dir>/stage_2_train_labels.csv          patientId,x,y,width,height,Target
    <source_dir>/stage_2_train_images/<patientId>.dcm

One row per box (x, y = top-left corner, in pixels of the 1024x1024 image), or one row with empty box
and Target 0 for a negative patient. Here (methods.md 10.1-10.3):

* one example per patient (id = patient_id = patientId); label "Pneumonia" = 1 if any row has Target 1;
* every box is a finding "pneumonia" with its box normalised (ymin, xmin, ymax, xmax) in the padded
  output image and a box mask (the box rasterised at the output size) for segmentation; negatives have
  no findings;
* split over patients 70/15/15 (train/validation/test) with ``seed`` (MGCA: seed 0) — one image per
  patient, so this is the image split as well;
* DICOM: rescale/window if present (these files have none: then min-max to 0..255, as MGCA scales to
  0-255), MONOCHROME1 inverted, longer side → ``image_size``, zero-pad.

(MGCA's detection protocol uses another split, 5,337 validation + 5,337 test images; pass
``split_fractions`` to approximate it.)
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional

import numpy as np

from medvlp_jax.data import images
from medvlp_jax.data.sources import common

NAME = "rsna_pneumonia"
LABELS_FILE = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"
CLASS_NAMES = ("Pneumonia",)
FINDING = "pneumonia"
SPLITS = ("train", "validation", "test")


def read_labels(path: str) -> dict[str, np.ndarray]:
    """stage_2_train_labels.csv → patientId -> [n, 4] boxes (x, y, width, height) in pixels (n may be 0)."""
    import pandas as pd
    df = pd.read_csv(path, dtype={"patientId": str})
    missing = [c for c in ("patientId", "x", "y", "width", "height", "Target") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    out: dict[str, list] = {}
    for r in df.itertuples(index=False):
        boxes = out.setdefault(r.patientId, [])
        if int(r.Target) == 1:
            if any(v != v for v in (r.x, r.y, r.width, r.height)):
                raise ValueError(f"{path}: patient {r.patientId} has Target 1 but no box")
            boxes.append((r.x, r.y, r.width, r.height))
    return {k: np.asarray(v, np.float64).reshape(-1, 4) for k, v in out.items()}


def _load(payload: dict[str, Any], *, image_size: int, bit_depth: int) -> dict[str, Any]:
    pixels, placement = images.load_for_dataset(payload["path"], image_size, bit_depth=bit_depth)
    xywh = payload["boxes"]
    yxyx = np.stack([xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3], xywh[:, 0] + xywh[:, 2]], axis=1)
    boxes = placement.normalise_boxes(yxyx)
    n = len(boxes)
    return dict(payload["fields"], image=images.encode_png(pixels),
                **common.finding_arrays([FINDING] * n, [FINDING] * n, boxes,
                                        [images.box_mask(b, image_size) for b in boxes]))


def prepare_rsna(source_dir: str, out_dir: str, *, image_size: int = 256, num_shards: int = 8,
                 seed: int = 0, skip_bad: bool = False, limit: Optional[int] = None,
                 split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), bit_depth: int = 8,
                 num_workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Converts RSNA Pneumonia to train/validation/test shards (see the module docstring).

    Args:
      source_dir: directory holding stage_2_train_labels.csv and stage_2_train_images/.
      out_dir: output directory.
      image_size: output side.
      num_shards: shards per split.
      seed: split seed (patients).
      skip_bad: count unreadable/missing DICOMs as skips instead of raising.
      limit: at most this many examples per split.
      split_fractions: train/validation/test fractions of patients.
      bit_depth: 8 or 16-bit PNGs.
      num_workers: image-loading processes.
      progress: tqdm bar.
    """
    path = os.path.join(source_dir, LABELS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"RSNA labels {path!r} are missing; source_dir must hold {LABELS_FILE} "
                                f"and {IMAGES_DIR}/")
    boxes = read_labels(path)
    assign = common.split_groups(boxes, dict(zip(SPLITS, split_fractions)), seed)
    tasks = []
    for split in SPLITS:
        for pid in sorted(p for p in boxes if assign[p] == split):
            img = os.path.join(source_dir, IMAGES_DIR, pid + ".dcm")
            fields = {"id": pid, "patient_id": pid, "study_id": pid, "report": "",
                      "labels": np.array([float(len(boxes[pid]) > 0)], np.float32)}
            tasks.append(common.Task(split, img, {"path": img, "boxes": boxes[pid], "fields": fields}))
    positives = sum(len(b) > 0 for b in boxes.values())
    return common.write_examples(
        out_dir, name=NAME, class_names=CLASS_NAMES, splits=SPLITS, tasks=tasks,
        load=functools.partial(_load, image_size=image_size, bit_depth=bit_depth), num_shards=num_shards,
        skip_bad=skip_bad, limit=limit, num_workers=num_workers, progress=progress,
        counts={"patients": len(boxes), "positive_patients": positives,
                "boxes": int(sum(len(b) for b in boxes.values()))},
        extra_info={"source": NAME, "image_size": image_size, "seed": seed,
                    "split_fractions": list(split_fractions)})
