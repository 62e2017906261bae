"""Finding and explaining bad records in Python: the error path of the input pipeline, never the hot path.

``check_record`` says what is wrong with one serialised record (or None); ``scan_files`` reads files record by
record; ``locate_bad_record`` names the record behind a tf.data error (file, record number, example id, reason).
"""
from __future__ import annotations

from typing import Optional, Sequence

from medvlp_jax.data import decode


def tf_message(e) -> str:
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
        decode.check_image_shape(tf, decode.image_header(tf, image), data_cfg.resize)
    except tf.errors.OpError as e:
        return tf_message(e)
    try:
        decode.decode_image(tf, image, resize=data_cfg.resize, crop=data_cfg.crop, channels=data_cfg.channels,
                     train=False, seed=tf.constant([0, 0], tf.int64), random_flip=False)
    except tf.errors.OpError as e:
        return f"image cannot be decoded: {tf_message(e)}"
    return None


def describe(path: str, recno: int, record: bytes, reason: str) -> str:
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
                    problems.append(describe(path, n, record, reason))
                    if first_only:
                        return problems
                n += 1
        except tf.errors.DataLossError as e:
            problems.append(f"{path}: record {n}: the file is truncated or corrupt after {n} readable records "
                            f"({tf_message(e)})")
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
                    return describe(files[int(fi)], int(recno), record, reason)
        except tf.errors.OpError:
            break                                     # e.g. the truncation itself: the file scan names it
    found = scan_files(files, num_classes, data_cfg, train=train)
    return found[0] if found else ""
