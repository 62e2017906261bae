"""Bad input through the real pipeline: each defect is a clear error naming file + record, or a counted skip.

Each case rewrites one record (or file) of a small synthetic data set, then reads it with
``pipeline.make_train_iter`` (and the eval pipeline for one case): by default the error names the shard file,
the record number inside it and the problem; with ``config.data.skip_bad_records=True`` the record becomes a
``valid=False`` row (index -1), is counted in ``HostBatches.num_skipped``, and every other record still
arrives exactly once per epoch.
"""
import os
import pickle
import shutil
import sys

import numpy as np
import pytest
import tensorflow as tf

from medvlp_jax import config_lib
from medvlp_jax.data import pipeline, tokenizer as tokenizer_lib
from medvlp_jax.data.bad_records import check_record
from medvlp_jax.data.host_batches import HostBatches
from medvlp_jax.errors import BadRecordError
from medvlp_jax.data.sources import synthetic

NUM_TRAIN, NUM_SHARDS = 16, 2          # 8 records per shard; record k of shard s is example k * 2 + s


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clean"))
    synthetic.prepare_synthetic(root, num_train=NUM_TRAIN, num_test=8, num_shards=NUM_SHARDS)
    return root


@pytest.fixture(scope="module")
def tok(clean_root):
    return tokenizer_lib.load_tokenizer(os.path.join(clean_root, "tokenizer"))


def _config(root, skip=False):
    c = config_lib.base("test")
    c.data.root, c.data.tokenizer_dir = root, os.path.join(root, "tokenizer")
    c.data.skip_bad_records = skip
    return c


def _records(path):
    return list(tf.data.TFRecordDataset(path).as_numpy_iterator())


def _write(path, records):
    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)


def _png(array):
    return tf.io.encode_png(np.asarray(array, np.uint8)).numpy()


def _edit(record: bytes, **fields) -> bytes:
    """Replaces (value) or deletes (None) features of a serialised tf.train.Example."""
    ex = tf.train.Example.FromString(record)
    for k, v in fields.items():
        if v is None:
            del ex.features.feature[k]
        else:
            ex.features.feature[k].CopyFrom(tf.train.Feature(bytes_list=tf.train.BytesList(value=[v])))
    return ex.SerializeToString()


def _other_schema(i: int) -> bytes:
    feats = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_png(np.zeros((8, 8, 1)))])),
             "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[i]))}
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


# name -> (shard, record, how to corrupt the record, expected message fragment)
RECORD_CASES = {
    "corrupt_image": (1, 3, lambda r: _edit(r, image=_png(np.full((40, 40, 1), 90))[:60]), "image cannot be decoded"),
    "not_an_image": (0, 2, lambda r: _edit(r, image=b"GIF89a" + b"\0" * 64), "neither PNG nor JPEG"),
    "empty_report": (0, 5, lambda r: _edit(r, report=b"   "), "report is empty"),
    "non_utf8_report": (1, 0, lambda r: _edit(r, report=b"small effusion \xff\xfe seen"), "not valid UTF-8"),
    "missing_field": (0, 7, lambda r: _edit(r, report=None), "missing field(s) ['report']"),
    "rgba_image": (1, 6, lambda r: _edit(r, image=_png(np.full((40, 40, 4), 200))), "4 channels"),
    "degenerate_shape": (0, 1, lambda r: _edit(r, image=_png(np.full((1, 400, 1), 200))), "degenerate"),
    "not_an_example": (1, 4, lambda r: b"\x08\x96\x01garbage that is not a protobuf", "not a tf.train.Example"),
}


def _corrupt(clean_root, tmp_path, shard, record, fn):
    root = str(tmp_path / "data")
    shutil.copytree(clean_root, root)
    path = os.path.join(root, f"train-{shard:05d}-of-{NUM_SHARDS:05d}.tfrecord")
    recs = _records(path)
    recs[record] = fn(recs[record])
    _write(path, recs)
    return root, path


def _epochs(it, n_batches):
    return [next(it) for _ in range(n_batches)]


@pytest.mark.parametrize("case", sorted(RECORD_CASES))
def test_bad_record_error_names_file_record_and_problem(clean_root, tok, tmp_path, case):
    shard, record, fn, fragment = RECORD_CASES[case]
    root, path = _corrupt(clean_root, tmp_path, shard, record, fn)
    it = pipeline.make_train_iter(_config(root), tok, start_step=0)
    with pytest.raises(BadRecordError) as e:
        _epochs(it, 2 * NUM_TRAIN // 8)          # two epochs: the bad record is certainly reached
    msg = str(e.value)
    assert f"{path}: record {record}" in msg, msg
    assert fragment in msg, msg
    assert "skip_bad_records=True" in msg
    if case not in ("not_an_example",):
        assert f"index {record * NUM_SHARDS + shard}" in msg, msg


@pytest.mark.parametrize("case", ["corrupt_image", "empty_report", "missing_field", "rgba_image", "not_an_example"])
def test_skip_bad_records_counts_and_keeps_the_rest(clean_root, tok, tmp_path, case, caplog):
    shard, record, fn, fragment = RECORD_CASES[case]
    root, path = _corrupt(clean_root, tmp_path, shard, record, fn)
    it = pipeline.make_train_iter(_config(root, skip=True), tok, start_step=0)
    with caplog.at_level("WARNING", logger="medvlp_jax"):
        batches = _epochs(it, 2 * NUM_TRAIN // 8)   # 2 epochs
    bad_index = record * NUM_SHARDS + shard
    for epoch in (batches[:2], batches[2:]):
        idx = np.concatenate([b["index"] for b in epoch])
        valid = np.concatenate([b["valid"] for b in epoch])
        assert sorted(idx[valid]) == sorted(set(range(NUM_TRAIN)) - {bad_index})
        assert (~valid).sum() == 1 and idx[~valid].tolist() == [-1]
        # the skipped row is blank: no image, no text beyond [CLS] [SEP]
        row = np.flatnonzero(~np.concatenate([b["valid"] for b in epoch]))[0]
        img = np.concatenate([b["image"] for b in epoch])[row]
        assert np.all(img == 0)
    assert it.num_skipped == 2
    assert any(f"{path}: record {record}" in m and fragment in m for m in caplog.messages), caplog.messages


def test_skipping_keeps_the_data_order_of_good_records(clean_root, tok, tmp_path):
    shard, record, fn, _ = RECORD_CASES["corrupt_image"]
    root, _ = _corrupt(clean_root, tmp_path, shard, record, fn)
    clean = _epochs(pipeline.make_train_iter(_config(clean_root), tok, start_step=0), 4)
    skipped = _epochs(pipeline.make_train_iter(_config(root, skip=True), tok, start_step=0), 4)
    bad_index = record * NUM_SHARDS + shard
    for a, b in zip(clean, skipped):
        keep = a["index"] != bad_index
        np.testing.assert_array_equal(b["index"][keep], a["index"][keep])
        np.testing.assert_array_equal(b["image"][keep], a["image"][keep])
        assert np.all(b["index"][~keep] == -1)
    # Resume with bad records still reproduces the uninterrupted batches (row positions never shift).
    resumed = _epochs(pipeline.make_train_iter(_config(root, skip=True), tok, start_step=1), 3)
    for a, b in zip(skipped[1:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_shard_of_another_schema(clean_root, tok, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(clean_root, root)
    path = os.path.join(root, f"train-00001-of-{NUM_SHARDS:05d}.tfrecord")
    _write(path, [_other_schema(i) for i in range(len(_records(path)))])
    with pytest.raises(BadRecordError, match=r"train-00001-of-00002.tfrecord: record \d+.*missing field"
                       r".*image/encoded.*another schema"):
        _epochs(pipeline.make_train_iter(_config(root), tok, start_step=0), 2)
    it = pipeline.make_train_iter(_config(root, skip=True), tok, start_step=0)
    batches = _epochs(it, 2)
    valid = np.concatenate([b["valid"] for b in batches])
    idx = np.concatenate([b["index"] for b in batches])
    assert sorted(idx[valid]) == list(range(0, NUM_TRAIN, 2))      # shard 0 holds the even examples
    assert it.num_skipped == NUM_TRAIN // 2


def test_truncated_shard(clean_root, tok, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(clean_root, root)
    path = os.path.join(root, f"train-00000-of-{NUM_SHARDS:05d}.tfrecord")
    data = open(path, "rb").read()
    lengths = [len(r) + 16 for r in _records(path)]         # TFRecord framing: 8 length + 4 + data + 4 bytes
    with open(path, "wb") as f:
        f.write(data[:sum(lengths[:5]) + 30])               # 5 whole records, then part of the 6th
    with pytest.raises(BadRecordError, match=rf"{path}: record 5: the file is truncated"):
        _epochs(pipeline.make_train_iter(_config(root), tok, start_step=0), 2)
    it = pipeline.make_train_iter(_config(root, skip=True), tok, start_step=0)
    batches = _epochs(it, 4)
    for epoch in (batches[:2], batches[2:]):
        valid = np.concatenate([b["valid"] for b in epoch])
        idx = np.concatenate([b["index"] for b in epoch])
        lost = {k * NUM_SHARDS for k in range(5, 8)}         # records 5..7 of shard 0
        assert sorted(idx[valid]) == sorted(set(range(NUM_TRAIN)) - lost)
        assert (~valid).sum() == 3
    assert it.num_skipped == 6


def test_eval_split_bad_record(clean_root, tok, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(clean_root, root)
    path = os.path.join(root, f"test-00001-of-{NUM_SHARDS:05d}.tfrecord")
    recs = _records(path)
    recs[2] = _edit(recs[2], image=b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    recs[3] = _edit(recs[3], report=b"")                     # empty reports are fine in evaluation splits
    _write(path, recs)
    c = _config(root)
    raw, _, _ = pipeline.build_eval_dataset(c.data, "test", local_batch=4)
    with pytest.raises(BadRecordError, match=rf"{path}: record 2 .*image"):
        list(HostBatches(raw, tok, c.data.max_text_len, "test split"))
    c = _config(root, skip=True)
    raw, _, n = pipeline.build_eval_dataset(c.data, "test", local_batch=4)
    host = HostBatches(raw, tok, c.data.max_text_len, "test split")
    batches = list(host)
    valid = np.concatenate([b["valid"] for b in batches])
    assert len(batches) == n and valid.sum() == 7 and host.num_skipped == 1


def test_valid_data_passes_the_checks(clean_root):
    """The checks accept what the converters write: gray and RGB PNG/JPEG of any reasonable shape."""
    c = _config(clean_root)
    for img in (_png(np.zeros((30, 50, 1))), _png(np.zeros((50, 30, 3))),
                tf.io.encode_jpeg(np.zeros((20, 20, 3), np.uint8)).numpy(),
                tf.io.encode_jpeg(np.zeros((64, 20, 1), np.uint8)).numpy(),
                tf.io.encode_png(np.zeros((16, 16, 1), np.uint16)).numpy()):
        rec = _edit(_records(os.path.join(clean_root, "train-00000-of-00002.tfrecord"))[0], image=img)
        assert check_record(rec, 4, c.data, train=True) is None


# ------------------------------------------------------------------------------------------------------------
# Weights: a pickle is never unpickled (only torch.load(weights_only=True), and only when torch is installed).

class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _malicious_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    marker = str(tmp_path / "pwned")
    (ckpt / "config.json").write_text('{"model_type": "bert"}')
    with open(ckpt / "pytorch_model.bin", "wb") as f:
        pickle.dump({"embeddings.word_embeddings.weight": _Exploit(marker)}, f)
    return str(ckpt), marker


def test_pickle_checkpoint_is_refused_without_torch(tmp_path, monkeypatch):
    from medvlp_jax.models import hf_import
    ckpt, marker = _malicious_checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)          # "torch is not installed"
    with pytest.raises(ImportError, match="pickle"):
        hf_import.load_state_dict(ckpt)
    assert not os.path.exists(marker)


def test_pickle_checkpoint_with_code_is_refused_by_weights_only(tmp_path):
    pytest.importorskip("torch")
    from medvlp_jax.models import hf_import
    ckpt, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global|unpickl"):
        hf_import.load_state_dict(ckpt)
    assert not os.path.exists(marker)
    # Control: the file really executes code when unpickled without the guard.
    with open(os.path.join(ckpt, "pytorch_model.bin"), "rb") as f:
        pickle.load(f)
    assert os.path.isdir(marker)
