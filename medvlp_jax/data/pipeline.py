"""tf.data input pipeline: TFRecord shards -> host-local numpy batches, resumable at any step.

This module assembles the tf.data graph (``build_train_dataset``, ``build_eval_dataset`` -> ``RawBatches``);
the ops that decode and check a record are in ``data/decode.py``, naming a bad record in
``data/bad_records.py``, and tokenised numpy batches and the prefetcher in ``data/host_batches.py``.

Batch keys (host-local numpy; ``sharding.to_global`` makes them global arrays):
  image           [b, crop, crop, channels] float32, normalised to (x - 0.5) / 0.5
  input_ids       [b, max_text_len] int32
  attention_mask  [b, max_text_len] int32 (1 for [CLS], tokens, [SEP])
  word_ids        [b, max_text_len] int32 slot per token after word-piece merging (data/tokenizer.py)
  labels          [b, num_classes] float32 (1 / 0 / -1 uncertain)
  index           [b] int32 example index within its split (-1 for a skipped bad record)
  valid           [b] bool (False for the padding rows of an evaluation batch and for skipped bad records)

Determinism and resume: the order is a pure function of (seed, epoch). The shard files are dealt to
``num_streams`` streams (``config.data.num_streams``; 0 = one per process): stream s reads
``files[s::num_streams]``, every epoch permutes them with a stateless shuffle seeded by (seed, epoch),
interleaves them deterministically and shuffles records with a buffer seeded by (seed, epoch). Process p of P
owns streams ``p*S/P .. (p+1)*S/P - 1``; its local batch is the concatenation of its streams' batches, and
the global batch is the concatenation over processes, i.e. over streams in order. So a fixed
``num_streams`` gives the same global batches on any number of processes that divides it (the multi-host
test compares 2 processes with 1 process this way). Per-example augmentation is seeded by (seed, epoch,
example index). A run resumed at step N skips the N * stream_batch records each stream had consumed (whole
epochs by arithmetic, not by reading), so it sees exactly the batches an uninterrupted run would have seen.

Bad records: every training record is checked as it is parsed (required fields, a PNG/JPEG image with 1
or 3 channels and a usable shape that decodes, a report that is valid UTF-8 and, for training, not empty
or blank). By default the first bad record stops the run with an error that names the shard file, the record
number in it, the example id and what is wrong (``BadRecordError``; found by re-reading the records of the
failing batch, or this host's files, in Python). With ``config.data.skip_bad_records=True`` a bad record
becomes a row with ``valid=False`` (zero image, empty report, index -1) instead: batch shapes, the data
order of the other records and exact resume are unchanged, every objective already ignores invalid rows,
and the records are counted (``HostBatches.num_skipped``; the first few are logged with their reason).
A truncated shard yields its readable records and then one invalid row per missing record (counts from
``dataset_info.json``), so epoch arithmetic stays exact.

Empty reports are treated as bad records in training (an error by default, skipped and counted with
``skip_bad_records``): a pair with no text teaches the contrastive loss nothing and every converter already
drops them while preparing (counted in its summary), so one in a prepared train split means the data needs
re-preparing. Evaluation splits may have empty reports (classification data sets ship none).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional

from medvlp_jax.data import decode, schema
from medvlp_jax.data.bad_records import locate_bad_record
from medvlp_jax.data.host_batches import HostBatches

AUTOTUNE = -1

log = logging.getLogger("medvlp_jax")


def import_tf():
    """TensorFlow, kept off the accelerators (TF must not take accelerator memory from JAX)."""
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:                       # TF already initialised its devices (set earlier)
        pass
    return tf


def host_files(info: dict[str, Any], root: str, split: str, process_index: int, process_count: int):
    """The shard files (and their example counts) read by reader ``process_index`` of ``process_count``.

    Readers are processes, or the streams of ``config.data.num_streams``: reader i gets ``shards[i::n]``.
    """
    if split not in info.get("splits", {}):
        raise ValueError(f"data set at {root!r} has no split {split!r}; it has {sorted(info.get('splits', {}))}")
    shards = info["splits"][split]["shards"]
    if len(shards) < process_count:
        raise ValueError(f"split {split!r} at {root!r} has {len(shards)} shard files but {process_count} processes "
                         f"(or data streams) read it; prepare it with --num_shards >= {process_count}")
    mine = shards[process_index::process_count]
    files = [os.path.join(root, s["file"]) for s in mine]
    for f in files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"shard {f} listed in {os.path.join(root, schema.INFO_FILE)} is missing")
    return files, [int(s["num_examples"]) for s in mine]


def _parse_fn(tf, data_cfg, num_classes: int, *, train: bool, seed: int):
    """(record, epoch) -> example dict; raises (InvalidArgumentError) on a bad record."""
    spec = schema.feature_spec(num_classes)
    spec = {k: spec[k] for k in ("id", "index", "image", "report", "labels")}

    def parse(record, epoch):
        ex = tf.io.parse_single_example(record, spec)
        checks = decode.check_image_shape(tf, decode.image_header(tf, ex["image"]), data_cfg.resize)
        checks += decode.check_report(tf, ex["report"], require_text=train)
        with tf.control_dependencies(checks):
            s = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64), ex["index"]])
            image = decode.decode_image(tf, ex["image"], resize=data_cfg.resize, crop=data_cfg.crop,
                                 channels=data_cfg.channels, train=train, seed=s,
                                 random_flip=data_cfg.get("random_flip", False))
        return {"image": image, "report": ex["report"], "labels": ex["labels"],
                "index": tf.cast(ex["index"], tf.int32), "id": ex["id"], "bad": tf.constant(False)}

    return parse


def _placeholder(tf, data_cfg, num_classes: int):
    """The example that stands in for a skipped bad record (``bad`` True, so ``valid`` False)."""
    return {"image": tf.zeros([data_cfg.crop, data_cfg.crop, data_cfg.channels]), "report": tf.constant(""),
            "labels": tf.zeros([num_classes]), "index": tf.constant(-1, tf.int32), "id": tf.constant(""),
            "bad": tf.constant(True)}


def _records(tf, files_t, counts_t, file_idx, *, pad_truncated: bool):
    """(record, file index, record number) of one shard file.

    pad_truncated: a file that ends early (truncated, DataLossError) is completed with empty records numbered
    -1 up to its count in dataset_info.json (they then fail to parse and become skipped rows).
    """
    ds = tf.data.TFRecordDataset(files_t[file_idx]).enumerate()
    if pad_truncated:
        filler = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), tf.constant(b""))).repeat()
        ds = ds.ignore_errors().concatenate(filler).take(counts_t[file_idx])
    return ds.map(lambda k, r: (r, file_idx, k))


def _map_records(tf, ds, parse, data_cfg, num_classes: int, *, skip_bad: bool):
    """Parses ((record, file_idx, recno), epoch) elements; with ``skip_bad`` a failing record becomes a placeholder.

    The fallback works per record: a one-element dataset that parses the record with errors ignored, followed
    by the placeholder, cut to one element. Interleaving these keeps the order and the parallelism.
    """
    def with_identity(ex, file_idx, recno):
        return dict(ex, file=tf.cast(file_idx, tf.int32), record=tf.cast(recno, tf.int32))

    if not skip_bad:
        return ds.map(lambda rec, epoch: with_identity(parse(rec[0], epoch), rec[1], rec[2]),
                      num_parallel_calls=AUTOTUNE, deterministic=True)
    bad = _placeholder(tf, data_cfg, num_classes)

    def one(rec, epoch):
        good = tf.data.Dataset.from_tensors((rec, epoch)).map(lambda r, e: parse(r[0], e)).ignore_errors()
        return good.concatenate(tf.data.Dataset.from_tensors(bad)).take(1).map(
            lambda ex: with_identity(ex, rec[1], rec[2]))

    return ds.interleave(one, cycle_length=max(2, os.cpu_count() or 2), block_length=1,
                         num_parallel_calls=AUTOTUNE, deterministic=True)


def num_streams_of(data_cfg, process_count: int) -> int:
    """``config.data.num_streams`` (0: one per process); must be a multiple of the process count."""
    n = int(data_cfg.get("num_streams", 0) or process_count)
    if n % process_count:
        raise ValueError(f"config.data.num_streams={n} is not a multiple of the {process_count} processes")
    return n


def _stream_raw(tf, files: list[str], counts: list[int], *, seed: int, skip: int, shuffle_buffer: int,
                pad_truncated: bool):
    """One stream's infinite, ordered ((record, file_idx, recno), epoch) elements after skipping ``skip``."""
    n = sum(counts)
    start_epoch, skip_in_epoch = divmod(skip, n)
    files_t, counts_t = tf.constant(files), tf.constant(counts, tf.int64)
    buffer = max(1, min(int(shuffle_buffer), n))

    def epoch_ds(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(len(files)),
                                                         seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
        ds = tf.data.Dataset.from_tensor_slices(order).interleave(
            lambda i: _records(tf, files_t, counts_t, i, pad_truncated=pad_truncated),
            cycle_length=min(4, len(files)), block_length=1, num_parallel_calls=AUTOTUNE, deterministic=True)
        ds = ds.shuffle(buffer, seed=seed * 7919 + epoch, reshuffle_each_iteration=False)
        return ds.map(lambda *r: (r, epoch))

    return tf.data.Dataset.range(start_epoch, 2 ** 40).flat_map(epoch_ds).skip(skip_in_epoch)


@dataclasses.dataclass
class RawBatches:
    """A tf.data dataset of raw batches, and what naming a bad record in it takes.

    Attributes:
      dataset: tf.data.Dataset of raw batch dicts (the example fields plus ``bad``, ``file``, ``record``).
      files: the shard files behind it; a raw batch's ``file`` indexes this list, ``record`` is the record
        number in that file.
      num_classes, data_cfg, train: how its records were parsed (``bad_records.check_record`` re-checks them).
      locate: batch number -> a message naming the bad record of that batch (file, record, id, reason).
    """
    dataset: Any
    files: list[str]
    num_classes: int
    data_cfg: Any
    train: bool
    locate: Optional[Callable[[int], str]] = None


def build_train_dataset(data_cfg, *, local_batch: int, seed: int, start_step: int, process_index: int = 0,
                        process_count: int = 1):
    """The host's infinite tf.data stream of raw batches, positioned at ``start_step``.

    Returns (RawBatches, info). Raw batches hold the example fields plus ``bad`` (skipped record), ``file``
    (index into the host's file list ``RawBatches.files``) and ``record`` (record number in that file);
    ``HostBatches`` turns them into model batches.
    """
    tf = import_tf()
    root, split = data_cfg.root, data_cfg.train_split
    info = schema.read_info(root)
    num_classes = len(info["class_names"])
    streams = num_streams_of(data_cfg, process_count)
    per_process = streams // process_count
    if local_batch % per_process:
        raise ValueError(f"the local batch {local_batch} does not split over {per_process} data streams per process")
    stream_batch = local_batch // per_process
    skip_bad = bool(data_cfg.get("skip_bad_records", False))
    parse = _parse_fn(tf, data_cfg, num_classes, train=True, seed=seed)
    host_file_list: list[str] = []
    raws, batched = [], []
    for s in range(process_index * per_process, (process_index + 1) * per_process):
        files, counts = host_files(info, root, split, s, streams)
        if sum(counts) < stream_batch:
            raise ValueError(f"split {split!r} has {sum(counts)} examples in data stream {s}, fewer than one batch "
                             f"({stream_batch})")
        raw = _stream_raw(tf, files, counts, seed=seed, skip=start_step * stream_batch,
                          shuffle_buffer=data_cfg.shuffle_buffer, pad_truncated=skip_bad)
        offset = len(host_file_list)
        host_file_list += files
        raw = raw.map(lambda rec, epoch, o=offset: ((rec[0], rec[1] + o, rec[2]), epoch))
        raws.append(raw)
        batched.append(_map_records(tf, raw, parse, data_cfg, num_classes, skip_bad=skip_bad)
                       .batch(stream_batch, drop_remainder=True))
    if len(batched) == 1:
        ds = batched[0]
    else:
        ds = tf.data.Dataset.zip(tuple(batched)).map(
            lambda *bs: {k: tf.concat([b[k] for b in bs], axis=0) for k in bs[0]})
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = max(2, os.cpu_count() or 2)
    ds = ds.with_options(options).prefetch(AUTOTUNE)

    def locate(batch_number: int) -> str:
        windows = [r.skip(batch_number * stream_batch).take(stream_batch) for r in raws]
        return locate_bad_record(host_file_list, num_classes, data_cfg, train=True, windows=windows)

    return RawBatches(ds, host_file_list, num_classes, data_cfg, train=True, locate=locate), info


def build_eval_dataset(data_cfg, split: str, *, local_batch: int, process_index: int = 0, process_count: int = 1):
    """One pass over ``split`` for this host, padded so every host yields the same number of batches.

    Returns (RawBatches whose batches carry a ``valid`` mask, info, num_batches).
    """
    tf = import_tf()
    root = data_cfg.root
    info = schema.read_info(root)
    num_classes = len(info["class_names"])
    shards = info["splits"].get(split, {}).get("shards", [])
    files, counts = host_files(info, root, split, process_index, process_count)
    per_host = [sum(int(s["num_examples"]) for s in shards[p::process_count]) for p in range(process_count)]
    num_batches = max(-(-n // local_batch) for n in per_host)
    skip_bad = bool(data_cfg.get("skip_bad_records", False))
    parse = _parse_fn(tf, data_cfg, num_classes, train=False, seed=0)
    files_t, counts_t = tf.constant(files), tf.constant(counts, tf.int64)
    raw = tf.data.Dataset.range(len(files)).flat_map(
        lambda i: _records(tf, files_t, counts_t, tf.cast(i, tf.int32), pad_truncated=skip_bad))
    ds = _map_records(tf, raw.map(lambda *r: (r, tf.constant(0, tf.int64))), parse, data_cfg, num_classes,
                      skip_bad=skip_bad)
    ds = ds.map(lambda ex: dict(ex, valid=tf.logical_not(ex["bad"])))
    pad = num_batches * local_batch - sum(counts)
    dummy = dict(_placeholder(tf, data_cfg, num_classes), bad=tf.constant(False), valid=tf.constant(False),
                 file=tf.constant(-1, tf.int32), record=tf.constant(-1, tf.int32))
    ds = ds.concatenate(tf.data.Dataset.from_tensors(dummy).repeat(pad))
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(AUTOTUNE)

    def locate(batch_number: int) -> str:
        window = raw.skip(batch_number * local_batch).take(local_batch)
        return locate_bad_record(files, num_classes, data_cfg, train=False, windows=[window])

    return RawBatches(ds, files, num_classes, data_cfg, train=False, locate=locate), info, num_batches


def make_train_iter(config, tokenizer, *, start_step: int, process_index: int = 0, process_count: int = 1):
    """Host-local training batches from ``start_step`` on (an infinite iterator)."""
    local_batch = config.train.batch_size // process_count
    raw, _ = build_train_dataset(config.data, local_batch=local_batch, seed=config.seed, start_step=start_step,
                                process_index=process_index, process_count=process_count)
    return HostBatches(raw, tokenizer, config.data.max_text_len,
                       f"split {config.data.train_split!r} of {config.data.root!r}")


