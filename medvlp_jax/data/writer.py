"""Sharded TFRecord writer: deterministic shard assignment, and a manifest with per-shard counts."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

from medvlp_jax.data import schema


class ShardedWriter:
    """Writes one split of a data set as ``num_shards`` TFRecord files.

    Example ``i`` (in write order) gets ``index = i`` and goes to shard ``i % num_shards``, so the
    layout is a pure function of the example order. ``close()`` records the split in
    ``dataset_info.json`` (merging with splits written before).

    Usage:
        with ShardedWriter(root, "train", num_shards=8, class_names=[...], name="demo") as w:
            for ex in examples: w.write(ex)
    """

    def __init__(self, root: str, split: str, *, num_shards: int, class_names: list[str], name: str,
                 extra_info: Optional[dict[str, Any]] = None):
        import tensorflow as tf
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        os.makedirs(root, exist_ok=True)
        self.root, self.split, self.name = root, split, name
        self.class_names = list(class_names)
        self.extra_info = extra_info or {}
        self.files = [f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
        self._writers = [tf.io.TFRecordWriter(os.path.join(root, f)) for f in self.files]
        self._counts = [0] * num_shards
        self._n = 0

    def write(self, example: dict[str, Any]) -> int:
        """Writes one example (its ``index`` is set here); returns that index."""
        example = dict(example, index=self._n)
        record = schema.serialize(example, len(self.class_names))
        shard = self._n % len(self._writers)
        self._writers[shard].write(record)
        self._counts[shard] += 1
        self._n += 1
        return self._n - 1

    def write_all(self, examples: Iterable[dict[str, Any]]) -> int:
        for ex in examples:
            self.write(ex)
        return self._n

    def close(self) -> dict[str, Any]:
        for w in self._writers:
            w.close()
        path = os.path.join(self.root, schema.INFO_FILE)
        info: dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                info = json.load(f)
            if info.get("class_names", self.class_names) != self.class_names:
                raise ValueError(f"{path}: class_names differ between splits")
        info.update(self.extra_info)
        info.update(name=self.name, schema_version=schema.SCHEMA_VERSION, class_names=self.class_names)
        info.setdefault("splits", {})[self.split] = {
            "num_examples": self._n,
            "shards": [{"file": f, "num_examples": c} for f, c in zip(self.files, self._counts)],
        }
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, path)
        return info

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            for w in self._writers:
                w.close()
