"""COVIDx (the 3-class releases, v5-v9) → TFRecord shards for classification.

Layout read (``source_dir`` = the unpacked download)::

    <source_dir>/train.txt   (or train_COVIDx9A.txt etc.; pass train_file/test_file to pick)
    <source_dir>/test.txt
    <source_dir>/train/<filename>    <source_dir>/test/<filename>

Each list line is "patient_id filename label source", whitespace separated, e.g.
"3 SARS-10.1148rg.242035193-g04mr34g0-Fig8a-day0.jpeg pneumonia cohen"; the label is one of normal /
pneumonia / COVID-19. (The later binary releases, COVIDx CXR-3/4, say positive/negative and are refused
with a clear error.) Patient ids are not unique across sources, so patient_id = "<source>:<patient_id>".

Here (methods.md 10.1): one-hot labels over ("normal", "pneumonia", "COVID-19"); "test" = the official test
list; the official train list split 80/20 into train/validation with ``seed`` (MGCA: seed 0). **Change:**
MGCA splits list *rows*; here the split is over patients, so no patient is in both train and validation.
Images may be RGB; they are stored grayscale.
"""
from __future__ import annotations

import functools
import glob
import os
from typing import Any, Optional

import numpy as np

from medvlp_jax.data import images
from medvlp_jax.data.sources import common

NAME = "covidx"
CLASS_NAMES = ("normal", "pneumonia", "COVID-19")
SPLITS = ("train", "validation", "test")
_LABELS = {c.lower(): i for i, c in enumerate(CLASS_NAMES)}


def parse_list(path: str) -> list[dict[str, str]]:
    """An official split file → [{"patient_id", "filename", "label", "source"}]."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 4:
                raise ValueError(f"{path}:{n}: expected 'patient_id filename label source', got {line!r}")
            # the last three fields are single tokens; anything before them is the patient id
            pid, fname, label, source = " ".join(parts[:-3]), parts[-3], parts[-2], parts[-1]
            if label.lower() not in _LABELS:
                raise ValueError(f"{path}:{n}: label {label!r} is not one of {CLASS_NAMES} (binary "
                                 "COVIDx CXR-3/4 lists are not supported)")
            rows.append({"patient_id": pid, "filename": fname, "label": label, "source": source})
    return rows


def _find_list(source_dir: str, kind: str, given: Optional[str]) -> str:
    if given:
        return given if os.path.isabs(given) else os.path.join(source_dir, given)
    exact = os.path.join(source_dir, f"{kind}.txt")
    if os.path.exists(exact):
        return exact
    found = sorted(glob.glob(os.path.join(source_dir, f"{kind}*.txt")))
    if len(found) != 1:
        raise FileNotFoundError(f"COVIDx: expected one {kind}.txt or {kind}_*.txt in {source_dir!r}, found "
                                f"{[os.path.basename(p) for p in found]}; pass {kind}_file")
    return found[0]


def _load(payload: dict[str, Any], *, image_size: int) -> dict[str, Any]:
    pixels, _ = images.load_for_dataset(payload["path"], image_size)
    return dict(payload["fields"], image=images.encode_png(pixels))


def prepare_covidx(source_dir: str, out_dir: str, *, image_size: int = 256, num_shards: int = 8,
                   seed: int = 0, skip_bad: bool = False, limit: Optional[int] = None,
                   train_file: Optional[str] = None, test_file: Optional[str] = None,
                   validation_fraction: float = 0.2, num_workers: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Converts COVIDx to train/validation/test shards (see the module docstring).

    Args:
      source_dir: directory holding the split lists and train/ test/ image folders.
      out_dir: output directory.
      image_size: output side.
      num_shards: shards per split.
      seed: seeds the patient-level train/validation split.
      skip_bad: count unreadable/missing images as skips instead of raising.
      limit: at most this many examples per split.
      train_file, test_file: list file names (default: train.txt / test.txt, or the one train*.txt).
      validation_fraction: fraction of train patients held out.
      num_workers: image-loading processes.
      progress: tqdm bar.
    """
    train = parse_list(_find_list(source_dir, "train", train_file))
    test = parse_list(_find_list(source_dir, "test", test_file))
    key = lambda r: f"{r['source']}:{r['patient_id']}"      # noqa: E731
    assign = common.split_groups([key(r) for r in train],
                                 {"train": 1 - validation_fraction, "validation": validation_fraction}, seed)

    def task(split: str, folder: str, r: dict[str, str]) -> common.Task:
        onehot = np.zeros(len(CLASS_NAMES), np.float32)
        onehot[_LABELS[r["label"].lower()]] = 1.0
        path = os.path.join(source_dir, folder, r["filename"])
        fields = {"id": r["filename"], "patient_id": key(r), "study_id": "", "report": "", "labels": onehot}
        return common.Task(split, path, {"path": path, "fields": fields})

    tasks = [task(s, "train", r) for s in ("train", "validation") for r in train if assign[key(r)] == s]
    tasks += [task("test", "test", r) for r in test]
    counts = {f"{split}_{c}": sum(1 for t in tasks if t.split == split and t.payload["fields"]["labels"][i])
              for split in SPLITS for i, c in enumerate(CLASS_NAMES)}
    return common.write_examples(
        out_dir, name=NAME, class_names=CLASS_NAMES, splits=SPLITS, tasks=tasks,
        load=functools.partial(_load, image_size=image_size), num_shards=num_shards, skip_bad=skip_bad,
        limit=limit, num_workers=num_workers, progress=progress, counts=counts,
        extra_info={"source": NAME, "image_size": image_size, "seed": seed})
