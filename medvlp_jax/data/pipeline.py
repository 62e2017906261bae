"""tf.data input pipeline: TFRecord shards -> host-local numpy batches, resumable at any step.

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

import logging
import os
import queue
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from medvlp_jax.data import schema, tokenizer as tokenizer_lib
from medvlp_jax.errors import BadRecordError  # noqa: F401  (re-exported; defined in the bottom layer)

AUTOTUNE = -1
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# PNG IHDR colour type -> channels (0 grey, 2 RGB, 3 palette (RGB), 4 grey+alpha, 6 RGBA; others invalid).
_PNG_CHANNELS = (1, -1, 3, 3, 2, -1, 4)
ALLOWED_CHANNELS = (1, 3)          # the schema: grayscale or RGB
MAX_LOGGED_SKIPS = 10

log = logging.getLogger("medvlp_jax")


def _tf():
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")   # TF must not take accelerator memory from JAX
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


def image_header(tf, image_bytes):
    """[height, width, channels] int32 read from a PNG/JPEG header (no decoding); raises on anything else."""
    is_png = tf.equal(tf.strings.substr(image_bytes, 0, 8), PNG_MAGIC)
    is_jpeg = tf.io.is_jpeg(image_bytes)
    ok = tf.debugging.Assert(is_png | is_jpeg, ["image is neither PNG nor JPEG"])

    def png():
        head = tf.cast(tf.io.decode_raw(tf.strings.substr(image_bytes, 16, 10), tf.uint8), tf.int32)
        tf.debugging.assert_equal(tf.size(head), 10, message="PNG header is truncated")
        w = head[0] * 2 ** 24 + head[1] * 2 ** 16 + head[2] * 2 ** 8 + head[3]
        h = head[4] * 2 ** 24 + head[5] * 2 ** 16 + head[6] * 2 ** 8 + head[7]
        color = tf.minimum(head[9], len(_PNG_CHANNELS) - 1)
        return tf.stack([h, w, tf.gather(tf.constant(_PNG_CHANNELS), color)])

    with tf.control_dependencies([ok]):
        return tf.cond(is_png, png, lambda: tf.io.extract_jpeg_shape(image_bytes))


def check_image_shape(tf, hwc, resize: int):
    """Assertions (ops) that an image of header shape ``hwc`` has 1 or 3 channels and survives the resize."""
    h, w, c = hwc[0], hwc[1], hwc[2]
    channels_ok = tf.reduce_any(tf.equal(c, tf.constant(ALLOWED_CHANNELS)))
    short_side = tf.round(tf.cast(tf.minimum(h, w), tf.float32) * resize / tf.cast(tf.maximum(tf.maximum(h, w), 1),
                                                                                   tf.float32))
    return [tf.debugging.Assert(channels_ok, ["image has", c, "channels; the schema allows 1 (grayscale) or 3 (RGB)"]),
            tf.debugging.Assert((h >= 1) & (w >= 1) & (short_side >= 1),
                                ["image of shape", h, "x", w, f"is degenerate (its short side vanishes when the long "
                                 f"side is resized to {resize})"])]


def check_report(tf, report, *, require_text: bool):
    """Assertions that ``report`` is valid UTF-8 and (``require_text``) not empty or blank."""
    checks = [tf.debugging.Assert(tf.size(tf.strings.unicode_decode(report, "UTF-8", errors="strict")) >= 0,
                                  ["report is not valid UTF-8"])]
    if require_text:
        checks.append(tf.debugging.Assert(tf.strings.length(tf.strings.strip(report)) > 0, ["report is empty"]))
    return checks


def decode_image(tf, image_bytes, *, resize: int, crop: int, channels: int, train: bool, seed, random_flip: bool):
    """PNG/JPEG bytes -> [crop, crop, channels] float32 in [-1, 1].

    Resize so the longer side is ``resize`` (aspect kept), zero-pad to a square (MGCA), then random crop
    (train, stateless seed) or center crop (eval).
    """
    img = tf.io.decode_image(image_bytes, channels=1, expand_animations=False, dtype=tf.float32)
    shape = tf.cast(tf.shape(img)[:2], tf.float32)
    scale = resize / tf.reduce_max(shape)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    # An image stored at the training resolution (the converters' --image_size, 256 = the paper's data.resize)
    # needs no resampling: the area resize is then the identity, bit for bit, and was ~1/4 of the CPU time of
    # the whole pipeline (docs/benchmarks.md), so it is skipped.
    img = tf.cond(tf.reduce_all(tf.equal(new, tf.shape(img)[:2])), lambda: img,
                  lambda: tf.image.resize(img, new, method="area", antialias=True))
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
    """(record, epoch) -> example dict; raises (InvalidArgumentError) on a bad record."""
    spec = schema.feature_spec(num_classes)
    spec = {k: spec[k] for k in ("id", "index", "image", "report", "labels")}

    def parse(record, epoch):
        ex = tf.io.parse_single_example(record, spec)
        checks = check_image_shape(tf, image_header(tf, ex["image"]), data_cfg.resize)
        checks += check_report(tf, ex["report"], require_text=train)
        with tf.control_dependencies(checks):
            s = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64), ex["index"]])
            image = decode_image(tf, ex["image"], resize=data_cfg.resize, crop=data_cfg.crop,
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


def build_train_dataset(data_cfg, *, local_batch: int, seed: int, start_step: int, process_index: int = 0,
                        process_count: int = 1):
    """The host's infinite tf.data stream of raw batches, positioned at ``start_step``.

    Raw batches hold the example fields plus ``bad`` (skipped record), ``file`` (index into the host's file
    list ``ds.medvlp_files``) and ``record`` (record number in that file); ``HostBatches`` turns them into
    model batches. The returned dataset carries ``medvlp_locate(batch_number) -> message`` for error reports.
    """
    tf = _tf()
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

    _attach(ds, files=host_file_list, locate=locate, num_classes=num_classes, data_cfg=data_cfg, train=True)
    return ds, info


def _attach(ds, **attrs) -> None:
    for k, v in attrs.items():
        setattr(ds, f"medvlp_{k}", v)


def build_eval_dataset(data_cfg, split: str, *, local_batch: int, process_index: int = 0, process_count: int = 1):
    """One pass over ``split`` for this host, padded so every host yields the same number of batches.

    Returns (dataset of raw batches with a ``valid`` mask, info, num_batches).
    """
    tf = _tf()
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

    _attach(ds, files=files, locate=locate, num_classes=num_classes, data_cfg=data_cfg, train=False)
    return ds, info, num_batches


# ------------------------------------------------------------------------------------------------------------
# Finding and explaining bad records in Python (the error path; never on the hot path).

def _tf_message(e) -> str:
    """The informative part of a TF error: our assertion's text, or the op's message without decorations."""
    msg = getattr(e, "message", str(e)).strip()
    if "}}" in msg:                                   # drop the "{{function_node ...}}" prefix
        msg = msg.split("}}", 1)[1].strip()
    if "Summarized data:" in msg:                     # eager tf.debugging.Assert: one data item per line
        items = [p.strip() for p in msg.split("Summarized data:", 1)[1].strip().splitlines()]
        return " ".join(p[2:-1] if p[:2] in ("b'", 'b"') else p for p in items if p)
    if "assertion failed:" in msg:                    # graph tf.debugging.Assert: "[a] [b] ..."
        msg = msg.split("assertion failed:", 1)[1].strip()
        msg = msg.split("\n")[0].replace("] [", " ").strip("[] ")
    return msg.split("\n")[0].split(" [Op:")[0].strip()


def check_record(record: bytes, num_classes: int, data_cfg, *, train: bool) -> Optional[str]:
    """What is wrong with one serialised record, or None when the pipeline can use it."""
    import tensorflow as tf
    from google.protobuf.message import DecodeError
    try:
        ex = tf.train.Example.FromString(record)
    except DecodeError:
        return "not a tf.train.Example (a file of another format?)"
    feats = ex.features.feature
    kinds = {"id": "bytes_list", "index": "int64_list", "image": "bytes_list", "report": "bytes_list",
             "labels": "float_list"}
    missing = [k for k in kinds if k not in feats]
    if missing:
        return (f"missing field(s) {missing}; the record has {sorted(feats)[:12]} (a shard of another schema? "
                f"see medvlp_jax/data/schema.py)")
    for k, kind in kinds.items():
        if feats[k].WhichOneof("kind") != kind:
            return f"field {k!r} holds {feats[k].WhichOneof('kind')}, the schema says {kind}"
    values = {k: getattr(feats[k], kinds[k]).value for k in kinds}
    for k in ("id", "index", "image", "report"):
        if len(values[k]) != 1:
            return f"field {k!r} has {len(values[k])} values, expected 1"
    if len(values["labels"]) != num_classes:
        return f"labels has {len(values['labels'])} values but dataset_info.json lists {num_classes} classes"
    report = values["report"][0]
    try:
        text = report.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"report is not valid UTF-8 ({e.reason} at byte {e.start}: {report[max(0, e.start - 8):e.end + 8]!r})"
    if train and not text.strip():
        return "report is empty"
    image = tf.constant(values["image"][0])
    try:
        check_image_shape(tf, image_header(tf, image), data_cfg.resize)
    except tf.errors.OpError as e:
        return _tf_message(e)
    try:
        decode_image(tf, image, resize=data_cfg.resize, crop=data_cfg.crop, channels=data_cfg.channels,
                     train=False, seed=tf.constant([0, 0], tf.int64), random_flip=False)
    except tf.errors.OpError as e:
        return f"image cannot be decoded: {_tf_message(e)}"
    return None


def _describe(path: str, recno: int, record: bytes, reason: str) -> str:
    import tensorflow as tf
    ident = ""
    try:
        feats = tf.train.Example.FromString(record).features.feature
        if "id" in feats and feats["id"].bytes_list.value:
            ident = f" (id {feats['id'].bytes_list.value[0].decode('utf-8', 'replace')!r}"
            if "index" in feats and feats["index"].int64_list.value:
                ident += f", index {feats['index'].int64_list.value[0]}"
            ident += ")"
    except Exception:
        pass
    return f"{path}: record {recno}{ident}: {reason}"


def scan_files(files: Sequence[str], num_classes: int, data_cfg, *, train: bool, first_only: bool = True,
               counts: Optional[Sequence[int]] = None) -> list[str]:
    """Reads ``files`` record by record and describes each bad record (the first only, by default).

    counts: the expected number of records per file (dataset_info.json); a shorter file is reported.
    """
    import tensorflow as tf
    problems = []
    for fi, path in enumerate(files):
        n = 0                                         # records read so far = number of the next record
        try:
            for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
                reason = check_record(record, num_classes, data_cfg, train=train)
                if reason:
                    problems.append(_describe(path, n, record, reason))
                    if first_only:
                        return problems
                n += 1
        except tf.errors.DataLossError as e:
            problems.append(f"{path}: record {n}: the file is truncated or corrupt after {n} readable records "
                            f"({_tf_message(e)})")
            if first_only:
                return problems
            continue
        if counts is not None and n != counts[fi]:
            problems.append(f"{path}: has {n} records but dataset_info.json lists {counts[fi]}")
            if first_only:
                return problems
    return problems


def locate_bad_record(files: Sequence[str], num_classes: int, data_cfg, *, train: bool, windows=()) -> str:
    """Describes the bad record behind a tf.data error: first among ``windows`` (datasets of (record,
    file_idx, recno) or ((record, file_idx, recno), epoch) — the records of the batch that failed), else the
    first bad record of ``files`` in order."""
    import tensorflow as tf
    for window in windows:
        try:
            for item in window.as_numpy_iterator():
                rec = item[0] if len(item) == 2 else item
                record, fi, recno = rec
                reason = check_record(record, num_classes, data_cfg, train=train)
                if reason:
                    return _describe(files[int(fi)], int(recno), record, reason)
        except tf.errors.OpError:
            break                                     # e.g. the truncation itself: the file scan names it
    found = scan_files(files, num_classes, data_cfg, train=train)
    return found[0] if found else ""


# ------------------------------------------------------------------------------------------------------------
# Host batches.

class HostBatches:
    """Raw tf.data batches -> tokenised numpy batches (see module docstring for the keys).

    Attributes:
      num_skipped: bad records this iterator turned into ``valid=False`` rows so far (``skip_bad_records``);
        per host, counted from the iterator's start step. ``global_count`` sums it over processes.
      skipped: descriptions of the first ``MAX_LOGGED_SKIPS`` skipped records (file, record, reason).
    """

    def __init__(self, dataset, tokenizer, max_text_len: int, describe: str):
        self._it = dataset.as_numpy_iterator()
        self._ds = dataset
        self._tok = tokenizer
        self._max_len = max_text_len
        self._describe = describe
        self._batches = 0
        self.num_skipped = 0
        self.skipped: list[str] = []

    def __iter__(self):
        return self

    def _error(self, e) -> Exception:
        hint = "set config.data.skip_bad_records=True to skip such records (they are counted and logged)"
        locate = getattr(self._ds, "medvlp_locate", None)
        where = ""
        if locate is not None:
            try:
                where = locate(self._batches)
            except Exception as inner:  # the diagnosis must never hide the original error
                where = f"(could not locate the bad record: {type(inner).__name__}: {inner})"
        if where:
            return BadRecordError(f"bad record in {self._describe}: {where}; {hint}")
        return BadRecordError(f"input pipeline failed while reading {self._describe}: {_tf_message(e)}; {hint}")

    def _note_skips(self, raw) -> None:
        bad = np.asarray(raw.get("bad", np.zeros(0, bool)), bool)
        if not bad.any():
            return
        self.num_skipped += int(bad.sum())
        files = getattr(self._ds, "medvlp_files", None)
        for fi, recno in zip(raw["file"][bad], raw["record"][bad]):
            if len(self.skipped) >= MAX_LOGGED_SKIPS or files is None:
                break
            desc = self._explain(files, int(fi), int(recno))
            self.skipped.append(desc)
            log.warning("skipped bad record %s%s", desc, " (further skips are only counted)"
                        if len(self.skipped) == MAX_LOGGED_SKIPS else "")

    def _explain(self, files, fi: int, recno: int) -> str:
        import tensorflow as tf
        path = files[fi]
        if recno < 0:
            return f"{path}: a record missing from the end of the file (truncated?)"
        try:
            for n, record in enumerate(tf.data.TFRecordDataset(path).take(recno + 1).as_numpy_iterator()):
                if n == recno:
                    reason = check_record(record, self._ds.medvlp_num_classes, self._ds.medvlp_data_cfg,
                                          train=self._ds.medvlp_train)
                    return _describe(path, recno, record, reason or "rejected by the pipeline")
        except tf.errors.OpError as e:
            return f"{path}: record {recno}: {_tf_message(e)}"
        return f"{path}: record {recno}"

    def __next__(self) -> dict[str, np.ndarray]:
        import tensorflow as tf
        try:
            raw = next(self._it)
        except (tf.errors.OpError, UnicodeDecodeError) as e:   # TF cannot always decode its own message
            raise self._error(e) from None
        self._batches += 1
        self._note_skips(raw)
        texts = [r.decode("utf-8", errors="replace") for r in raw["report"]]
        tokens = tokenizer_lib.encode(self._tok, texts, self._max_len)
        valid = raw.get("valid")
        if valid is None:
            valid = np.logical_not(np.asarray(raw.get("bad", np.zeros(len(texts), bool)), bool))
        return {"image": raw["image"].astype(np.float32), **tokens, "labels": raw["labels"].astype(np.float32),
                "index": raw["index"].astype(np.int32), "valid": np.asarray(valid, bool)}


def global_count(count: int) -> int:
    """Sum of a per-host count over all processes (every process must call it at the same step)."""
    import jax
    if jax.process_count() == 1:
        return int(count)
    from jax.experimental import multihost_utils
    return int(np.sum(multihost_utils.process_allgather(np.asarray(count, np.int64))))


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

    def close(self, timeout: float = 30.0):
        """Stops the worker and waits for it, so that no thread is inside tf.data when the process exits
        (a daemon thread still running TF code during interpreter shutdown can abort the process)."""
        self._stop.set()
        while self._thread.is_alive():
            try:                                   # unblock a worker waiting to put, or one that just put
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
            timeout -= 0.1
            if timeout <= 0:
                break
