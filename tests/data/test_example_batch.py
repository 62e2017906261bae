"""data.example_batch: the pipeline's keys, shapes and slot conventions without data."""
import numpy as np
import pytest

from medvlp_jax.data import example_batch as eb, tokenizer as tokenizer_lib


def _tokens(ids, mask):
    names = {0: "[PAD]", 2: "[CLS]", 3: "[SEP]"}
    return [names.get(int(i), "w") if m else "[PAD]" for i, m in zip(ids, mask)]


@pytest.mark.parametrize("seed,words", [(None, None), (None, 1), (0, None), (7, None)])
def test_slots_follow_the_tokenizer_rule(seed, words):
    b = eb.example_batch(4, image_size=16, channels=1, text_len=12, vocab_size=50, seed=seed, words=words)
    assert b["image"].shape == (4, 16, 16, 1) and b["image"].dtype == np.float32
    assert {k: v.shape for k, v in b.items() if k != "image"} == {
        "input_ids": (4, 12), "attention_mask": (4, 12), "word_ids": (4, 12), "labels": (4, 1), "index": (4,),
        "valid": (4,)}
    for ids, mask, wid in zip(b["input_ids"], b["attention_mask"], b["word_ids"]):
        n = int(mask.sum())
        assert ids[0] == eb.CLS_ID and ids[n - 1] == eb.SEP_ID and np.all(mask[:n] == 1) and np.all(mask[n:] == 0)
        assert np.all((ids[1:n - 1] >= eb.FIRST_WORD_ID) & (ids[1:n - 1] < 50))
        np.testing.assert_array_equal(wid, tokenizer_lib.word_ids_from_tokens(_tokens(ids, mask)))
    if seed is None:
        assert not b["image"].any() and int(b["attention_mask"][0].sum()) == (3 if words == 1 else 12)


def test_seeded_batches_repeat_and_differ_by_seed():
    kw = dict(image_size=8, channels=3, text_len=10, vocab_size=30)
    a, a2, c = eb.example_batch(3, seed=1, **kw), eb.example_batch(3, seed=1, **kw), eb.example_batch(3, seed=2, **kw)
    assert all(np.array_equal(a[k], a2[k]) for k in a)
    assert not np.array_equal(a["image"], c["image"])
    with pytest.raises(ValueError, match="vocab_size"):
        eb.example_batch(2, image_size=8, channels=1, text_len=6, seed=0)
