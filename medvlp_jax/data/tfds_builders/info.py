"""A TFDS-prepared data set seen as one of ours: its shard files, split sizes and class names.

``schema.read_info(root)`` calls ``read_tfds_info`` when ``root`` (a TFDS version directory such as
``<data_dir>/medvlp_demo_iu/default/1.0.0``) holds TFDS's ``dataset_info.json`` instead of ours, so the
training pipeline, the evaluators and the tokenizer trainer read TFDS shards with no change of their own:
the records already follow our schema (``features.py``), and this module supplies what our
``dataset_info.json`` would say:

    {"name", "schema_version", "class_names", <the converter's extra info>,   from TFDS's metadata.json
     "splits": {split: {"num_examples": n, "shards": [{"file", "num_examples"}, ...]}},   from TFDS's splits
     "tfds": {"name", "config", "version", "data_dir"}}
"""
from __future__ import annotations

import json
import os
from typing import Any

METADATA_FILE = "metadata.json"     # tfds.core.MetadataDict's file


def read_tfds_info(root: str) -> dict[str, Any]:
    """Our info dict for the TFDS data set in ``root`` (see the module docstring).

    Raises:
      ValueError: the data set was not written by a medvlp_jax builder (no schema metadata), or is not
        stored as TFRecord files; the message says which and what to do.
    """
    import tensorflow_datasets as tfds
    path = os.path.join(root, METADATA_FILE)
    meta: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            meta = json.load(f)
    if "schema_version" not in meta or "class_names" not in meta:
        raise ValueError(f"{root!r} is a TFDS data set but not one written by a medvlp_jax builder ({path} has no "
                         "schema_version/class_names); build it with medvlp_jax.data.tfds_builders or "
                         "launch/prepare_data.py --format=tfds")
    builder = tfds.builder_from_directory(root)
    file_format = builder.info.file_format
    if file_format is not None and str(getattr(file_format, "value", file_format)) != "tfrecord":
        raise ValueError(f"{root!r} stores its records as {file_format}; the pipeline reads TFRecord files (build "
                         "it with the default file_format)")
    splits: dict[str, Any] = {}
    for name, split in builder.info.splits.items():
        files = [os.path.basename(os.fspath(f)) for f in split.filenames]
        counts = [int(n) for n in split.shard_lengths]
        if len(files) != len(counts):
            raise ValueError(f"{root!r}: split {name!r} lists {len(files)} files but {len(counts)} shard lengths")
        splits[name] = {"num_examples": int(split.num_examples),
                        "shards": [{"file": f, "num_examples": n} for f, n in zip(files, counts)]}
    return {**meta, "splits": splits,
            "tfds": {"name": builder.info.name, "config": builder.info.config_name or "",
                     "version": str(builder.info.version), "data_dir": os.path.abspath(root)}}
