"""The tf.data pipeline: exact resume, determinism, per-host sharding, eval padding, tokenizer word ids."""
import numpy as np
import pytest

from medvlp_jax import config_lib
from medvlp_jax.data import pipeline, tokenizer as tokenizer_lib
from medvlp_jax.data.sources import synthetic


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    synthetic.prepare_synthetic(root, num_train=40, num_test=13, num_shards=4)
    return root


def _config(root):
    c = config_lib.base("test")
    c.data.root, c.data.tokenizer_dir = root, f"{root}/tokenizer"
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_resume_reproduces_the_uninterrupted_batches(data_root):
    c = _config(data_root)
    tok = tokenizer_lib.load_tokenizer(c.data.tokenizer_dir)
    full = _take(pipeline.make_train_iter(c, tok, start_step=0), 14)      # 14 * 8 = 112 examples: ~3 epochs
    for start in (5, 9):
        resumed = _take(pipeline.make_train_iter(c, tok, start_step=start), 14 - start)
        for a, b in zip(full[start:], resumed):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} differs after resuming at {start}")


def test_epochs_cover_every_example_once_and_reshuffle(data_root):
    c = _config(data_root)
    c.train.batch_size = 10
    tok = tokenizer_lib.load_tokenizer(c.data.tokenizer_dir)
    batches = _take(pipeline.make_train_iter(c, tok, start_step=0), 8)     # 2 epochs of 40
    e0 = np.concatenate([b["index"] for b in batches[:4]])
    e1 = np.concatenate([b["index"] for b in batches[4:]])
    assert sorted(e0) == list(range(40)) and sorted(e1) == list(range(40))
    assert not np.array_equal(e0, e1)
    # Augmentation differs between epochs for the same example (seeded by epoch and index).
    i = int(e0[0])
    img0 = np.concatenate([b["image"] for b in batches[:4]])[0]
    img1 = np.concatenate([b["image"] for b in batches[4:]])[list(e1).index(i)]
    assert not np.array_equal(img0, img1)


def test_hosts_read_disjoint_files_covering_the_split(data_root):
    c = _config(data_root)
    c.train.batch_size = 8
    tok = tokenizer_lib.load_tokenizer(c.data.tokenizer_dir)
    seen = []
    for pi in range(2):
        it = pipeline.make_train_iter(c, tok, start_step=0, process_index=pi, process_count=2)
        seen.append(set(np.concatenate([b["index"] for b in _take(it, 5)])))   # 5 * 4 = 20 = this host's half
    assert not (seen[0] & seen[1])
    assert seen[0] | seen[1] == set(range(40))


def test_eval_dataset_is_padded_with_invalid_rows(data_root):
    c = _config(data_root)
    raw, info, num_batches = pipeline.build_eval_dataset(c.data, "test", local_batch=5)
    batches = list(raw.dataset.as_numpy_iterator())
    assert num_batches == len(batches) == 3
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == 13 and not valid[13:].any()
    idx = np.concatenate([b["index"] for b in batches])[valid]
    assert sorted(idx) == list(range(13))


def test_images_are_normalised_and_cropped(data_root):
    c = _config(data_root)
    tok = tokenizer_lib.load_tokenizer(c.data.tokenizer_dir)
    b = next(pipeline.make_train_iter(c, tok, start_step=0))
    assert b["image"].shape == (8, c.data.crop, c.data.crop, 1)
    assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0


def test_word_ids_merge_word_pieces():
    tokens = ["[CLS]", "mild", "cardio", "##megaly", "seen", "[SEP]", "[PAD]", "[PAD]"]
    got = tokenizer_lib.word_ids_from_tokens(tokens, {"[CLS]", "[SEP]", "[PAD]"})
    np.testing.assert_array_equal(got, [0, 1, 2, 2, 3, 4, -1, -1])


def test_missing_split_and_missing_data_are_clear_errors(data_root, tmp_path):
    c = _config(data_root)
    c.data.train_split = "nope"
    with pytest.raises(ValueError, match="has no split 'nope'"):
        pipeline.build_train_dataset(c.data, local_batch=4, seed=0, start_step=0)
    c.data.root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no prepared data set"):
        pipeline.build_train_dataset(c.data, local_batch=4, seed=0, start_step=0)
