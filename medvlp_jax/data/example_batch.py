"""A batch with the pipeline's keys and shapes that needs no data: for tracing and initialising a model, and
for the benchmark's synthetic steps.

Keys and shapes (as ``data/pipeline.py``'s host batches): image [b, s, s, channels] float32, input_ids /
attention_mask / word_ids [b, l] int32 (``data/tokenizer.py``'s slots: [CLS] -> 0, the k-th word -> k, [SEP]
-> n_words + 1, padding -> -1), labels [b, 1] float32, index [b] int32, valid [b] bool.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

CLS_ID, SEP_ID, FIRST_WORD_ID = 2, 3, 5     # the special tokens' ids in data/tokenizer.SPECIAL_TOKENS order


def example_batch(batch_size: int, *, image_size: int, channels: int, text_len: int,
                  vocab_size: Optional[int] = None, seed: Optional[int] = None,
                  words: Optional[int] = None) -> dict[str, np.ndarray]:
    """One host batch.

    Args:
      batch_size, image_size, channels, text_len: the shapes.
      seed: None gives zero images and every report ``[CLS] w ... w [SEP]`` with ``words`` words (default: as
        many as fit) of id 5; an int gives random images (standard normal) and random reports filling half
        to all of the text length, with word ids drawn from [5, vocab_size).
      vocab_size: needed with ``seed``.
      words: words per report when ``seed`` is None (at most text_len - 2).
    """
    t, b = text_len, batch_size
    if seed is not None and vocab_size is None:
        raise ValueError("example_batch: random reports (seed given) need vocab_size")
    rng = None if seed is None else np.random.default_rng(seed)
    ids = np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.int32)
    word_ids = np.full((b, t), -1, np.int32)
    for i in range(b):
        if rng is None:
            n = t - 2 if words is None else min(words, t - 2)
            ids[i, 1:n + 1] = FIRST_WORD_ID
        else:
            n = max(1, min(t - 2, int(rng.integers(t // 2, t - 1))))
            ids[i, 1:n + 1] = rng.integers(FIRST_WORD_ID, vocab_size, n)
        ids[i, 0], ids[i, n + 1] = CLS_ID, SEP_ID
        mask[i, :n + 2] = 1
        word_ids[i, :n + 2] = np.arange(n + 2)
    if rng is None:
        image = np.zeros((b, image_size, image_size, channels), np.float32)
    else:
        image = rng.standard_normal((b, image_size, image_size, channels)).astype(np.float32)
    return {"image": image, "input_ids": ids, "attention_mask": mask, "word_ids": word_ids,
            "labels": np.zeros((b, 1), np.float32), "index": np.arange(b, dtype=np.int32),
            "valid": np.ones((b,), bool)}


def example_batch_for(config, batch_size: int, *, seed: Optional[int] = None,
                      words: Optional[int] = None) -> dict[str, np.ndarray]:
    """``example_batch`` with the shapes of ``config`` (data.crop, data.channels, data.max_text_len,
    model.text.vocab_size)."""
    return example_batch(batch_size, image_size=config.data.crop, channels=config.data.channels,
                         text_len=config.data.max_text_len, vocab_size=config.model.text.vocab_size, seed=seed,
                         words=words)
