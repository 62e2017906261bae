"""The TFDS features of a medvlp_jax example: the schema of ``data/schema.py``, key for key and byte for byte.

Each feature serialises to the same ``tf.train.Example`` field our ``ShardedWriter`` writes, so the records
TFDS writes parse with ``schema.feature_spec`` unchanged (the training pipeline and every evaluator read
them as they are), while ``tfds.load`` decodes them the TFDS way:

    key              TFDS feature                                serialised as (= schema.py)
    id, patient_id,  Text                                        bytes_list [1]
    study_id, report
    index            Scalar int64                                int64_list [1]
    image            Image (None, None, 1) PNG, uint8 or uint16  bytes_list [1]: our PNG bytes, not re-encoded
    labels           Tensor (num_classes,) float32               float_list [num_classes]
    finding_names,   Sequence(Text)                              bytes_list [n]
    finding_phrases
    finding_boxes    Tensor (None, 4) float32                    float_list [n * 4] (ymin, xmin, ymax, xmax)
    finding_masks    Sequence(Image PNG)                         bytes_list [n] or [0]

Boxes are a plain tensor rather than ``BBoxFeature`` on purpose: BBoxFeature rejects coordinates a hair
outside [0, 1], which our writer stores as given, and the two writers must accept the same examples.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def features(num_classes: int, *, bit_depth: int = 8):
    """The ``tfds.features.FeaturesDict`` of a data set with ``num_classes`` labels.

    Args:
      num_classes: length of the ``labels`` vector.
      bit_depth: 8 or 16, the PNG depth of the images (what ``tfds.load`` decodes them to).
    """
    import tensorflow_datasets as tfds
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    return tfds.features.FeaturesDict({
        "id": tfds.features.Text(),
        "patient_id": tfds.features.Text(),
        "study_id": tfds.features.Text(),
        "index": tfds.features.Scalar(dtype=np.int64),
        "image": tfds.features.Image(shape=(None, None, 1), dtype=dtype, encoding_format="png"),
        "report": tfds.features.Text(),
        "labels": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
        "finding_names": tfds.features.Sequence(tfds.features.Text()),
        "finding_phrases": tfds.features.Sequence(tfds.features.Text()),
        "finding_boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        "finding_masks": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 1), encoding_format="png")),
    })


def tfds_example(example: dict[str, Any], index: int, num_classes: int) -> dict[str, Any]:
    """A converter's example dict (what ``ShardedWriter.write`` takes) as the TFDS features above take it.

    Defaults and checks are those of ``schema.serialize``, so both writers accept and reject the same examples.

    Raises:
      ValueError: naming the example and the field, as ``schema.serialize`` does.
    """
    from medvlp_jax.data import schema
    schema.serialize(dict(example, index=index), num_classes)     # the one validation of an example
    names = [str(n) for n in example.get("finding_names", [])]
    return {
        "id": example["id"],
        "patient_id": example.get("patient_id", ""),
        "study_id": example.get("study_id", ""),
        "index": int(index),
        "image": bytes(example["image"]),
        "report": example["report"],
        "labels": np.asarray(example["labels"], np.float32).reshape(num_classes),
        "finding_names": names,
        "finding_phrases": [str(p) for p in example.get("finding_phrases", names)],
        "finding_boxes": np.asarray(example.get("finding_boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4),
        "finding_masks": [bytes(m) for m in example.get("finding_masks", [])],
    }
