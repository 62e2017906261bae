"""Non-image fields of a prepared split (labels, reports, ids, finding names), read without decoding images."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from medvlp_jax.data import pipeline, schema


def read_split_fields(root: str, split: str, fields=("index", "labels")) -> dict[str, Any]:
    """Non-image fields of every example of a split (all shards, images not decoded), sorted by ``index``.

    Args:
        root: prepared data directory.
        split: split name.
        fields: any of "index", "labels", "report", "id", "patient_id", "finding_names".

    Returns:
        {field: array [n] ([n, classes] for labels; str for text fields; for "finding_names" a list per
        example of its finding names)}.
    """
    tf = pipeline.import_tf()   # TF kept off the accelerators
    info = schema.read_info(root)
    if split not in info.get("splits", {}):
        raise ValueError(f"data set at {root!r} has no split {split!r}; it has {sorted(info.get('splits', {}))}")
    full = schema.feature_spec(len(info["class_names"]))
    spec = {f: full[f] for f in set(fields) | {"index"}}
    files = [os.path.join(root, s["file"]) for s in info["splits"][split]["shards"]]
    rows: dict[str, list] = {f: [] for f in spec}

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        return {f: tf.sparse.to_dense(v) if isinstance(v, tf.sparse.SparseTensor) else v for f, v in ex.items()}

    def text(v):
        return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v

    for ex in tf.data.TFRecordDataset(files).map(parse).as_numpy_iterator():
        for f in spec:
            v = ex[f]
            rows[f].append([text(x) for x in v] if isinstance(spec[f], tf.io.VarLenFeature) else text(v))
    order = np.argsort(np.asarray(rows["index"], np.int64), kind="stable")
    out = {}
    for f, v in rows.items():
        if f not in fields:
            continue
        if isinstance(spec[f], tf.io.VarLenFeature):
            out[f] = [v[i] for i in order]
        else:
            out[f] = np.asarray(v)[order] if v else np.zeros((0,))
    return out
