"""Data preparation entry points shared by launch/prepare_data.py and the demo's first run."""
from __future__ import annotations

import os

from medvlp_jax.data import schema, tokenizer as tokenizer_lib


def read_reports(root: str, split: str) -> list[str]:
    """All report texts of one split (for tokenizer training)."""
    import tensorflow as tf
    info = schema.read_info(root)
    files = [os.path.join(root, s["file"]) for s in info["splits"][split]["shards"]]
    spec = {"report": tf.io.FixedLenFeature([], tf.string)}
    out = []
    for rec in tf.data.TFRecordDataset(files).as_numpy_iterator():
        out.append(tf.io.parse_single_example(rec, spec)["report"].numpy().decode("utf-8"))
    return out


def train_tokenizer(root: str, *, split: str = "train", vocab_size: int = 3000, out_dir: str | None = None) -> str:
    """Trains the demo WordPiece vocabulary on a split's reports; saves it to ``<root>/tokenizer``."""
    out_dir = out_dir or os.path.join(root, "tokenizer")
    return tokenizer_lib.train_wordpiece(read_reports(root, split), out_dir, vocab_size=vocab_size)


def prepare_demo(root: str, *, seed: int = 0, image_size: int = 128, num_shards: int = 4,
                 vocab_size: int = 3000, limit: int | None = None) -> dict:
    """Demo data set (IU reports + rendered radiographs) and its tokenizer under ``root``."""
    from medvlp_jax.data.sources import demo_iu
    summary = demo_iu.prepare_demo(root, seed=seed, image_size=image_size, num_shards=num_shards, limit=limit)
    train_tokenizer(root, vocab_size=vocab_size)
    return summary


def ensure_demo_data(config) -> None:
    """The demo's first run prepares its own data (config.data.auto_prepare)."""
    root = config.data.root
    if os.path.exists(os.path.join(root, schema.INFO_FILE)) and os.path.isdir(config.data.tokenizer_dir):
        return
    if not config.data.get("auto_prepare", False):
        return
    from medvlp_jax.logging_lib import log
    log.info("preparing the demo data set under %s (first run only)", root)
    prepare_demo(root, seed=config.data.get("prepare_seed", 0), vocab_size=config.model.text.vocab_size)
