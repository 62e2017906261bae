"""MS-CXR (phrase grounding over MIMIC-CXR-JPG) → TFRecord shards.

Layout read::

    <source_dir>/MS_CXR_Local_Alignment_v1.1.0.csv    (or v1.0.0; or pass csv_path)
        dicom_id, category_name, label_text, path, x, y, w, h, image_width, image_height[, split]
    <images_dir>/files/p15/p15318012/s51197436/<dicom_id>.jpg

``images_dir`` is the MIMIC-CXR-JPG root (default: source_dir); the CSV's ``path`` is relative to it.

One CSV row = one phrase-box pair; (x, y) is the box's top-left corner and (w, h) its size, in pixels of
the original image of size (image_width, image_height). A phrase with several boxes has several rows.

Here (methods.md 10.5): one example per image (id = dicom_id, patient/study ids from the path); each row
is a finding: ``finding_names`` = category_name, ``finding_phrases`` = label_text, ``finding_boxes`` =
the box normalised (ymin, xmin, ymax, xmax) in the padded output image, ``finding_masks`` = the box
rasterised at the output size. Labels = multi-hot over the 8 MS-CXR categories present in the image.
Splits: v1.1.0's ``split`` column (train / val / test → train / validation / test) when present; v1.0.0
has none, so everything goes to "test" (MS-CXR is an evaluation set). The report is left empty.
If the JPEG on disk is not (image_height, image_width) (e.g. a resized copy of MIMIC-CXR-JPG), the
boxes are scaled to it.
"""
from __future__ import annotations

import functools
import glob
import os
from typing import Any, Optional

import numpy as np

from medvlp_jax.data import images
from medvlp_jax.data.sources import common

NAME = "ms_cxr"
CLASS_NAMES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Lung Opacity", "Pleural Effusion",
               "Pneumonia", "Pneumothorax")
SPLIT_MAP = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}
SPLITS = ("train", "validation", "test")
COLUMNS = ("dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
           "image_height")


def _find_csv(source_dir: str, csv_path: Optional[str]) -> str:
    if csv_path:
        return csv_path
    found = sorted(glob.glob(os.path.join(source_dir, "MS_CXR_Local_Alignment*.csv")))
    if not found:
        raise FileNotFoundError(f"no MS_CXR_Local_Alignment*.csv in {source_dir!r}; pass csv_path")
    return found[-1]                                   # the newest version when several are present


def _ids_from_path(path: str) -> tuple[str, str]:
    """(subject_id, study_id) from "files/p15/p15318012/s51197436/<dicom_id>.jpg"."""
    parts = path.replace("\\", "/").split("/")
    return parts[-3].lstrip("p"), parts[-2].lstrip("s")


def _load(payload: dict[str, Any], *, image_size: int) -> dict[str, Any]:
    pixels, placement = images.load_for_dataset(payload["path"], image_size)
    rows = payload["rows"]
    sy = placement.in_height / np.array([r["image_height"] for r in rows], np.float64)
    sx = placement.in_width / np.array([r["image_width"] for r in rows], np.float64)
    x = np.array([r["x"] for r in rows], np.float64) * sx
    y = np.array([r["y"] for r in rows], np.float64) * sy
    w = np.array([r["w"] for r in rows], np.float64) * sx
    h = np.array([r["h"] for r in rows], np.float64) * sy
    boxes = placement.normalise_boxes(np.stack([y, x, y + h, x + w], axis=1))
    return dict(payload["fields"], image=images.encode_png(pixels),
                **common.finding_arrays([r["category_name"] for r in rows], [r["label_text"] for r in rows],
                                        boxes, [images.box_mask(b, image_size) for b in boxes]))


def prepare_ms_cxr(source_dir: str, out_dir: str, *, image_size: int = 256, num_shards: int = 4,
                   seed: int = 0, skip_bad: bool = False, limit: Optional[int] = None,
                   images_dir: Optional[str] = None, csv_path: Optional[str] = None, num_workers: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Converts MS-CXR to grounding shards (see the module docstring).

    Args:
      source_dir: directory holding the MS-CXR CSV.
      out_dir: output directory.
      image_size: output side.
      num_shards: shards per split.
      seed: unused (the split is the release's); kept for the common signature.
      skip_bad: count unreadable/missing JPEGs as skips instead of raising.
      limit: at most this many examples per split.
      images_dir: the MIMIC-CXR-JPG root the CSV's ``path`` is relative to (default source_dir).
      csv_path: the CSV (default: the newest MS_CXR_Local_Alignment*.csv in source_dir).
      num_workers: image-loading processes.
      progress: tqdm bar.
    """
    import pandas as pd
    del seed
    images_dir = images_dir or source_dir
    path = _find_csv(source_dir, csv_path)
    df = pd.read_csv(path, dtype={"dicom_id": str, "path": str})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    unknown = set(df["category_name"]) - set(CLASS_NAMES)
    if unknown:
        raise ValueError(f"{path}: unknown categories {sorted(unknown)}; known {CLASS_NAMES}")
    has_split = "split" in df.columns
    if has_split:
        bad = set(df["split"]) - set(SPLIT_MAP)
        if bad:
            raise ValueError(f"{path}: unknown split names {sorted(bad)}")
    per_image: dict[str, list[dict[str, Any]]] = {}
    for r in df.to_dict("records"):
        per_image.setdefault(r["dicom_id"], []).append(r)
    tasks = []
    for split in SPLITS:
        for dicom_id in sorted(per_image):
            rows = per_image[dicom_id]
            image_split = SPLIT_MAP[rows[0]["split"]] if has_split else "test"
            if has_split and len({SPLIT_MAP[r["split"]] for r in rows}) > 1:
                raise ValueError(f"{path}: image {dicom_id} is in several splits")
            if image_split != split:
                continue
            subject, study = _ids_from_path(rows[0]["path"])
            labels = np.zeros(len(CLASS_NAMES), np.float32)
            for r in rows:
                labels[CLASS_NAMES.index(r["category_name"])] = 1.0
            img = os.path.join(images_dir, rows[0]["path"])
            fields = {"id": dicom_id, "patient_id": subject, "study_id": study, "report": "",
                      "labels": labels}
            keep = [{k: r[k] for k in COLUMNS} for r in rows]
            tasks.append(common.Task(split, img, {"path": img, "rows": keep, "fields": fields}))
    return common.write_examples(
        out_dir, name=NAME, class_names=CLASS_NAMES, splits=SPLITS, tasks=tasks,
        load=functools.partial(_load, image_size=image_size), num_shards=num_shards, skip_bad=skip_bad,
        limit=limit, num_workers=num_workers, progress=progress,
        counts={"images": len(per_image), "phrase_boxes": len(df),
                "phrases": int(df.groupby(["dicom_id", "label_text"]).ngroups)},
        extra_info={"source": NAME, "image_size": image_size, "csv": os.path.basename(path)})
