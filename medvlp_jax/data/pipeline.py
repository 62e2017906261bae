"""tf.data input pipeline: TFRecord shards -> host-local numpy batches, resumable at any step.

Batch keys (host-local numpy; ``sharding.to_global`` makes them global arrays):
  image           [b, crop, crop, channels] float32, normalised to (x - 0.5) / 0.5
  input_ids       [b, max_text_len] int32
  attention_mask  [b, max_text_len] int32 (1 for [CLS], tokens, [SEP])
  word_ids        [b, max_text_len] int32 slot per token after word-piece merging (data/tokenizer.py)
  labels          [b, num_classes] float32 (1 / 0 / -1 uncertain)
  index           [b] int32 example index within its split
  valid           [b] bool (False only for the padding rows of an evaluation batch)

Determinism and resume: the order is a pure function of (seed, epoch). Each host reads the shard files
``files[process_index::process_count]``; every epoch it permutes them with a stateless shuffle seeded by
(seed, epoch), interleaves them deterministically and shuffles records with a buffer seeded by (seed, epoch).
Per-example augmentation is seeded by (seed, epoch, example index). A run resumed at step N skips the
N * local_batch examples it had consumed (whole epochs are skipped by arithmetic, not by reading), so it
sees exactly the batches an uninterrupted run would have seen from step N on.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, Iterator, Optional

import numpy as np

from medvlp_jax.data import schema, tokenizer as tokenizer_lib

AUTOTUNE = -1


def _tf():
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")   # TF must not take accelerator memory from JAX
    return tf


def host_files(info: dict[str, Any], root: str, split: str, process_index: int, process_count: int):
    """This host's shard files and their example counts."""
    if split not in info.get("splits", {}):
        raise ValueError(f"data set at {root!r} has no split {split!r}; it has {sorted(info.get('splits', {}))}")
    shards = info["splits"][split]["shards"]
    if len(shards) < process_count:
        raise ValueError(f"split {split!r} at {root!r} has {len(shards)} shard files but {process_count} processes "
                         f"read it; prepare it with --num_shards >= {process_count}")
    mine = shards[process_index::process_count]
    files = [os.path.join(root, s["file"]) for s in mine]
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"shard {f} listed in {os.path.join(root, schema.INFO_FILE)} is missing")
    return files, [int(s["num_examples"]) for s in mine]


def decode_image(tf, image_bytes, *, resize: int, crop: int, channels: int, train: bool, seed, random_flip: bool):
    """PNG/JPEG bytes -> [crop, crop, channels] float32 in [-1, 1].

    Resize so the longer side is ``resize`` (aspect kept), zero-pad to a square (MGCA), then random crop
    (train, stateless seed) or center crop (eval).
    """
    img = tf.io.decode_image(image_bytes, channels=1, expand_animations=False, dtype=tf.float32)
    shape = tf.cast(tf.shape(img)[:2], tf.float32)
    scale = resize / tf.reduce_max(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    img = tf.image.resize(img, new, method="area", antialias=True)
    img = tf.image.pad_to_bounding_box(img, (resize - new[0]) // 2, (resize - new[1]) // 2, resize, resize)
    if train:
        img = tf.image.stateless_random_crop(img, [crop, crop, 1], seed=seed)
        if random_flip:
            img = tf.image.stateless_random_flip_left_right(img, seed=seed + 1)
    else:
        off = (resize - crop) // 2
        img = img[off:off + crop, off:off + crop]
    img = (tf.clip_by_value(img, 0.0, 1.0) - 0.5) / 0.5
    if channels != 1:
        img = tf.tile(img, [1, 1, channels])
    img.set_shape([crop, crop, channels])
    return img


def _parse_fn(tf, data_cfg, num_classes: int, *, train: bool, seed: int):
    spec = schema.feature_spec(num_classes)
    spec = {k: spec[k] for k in ("id", "index", "image", "report", "labels")}

    def parse(record, epoch):
        ex = tf.io.parse_single_example(record, spec)
        s = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64), ex["index"]])
        image = decode_image(tf, ex["image"], resize=data_cfg.resize, crop=data_cfg.crop,
                             channels=data_cfg.channels, train=train, seed=s,
                             random_flip=data_cfg.get("random_flip", False))
        return {"image": image, "report": ex["report"], "labels": ex["labels"],
                "index": tf.cast(ex["index"], tf.int32), "id": ex["id"]}

    return parse


def build_train_dataset(data_cfg, *, local_batch: int, seed: int, start_step: int, process_index: int = 0,
                        process_count: int = 1):
    """The host's infinite tf.data stream of raw batches, positioned at ``start_step``."""
    tf = _tf()
    root, split = data_cfg.root, data_cfg.train_split
    info = schema.read_info(root)
    files, counts = host_files(info, root, split, process_index, process_count)
    n_host = sum(counts)
    if n_host < local_batch:
        raise ValueError(f"split {split!r} has {n_host} examples on this host, fewer than one batch ({local_batch})")
    consumed = start_step * local_batch
    start_epoch, skip = divmod(consumed, n_host)
    files_t = tf.constant(files)
    buffer = max(1, min(int(data_cfg.shuffle_buffer), n_host))

    def epoch_ds(epoch):
        order = tf.random.experimental.stateless_shuffle(files_t, seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
        ds = tf.data.Dataset.from_tensor_slices(order).interleave(
            tf.data.TFRecordDataset, cycle_length=min(4, len(files)), block_length=1,
            num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.shuffle(buffer, seed=seed * 7919 + epoch, reshuffle_each_iteration=False)
        return ds.map(lambda r: (r, epoch))

    ds = tf.data.Dataset.range(start_epoch, 2 ** 40).flat_map(epoch_ds).skip(skip)
    ds = ds.map(_parse_fn(tf, data_cfg, len(info["class_names"]), train=True, seed=seed),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    if data_cfg.get("skip_bad_records", False):
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
    return ds.with_options(options).prefetch(AUTOTUNE), info


def build_eval_dataset(data_cfg, split: str, *, local_batch: int, process_index: int = 0, process_count: int = 1):
    """One pass over ``split`` for this host, padded so every host yields the same number of batches.

    Returns (dataset of raw batches with a ``valid`` mask, info, num_batches).
    """
    tf = _tf()
    root = data_cfg.root
    info = schema.read_info(root)
    shards = info["splits"].get(split, {}).get("shards", [])
    files, counts = host_files(info, root, split, process_index, process_count)
    per_host = [sum(int(s["num_examples"]) for s in shards[p::process_count]) for p in range(process_count)]
    num_batches = max(-(-n // local_batch) for n in per_host)
    parse = _parse_fn(tf, data_cfg, len(info["class_names"]), train=False, seed=0)
    ds = tf.data.TFRecordDataset(files).map(lambda r: parse(r, tf.constant(0, tf.int64)),
                                            num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.map(lambda ex: dict(ex, valid=True))
    pad = num_batches * local_batch - sum(counts)
    dummy = {"image": tf.zeros([data_cfg.crop, data_cfg.crop, data_cfg.channels]), "report": tf.constant(""),
             "labels": tf.zeros([len(info["class_names"])]), "index": tf.constant(-1, tf.int32),
             "id": tf.constant(""), "valid": False}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(dummy).repeat(pad))
    return ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE), info, num_batches


class HostBatches:
    """Raw tf.data batches -> tokenised numpy batches (see module docstring for the keys)."""

    def __init__(self, dataset, tokenizer, max_text_len: int, describe: str):
        self._it = dataset.as_numpy_iterator()
        self._tok = tokenizer
        self._max_len = max_text_len
        self._describe = describe

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        import tensorflow as tf
        try:
            raw = next(self._it)
        except tf.errors.OpError as e:
            raise RuntimeError(f"input pipeline failed while reading {self._describe}: {e.message.splitlines()[0]} "
                               f"(set config.data.skip_bad_records=True to skip bad records)") from None
        texts = [r.decode("utf-8", errors="replace") for r in raw["report"]]
        tokens = tokenizer_lib.encode(self._tok, texts, self._max_len)
        return {"image": raw["image"].astype(np.float32), **tokens, "labels": raw["labels"].astype(np.float32),
                "index": raw["index"].astype(np.int32),
                "valid": np.asarray(raw.get("valid", np.ones(len(texts), bool)), bool)}


def make_train_iter(config, tokenizer, *, start_step: int, process_index: int = 0, process_count: int = 1):
    """Host-local training batches from ``start_step`` on (an infinite iterator)."""
    local_batch = config.train.batch_size // process_count
    ds, _ = build_train_dataset(config.data, local_batch=local_batch, seed=config.seed, start_step=start_step,
                                process_index=process_index, process_count=process_count)
    return HostBatches(ds, tokenizer, config.data.max_text_len,
                       f"split {config.data.train_split!r} of {config.data.root!r}")


class Prefetcher:
    """Runs ``fn(next(iterator))`` on a background thread, ``depth`` items ahead (keeps the host off the step)."""

    def __init__(self, iterator: Iterator, fn: Callable[[Any], Any] = lambda x: x, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(iterator, fn), daemon=True)
        self._thread.start()

    def _work(self, iterator, fn):
        try:
            for item in iterator:
                out = fn(item)
                while not self._stop.is_set():
                    try:
                        self._q.put(("ok", out), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, never lost
            self._q.put(("error", e))
            return
        self._q.put(("end", None))

    def __iter__(self):
        return self

    def __next__(self):
        kind, value = self._q.get()
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        return value

    def close(self):
        self._stop.set()
