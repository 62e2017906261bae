"""Tokenizers: a Hugging Face tokenizer from a local directory, and the demo's WordPiece vocabulary.

``encode`` produces everything the text tower needs, including ``word_ids`` for word-piece merging
(methods.md 1.4): [CLS] -> slot 0, the pieces of the k-th word -> slot k, [SEP] -> slot n_words + 1,
padding -> -1. A "word" starts at every token that does not begin with "##" (MGCA/GLoRIA's rule).
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


def word_ids_from_tokens(tokens: list[str], special: set[str]) -> np.ndarray:
    """Slot per token after merging word pieces (see module docstring). tokens: padded token strings."""
    out = np.full((len(tokens),), -1, np.int32)
    slot = 0
    for i, t in enumerate(tokens):
        if t == "[PAD]" or (t in special and t not in ("[CLS]", "[SEP]")):
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


def encode(tokenizer, texts: list[str], max_len: int) -> dict[str, np.ndarray]:
    """Tokenises a batch. Returns input_ids, attention_mask, word_ids: [b, max_len] int32 each."""
    enc = tokenizer(list(texts), max_length=max_len, padding="max_length", truncation=True,
                    return_attention_mask=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    special = set(tokenizer.all_special_tokens)
    # Normalise special names so the merge rule works for any BERT-family vocabulary.
    cls_tok, sep_tok, pad_tok = tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token
    rename = {cls_tok: "[CLS]", sep_tok: "[SEP]", pad_tok: "[PAD]"}
    word_ids = np.stack([
        word_ids_from_tokens([rename.get(t, t) for t in tokenizer.convert_ids_to_tokens(row)],
                             {rename.get(s, s) for s in special})
        for row in ids])
    word_ids = np.where(mask > 0, word_ids, -1).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "word_ids": word_ids}
