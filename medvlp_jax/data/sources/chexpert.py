"""CheXpert v1.0 (small) → TFRecord shards: the MGCA linear-probe set, and CheXpert 5x200.

Layout read (``source_dir`` = the ``CheXpert-v1.0-small`` directory)::

    <source_dir>/train.csv   Path,Sex,Age,Frontal/Lateral,AP/PA,<14 observations>: 1.0/0.0/-1.0/blank
    <source_dir>/valid.csv   same columns (no blanks, no uncertain)
    <source_dir>/train/patient00001/study1/view1_frontal.jpg

``Path`` is relative to the *parent* of the root ("CheXpert-v1.0-small/train/patient00001/..."); if the
root was renamed, the first path component is replaced by the root itself.

``prepare_chexpert`` (methods.md 10.1):

* frontal images only (``Frontal/Lateral == "Frontal"``);
* ``label_policy="mgca"``: the 5 competition labels (``common.CHEXPERT_COMPETITION``), blank → 0,
  uncertain → 1 for Atelectasis, Edema, Pleural Effusion and → 0 for Cardiomegaly, Consolidation
  ("U-ones"/"U-zeros" as in MGCA); ``label_policy="raw"``: all 14 observations as 1/0/-1, blank → 0;
* splits: "test" = the official valid.csv; "validation" = about ``num_validation`` (MGCA: 5,000) train
  images held out; "train" = the rest, minus the CheXpert 5x200 images (selected by ``select_5x200`` with
  ``seed_5x200``, the same selection ``prepare_chexpert_5x200`` writes);
* **deliberate fix of an MGCA quirk**: MGCA picks its validation rows by position but removes them from
  train by index label after filtering, so some validation images stay in train, and it holds out
  images, not patients. Here whole *patients* are held out (seeded) until at least ``num_validation``
  images are reached, so no patient is in two splits.

``prepare_chexpert_5x200`` (GLoRIA's retrieval / zero-shot set, methods.md 10.4): from the frontal
train.csv images, per competition class the images positive (1) for that class and negative (0 or blank)
for the other four (uncertain excluded), ``per_class`` (200) drawn per class with
``np.random.default_rng(seed)``; the classes are disjoint by construction. Written as split "test" with
one-hot labels over the 5 classes and an empty report (CheXpert has no public reports).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional

import numpy as np

from medvlp_jax.data import images
from medvlp_jax.data.sources import common

NAME = "chexpert"
NAME_5X200 = "chexpert_5x200"
SPLITS = ("train", "validation", "test")
# MGCA's uncertainty policy: -1 → 1 ("U-ones") for these, → 0 ("U-zeros") for the other competition tasks.
U_ONES = ("Atelectasis", "Edema", "Pleural Effusion")


def _read(source_dir: str, name: str):
    import pandas as pd
    path = os.path.join(source_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"CheXpert file {path!r} is missing; source_dir must be the "
                                "CheXpert-v1.0-small directory holding train.csv and valid.csv")
    df = pd.read_csv(path)
    missing = [c for c in ("Path", "Frontal/Lateral", *common.CHEXPERT_CLASSES) if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return df


def image_path(source_dir: str, rel: str) -> str:
    """The file of a CSV ``Path`` (relative to the root's parent; falls back to the root itself)."""
    root = os.path.abspath(source_dir)
    p = os.path.join(os.path.dirname(root), rel)
    if os.path.exists(p):
        return p
    parts = rel.replace("\\", "/").split("/", 1)
    return os.path.join(root, parts[1]) if len(parts) == 2 else p


def _ids(rel: str) -> tuple[str, str, str]:
    """(id, patient_id, study_id) from "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"."""
    parts = rel.replace("\\", "/").split("/")
    patient = next((p for p in parts if p.startswith("patient")), parts[-3])
    study = next((p for p in parts if p.startswith("study")), parts[-2])
    ident = os.path.splitext("/".join(parts[1:]))[0]
    return ident, patient, f"{patient}/{study}"


def labels_mgca(row: dict[str, Any]) -> np.ndarray:
    """5 competition labels with MGCA's policy: blank → 0, uncertain → 1 (U_ONES) or 0 (others)."""
    out = np.zeros(len(common.CHEXPERT_COMPETITION), np.float32)
    for i, c in enumerate(common.CHEXPERT_COMPETITION):
        v = row[c]
        if v != v:                              # blank
            continue
        if v == -1:
            out[i] = 1.0 if c in U_ONES else 0.0
        else:
            out[i] = float(v)
    return out


def labels_raw(row: dict[str, Any]) -> np.ndarray:
    """All 14 observations: 1 / 0 / -1 as given, blank → 0."""
    return np.array([0.0 if row[c] != row[c] else float(row[c]) for c in common.CHEXPERT_CLASSES],
                    np.float32)


def _frontal(df):
    return df[df["Frontal/Lateral"] == "Frontal"].sort_values("Path").reset_index(drop=True)


def select_5x200(train_df, *, per_class: int = 200, seed: int = 0) -> list[tuple[str, str]]:
    """CheXpert 5x200 from a train.csv DataFrame: [(Path, class name)], class by class.

    Raises:
      ValueError: a class has fewer than ``per_class`` candidates.
    """
    df = _frontal(train_df)
    vals = df[list(common.CHEXPERT_COMPETITION)].fillna(0).to_numpy()
    rng = np.random.default_rng(seed)
    out = []
    for k, c in enumerate(common.CHEXPERT_COMPETITION):
        want = np.zeros(len(common.CHEXPERT_COMPETITION))
        want[k] = 1
        idx = np.flatnonzero((vals == want).all(axis=1))
        if len(idx) < per_class:
            raise ValueError(f"CheXpert 5x200: only {len(idx)} images are positive for exactly {c!r}, "
                             f"{per_class} needed")
        chosen = np.sort(rng.choice(idx, per_class, replace=False))
        out.extend((df["Path"].iloc[i], c) for i in chosen)
    return out


def _load(payload: dict[str, Any], *, image_size: int) -> dict[str, Any]:
    pixels, _ = images.load_for_dataset(payload["path"], image_size)
    return dict(payload["fields"], image=images.encode_png(pixels))


def _task(source_dir: str, split: str, rel: str, labels: np.ndarray) -> common.Task:
    ident, patient, study = _ids(rel)
    path = image_path(source_dir, rel)
    fields = {"id": ident, "patient_id": patient, "study_id": study, "report": "", "labels": labels}
    return common.Task(split, path, {"path": path, "fields": fields})


def prepare_chexpert(source_dir: str, out_dir: str, *, image_size: int = 256, num_shards: int = 16,
                     seed: int = 0, skip_bad: bool = False, limit: Optional[int] = None,
                     label_policy: str = "mgca", num_validation: int = 5000, exclude_5x200: bool = True,
                     per_class_5x200: int = 200, seed_5x200: int = 0, num_workers: int = 0,
                     progress: bool = True) -> dict[str, Any]:
    """Converts CheXpert v1.0 to train/validation/test shards (see the module docstring).

    Args:
      source_dir: the CheXpert-v1.0-small directory.
      out_dir: output directory.
      image_size: output side.
      num_shards: shards per split.
      seed: seeds the patient-level validation hold-out.
      skip_bad: count unreadable images as skips instead of raising.
      limit: at most this many examples per split.
      label_policy: "mgca" (5 competition labels, U-ones/U-zeros) or "raw" (14 labels, 1/0/-1).
      num_validation: hold out whole patients until at least this many train images are held out.
      exclude_5x200: remove the CheXpert 5x200 images from train/validation.
      per_class_5x200, seed_5x200: the 5x200 selection to exclude (as ``prepare_chexpert_5x200``).
      num_workers: image-loading processes.
      progress: tqdm bar.
    """
    if label_policy == "mgca":
        to_labels, classes = labels_mgca, common.CHEXPERT_COMPETITION
    elif label_policy == "raw":
        to_labels, classes = labels_raw, common.CHEXPERT_CLASSES
    else:
        raise ValueError(f"label_policy must be 'mgca' or 'raw', got {label_policy!r}")
    train_df, valid_df = _read(source_dir, "train.csv"), _read(source_dir, "valid.csv")
    dropped = {"not_frontal": int((train_df["Frontal/Lateral"] != "Frontal").sum()
                                  + (valid_df["Frontal/Lateral"] != "Frontal").sum())}
    train = _frontal(train_df)
    excluded = set()
    if exclude_5x200:
        excluded = {p for p, _ in select_5x200(train_df, per_class=per_class_5x200, seed=seed_5x200)}
        train = train[~train["Path"].isin(excluded)].reset_index(drop=True)
        dropped["in_chexpert_5x200"] = len(excluded)

    patients = [_ids(p)[1] for p in train["Path"]]
    per_patient: dict[str, int] = {}
    for p in patients:
        per_patient[p] = per_patient.get(p, 0) + 1
    uniq = sorted(per_patient)
    held, n_held = set(), 0
    for i in np.random.default_rng(seed).permutation(len(uniq)):
        if n_held >= num_validation:
            break
        held.add(uniq[i])
        n_held += per_patient[uniq[i]]

    tasks = []
    rows = train.to_dict("records")
    for split in ("train", "validation"):
        for r, p in zip(rows, patients):
            if (p in held) == (split == "validation"):
                tasks.append(_task(source_dir, split, r["Path"], to_labels(r)))
    for r in _frontal(valid_df).to_dict("records"):
        tasks.append(_task(source_dir, "test", r["Path"], to_labels(r)))
    return common.write_examples(
        out_dir, name=NAME, class_names=classes, splits=SPLITS, tasks=tasks,
        load=functools.partial(_load, image_size=image_size), num_shards=num_shards, skip_bad=skip_bad,
        limit=limit, num_workers=num_workers, progress=progress, dropped=dropped,
        counts={"validation_patients": len(held)},
        extra_info={"source": NAME, "image_size": image_size, "label_policy": label_policy})


def prepare_chexpert_5x200(source_dir: str, out_dir: str, *, image_size: int = 256, num_shards: int = 4,
                           seed: int = 0, skip_bad: bool = False, limit: Optional[int] = None,
                           per_class: int = 200, num_workers: int = 0,
                           progress: bool = True) -> dict[str, Any]:
    """Writes CheXpert 5x200 (split "test", one-hot labels over the 5 competition classes).

    ``limit`` caps the whole split (the first images in class order), like the other converters.
    """
    chosen = select_5x200(_read(source_dir, "train.csv"), per_class=per_class, seed=seed)
    tasks = []
    for rel, c in chosen:
        onehot = np.zeros(len(common.CHEXPERT_COMPETITION), np.float32)
        onehot[common.CHEXPERT_COMPETITION.index(c)] = 1.0
        tasks.append(_task(source_dir, "test", rel, onehot))
    return common.write_examples(
        out_dir, name=NAME_5X200, class_names=common.CHEXPERT_COMPETITION, splits=("test",), tasks=tasks,
        load=functools.partial(_load, image_size=image_size), num_shards=num_shards, skip_bad=skip_bad,
        limit=limit, num_workers=num_workers, progress=progress,
        counts={"per_class": per_class},
        extra_info={"source": NAME_5X200, "image_size": image_size, "seed": seed})
