"""THE TFRecord schema of an image-report example, shared by every converter and the pipeline.

A prepared data set is a directory:

    <root>/dataset_info.json                     name, schema_version, class_names, image info, splits
    <root>/<split>-<i:05d>-of-<n:05d>.tfrecord   tf.train.Example records (fields below)

Fields of one record (``FEATURES``):

    id              bytes   unique image id (e.g. MIMIC dicom_id, "demo-000123")
    patient_id      bytes   splits are patient-level; kept for audits
    study_id        bytes
    index           int64   position of the example in its split, 0..n-1 (assigned by the writer)
    image           bytes   PNG or JPEG, grayscale (8- or 16-bit) or RGB
    report          bytes   UTF-8 report text (findings + impression), may be empty for eval-only sets
    labels          float   [num_classes] per ``class_names``: 1 positive, 0 negative/blank, -1 uncertain
    finding_names   bytes   [n] name of each localised finding (e.g. "opacity")
    finding_phrases bytes   [n] the report phrase that names it (phrase grounding)
    finding_boxes   float   [n * 4] boxes as (ymin, xmin, ymax, xmax), normalised to [0, 1]
    finding_masks   bytes   [n] or [0]: PNG masks at the image's size, nonzero inside
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
INFO_FILE = "dataset_info.json"

REQUIRED_FIELDS = ("id", "index", "image", "report", "labels")


def feature_spec(num_classes: int) -> dict[str, Any]:
    """tf.io feature spec for ``tf.io.parse_single_example``."""
    import tensorflow as tf
    return {
        "id": tf.io.FixedLenFeature([], tf.string),
        "patient_id": tf.io.FixedLenFeature([], tf.string, default_value=b""),
        "study_id": tf.io.FixedLenFeature([], tf.string, default_value=b""),
        "index": tf.io.FixedLenFeature([], tf.int64),
        "image": tf.io.FixedLenFeature([], tf.string),
        "report": tf.io.FixedLenFeature([], tf.string),
        "labels": tf.io.FixedLenFeature([num_classes], tf.float32),
        "finding_names": tf.io.VarLenFeature(tf.string),
        "finding_phrases": tf.io.VarLenFeature(tf.string),
        "finding_boxes": tf.io.VarLenFeature(tf.float32),
        "finding_masks": tf.io.VarLenFeature(tf.string),
    }


def serialize(example: dict[str, Any], num_classes: int) -> bytes:
    """Encodes one example dict (python/numpy values) as a serialized tf.train.Example.

    Raises ValueError naming the field when a value is missing or malformed.
    """
    import tensorflow as tf
    for key in REQUIRED_FIELDS:
        if key not in example:
            raise ValueError(f"example {example.get('id', '?')!r} is missing field {key!r}")

    def b(v):
        return v.encode("utf-8") if isinstance(v, str) else bytes(v)

    def bytes_list(vals):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[b(v) for v in vals]))

    def float_list(vals):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in vals]))

    labels = np.asarray(example["labels"], np.float32).reshape(-1)
    if labels.shape[0] != num_classes:
        raise ValueError(f"example {example['id']!r}: labels has {labels.shape[0]} entries, "
                         f"the data set has {num_classes} classes")
    names = list(example.get("finding_names", []))
    boxes = np.asarray(example.get("finding_boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    if len(boxes) != len(names):
        raise ValueError(f"example {example['id']!r}: {len(names)} finding names but {len(boxes)} boxes")
    phrases = list(example.get("finding_phrases", names))
    masks = list(example.get("finding_masks", []))
    if masks and len(masks) != len(names):
        raise ValueError(f"example {example['id']!r}: {len(names)} findings but {len(masks)} masks")
    feats = {
        "id": bytes_list([example["id"]]),
        "patient_id": bytes_list([example.get("patient_id", "")]),
        "study_id": bytes_list([example.get("study_id", "")]),
        "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(example["index"])])),
        "image": bytes_list([example["image"]]),
        "report": bytes_list([example["report"]]),
        "labels": float_list(labels),
        "finding_names": bytes_list(names),
        "finding_phrases": bytes_list(phrases),
        "finding_boxes": float_list(boxes.reshape(-1)),
        "finding_masks": bytes_list(masks),
    }
    # deterministic=True writes the feature map sorted by key: otherwise protobuf's map order, and so the shard
    # bytes, change from process to process (same records, different files).
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString(deterministic=True)


def read_info(root: str) -> dict[str, Any]:
    """Reads ``<root>/dataset_info.json``; a clear error if the data set was never prepared.

    ``root`` may also be the version directory of a TFDS build (``medvlp_jax.data.tfds_builders``): its
    shards, split sizes and class names are then read from TFDS's files, in the same dict.
    """
    path = os.path.join(root, INFO_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no prepared data set at {root!r} ({INFO_FILE} is missing)")
    with open(path) as f:
        info = json.load(f)
    if isinstance(info.get("splits"), list) and "schema_version" not in info:   # TFDS's own dataset_info.json
        from medvlp_jax.data.tfds_builders import info as tfds_info
        info = tfds_info.read_tfds_info(root)
    if info.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {info.get('schema_version')} but this code reads "
                         f"{SCHEMA_VERSION}; prepare the data again")
    return info
