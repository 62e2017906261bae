"""Tokenizers: a Hugging Face tokenizer from a local directory, and the demo's WordPiece vocabulary.

``encode`` produces everything the text tower needs, including ``word_ids`` for word-piece merging
(methods.md 1.4): [CLS] -> slot 0, the pieces of the k-th word -> slot k, [SEP] -> slot n_words + 1,
padding -> -1. A "word" starts at every token that does not begin with "##" (MGCA/GLoRIA's rule), special
tokens inside the text included: an ``[UNK]`` is an ordinary one-piece word with its own slot, exactly as
in both authors' ``aggregate_tokens`` (methods.md 1.4; before issue 13 it had no slot and the later words
moved left).

``bracket_words`` marks the words that GLoRIA's ``cap_lens`` does not count (methods.md 3.2, "Words
used"): the first token of every word slot (between [CLS] and [SEP]) whose string starts with "[" -- an
[UNK] (or [MASK], or a literal "[" when the text keeps punctuation). The GLoRIA objective reads it; the
encoder does not.
"""
from __future__ import annotations

import os
from typing import Iterable

import numpy as np

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def load_tokenizer(path: str):
    """A fast tokenizer from a local HF directory (vocab.txt or tokenizer.json). Never touches the network."""
    from transformers import AutoTokenizer, BertTokenizerFast
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True)
    except (OSError, ValueError):
        vocab = os.path.join(path, "vocab.txt")
        if not os.path.exists(vocab):
            raise FileNotFoundError(f"{path!r} has neither a tokenizer config nor vocab.txt") from None
        tok = BertTokenizerFast(vocab_file=vocab, do_lower_case=True)
    if not tok.is_fast:
        raise ValueError(f"tokenizer at {path!r} is not a fast tokenizer (word ids are needed)")
    return tok


def train_wordpiece(texts: Iterable[str], out_dir: str, *, vocab_size: int = 3000) -> str:
    """Trains a lower-cased BERT WordPiece vocabulary on ``texts``; saves an HF tokenizer dir."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2)
    tok.train_from_iterator(list(texts), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "vocab.txt"), "w") as f:   # also readable as a plain BERT vocab
        vocab = tok.get_vocab()
        f.writelines(t + "\n" for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]))
    return out_dir


def word_ids_from_tokens(tokens: list[str], special: set[str] = frozenset(), *,
                         skip_special: bool = False) -> np.ndarray:
    """Slot per token after merging word pieces (see module docstring).

    Args:
      tokens: padded token strings with normalised special names ([CLS], [SEP], [PAD], [UNK]).
      special: the vocabulary's special tokens; used only with ``skip_special``.
      skip_special: True gives special tokens other than [CLS]/[SEP] no slot (the rule before issue 13,
        kept to compare against); False (default) treats them as ordinary words, as the authors' code.

    Returns:
      [len(tokens)] int32; -1 for padding and for everything after the first [SEP].
    """
    out = np.full((len(tokens),), -1, np.int32)
    slot = 0
    for i, t in enumerate(tokens):
        if t == "[PAD]" or (skip_special and t in special and t not in ("[CLS]", "[SEP]")):
            continue
        if t == "[CLS]":
            out[i] = 0
            continue
        if t == "[SEP]":
            slot += 1
            out[i] = slot
            break
        if not t.startswith("##") or slot == 0:
            slot += 1
        out[i] = slot
    return out


def bracket_words_from_tokens(tokens: list[str], word_ids: np.ndarray) -> np.ndarray:
    """1 on the first token of every word slot between [CLS] and [SEP] whose string starts with "[".

    Args:
      tokens: token strings (normalised special names); word_ids: their slots (``word_ids_from_tokens``).

    Returns:
      [len(tokens)] int32 (GLoRIA's uncounted words, methods.md 3.2; 0 for [CLS], [SEP] and padding).
    """
    word_ids = np.asarray(word_ids)
    last = word_ids.max(initial=-1)                              # [SEP]'s slot
    prev = np.concatenate([[-2], word_ids[:-1]])
    first = (word_ids != prev) & (word_ids >= 1) & (word_ids < last)
    starts = np.array([t.startswith("[") for t in tokens], bool)
    return (first & starts).astype(np.int32)


def encode(tokenizer, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    """Tokenises a batch.

    Returns:
      input_ids, attention_mask, word_ids, bracket_words: [b, max_len] int32 each (module docstring).
    """
    enc = tokenizer(list(texts), max_length=max_len, padding="max_length", truncation=True,
                    return_attention_mask=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    # Normalise special names so the merge rule works for any BERT-family vocabulary.
    rename = {tokenizer.cls_token: "[CLS]", tokenizer.sep_token: "[SEP]", tokenizer.pad_token: "[PAD]"}
    if tokenizer.unk_token is not None:
        rename[tokenizer.unk_token] = "[UNK]"
    rows = [[rename.get(t, t) for t in tokenizer.convert_ids_to_tokens(row)] for row in ids]
    word_ids = np.stack([word_ids_from_tokens(toks) for toks in rows])
    word_ids = np.where(mask > 0, word_ids, -1).astype(np.int32)
    bracket = np.stack([bracket_words_from_tokens(toks, w) for toks, w in zip(rows, word_ids)])
    return {"input_ids": ids, "attention_mask": mask, "word_ids": word_ids, "bracket_words": bracket}
