"""TensorFlow Datasets builders for every medvlp_jax data set; importing this package registers them.

    import medvlp_jax.data.tfds_builders            # registers medvlp_demo_iu, medvlp_mimic_cxr, ...
    import tensorflow_datasets as tfds

    tfds.builder("medvlp_demo_iu", data_dir="data/tfds").download_and_prepare()        # offline
    ds = tfds.load("medvlp_demo_iu", split="train", data_dir="data/tfds", try_gcs=False)

    tfds.builder("medvlp_mimic_cxr", data_dir="data/tfds").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="/data/mimic-cxr-jpg/2.0.0"))

The records follow medvlp_jax's schema (``features.py``), so a prepared version directory is also a
``config.data.root`` for training and evaluation as it is (``info.py``); ``prepare`` below is what
``launch/prepare_data.py --format=tfds`` calls. Building never touches the network: TFDS's GCS lookups
are off (``try_gcs`` False, and TFDS 4.9 disables GCS by default) and every input is local.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Optional

from medvlp_jax.data.tfds_builders.base import MedvlpConfig, SourceBuilder, config_name
from medvlp_jax.data.tfds_builders.builders import BUILDERS

log = logging.getLogger(__name__)

__all__ = ["BUILDERS", "MedvlpConfig", "SourceBuilder", "config_name", "get_builder", "prepare"]


def get_builder(name: str, data_dir: str, *, num_workers: int = 0, **options: Any) -> SourceBuilder:
    """The builder ``name`` (e.g. "medvlp_chexpert") for these converter options, writing under ``data_dir``
    (``num_workers`` image-loading processes).

    Raises:
      ValueError: an unknown builder name or option (the message lists the known ones).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown TFDS builder {name!r}; medvlp_jax has {sorted(BUILDERS)}")
    cls = BUILDERS[name]
    return cls(data_dir=data_dir, config=cls.make_config(**options), num_workers=num_workers)


def prepare(name: str, data_dir: str, *, manual_dir: Optional[str] = None, num_shards: Optional[int] = None,
            num_workers: int = 0, **options: Any) -> dict[str, Any]:
    """Builds data set ``name`` with TFDS under ``data_dir`` (offline) and says where it went.

    Args:
      name: a key of ``BUILDERS``.
      data_dir: TFDS data directory (the data set lands in ``<data_dir>/<name>/<config>/<version>``).
      manual_dir: the downloaded data set's root (not needed by the demo).
      num_shards: shard files per split (each split gets at most as many as it has examples); None lets
        TFDS choose by size.
      num_workers: image-loading processes (0: this one); the data do not depend on it.
      **options: the converter's keyword arguments (image_size, seed, limit, skip_bad, ...).

    Returns:
      {"name", "config", "root" (the version directory: a ``config.data.root``), "splits": {split: n},
       "dropped", "skipped_files", "counts"}.
    """
    import tensorflow_datasets as tfds
    builder = get_builder(name, data_dir, num_workers=num_workers, **options)
    shards = None
    if num_shards is not None:
        sizes = [n for n in builder.split_sizes(manual_dir).values() if n]
        # TFDS gives every split the same number of shards and refuses more shards than examples.
        shards = max(1, min([int(num_shards), *sizes]))
        if shards < num_shards:
            log.info("%s: %d shards per split (the smallest split has %d examples)", name, shards, min(sizes))
    # TFDS prints its progress lines to stdout; they go to stderr so stdout keeps only our summary.
    with contextlib.redirect_stdout(sys.stderr):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, num_shards=shards, try_download_gcs=False))
    meta = dict(builder.info.metadata or {})
    return {"name": name, "config": builder.builder_config.name, "root": str(builder.data_dir),
            "splits": {s: int(v.num_examples) for s, v in builder.info.splits.items()},
            "dropped": meta.get("dropped", {}), "skipped_files": meta.get("skipped_files", []),
            "counts": meta.get("counts", {})}
