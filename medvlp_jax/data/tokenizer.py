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


def _merged(a: str, b: str) -> str:
    """The symbol that merging ``a`` and ``b`` makes: ``b`` loses its "##" continuation prefix."""
    return a + (b[2:] if b.startswith("##") else b)


def learn_wordpiece_vocab(word_counts: dict[str, int], vocab_size: int, *, min_frequency: int = 2,
                          special_tokens: Iterable[str] = SPECIAL_TOKENS) -> list[str]:
    """A WordPiece vocabulary learned by BPE merges over counted words; deterministic.

    Our own learner (it replaced Hugging Face's ``WordPieceTrainer``, whose ties between equally frequent
    pairs follow hash-map order and so gave a different vocabulary on every run). What it does:

    - Initial segmentation of a word: its first character, then "##c" for each later character c.
    - Alphabet, as Hugging Face's BPE/WordPiece trainer: every character of every word as itself, plus "##c"
      for every character c seen after a word's first character. All words count, however rare.
    - Merges: repeatedly the adjacent symbol pair with the highest count over all words (weighted by word
      count; a pair inside a word seen once counts too), merged into a + b without b's "##". Ties go to
      the smaller merged string, then to the smaller pair (Python string order, i.e. code points). A pair
      is merged in a word left to right without overlap. Stops when the vocabulary holds ``vocab_size``
      entries, or when no pair is left or the best pair's count is below ``min_frequency`` (so, as in
      Hugging Face's trainer, ``min_frequency`` bounds pair counts, not word counts). A merge whose
      string is already in the vocabulary (reached by another pair) is applied but adds no entry.
    - Order: ``special_tokens``, then the alphabet sorted by string, then the merged strings in the order
      learned. If specials plus alphabet exceed ``vocab_size``, the alphabet keeps its most frequent
      symbols (count in the initial segmentation, descending, then string) and nothing is merged.

    Pair counts and a pair -> words index are updated incrementally after each merge; a heap with lazy
    deletion finds the best pair.

    Args:
      word_counts: word -> count (words already normalised and pre-tokenized).
      vocab_size: the most entries the vocabulary may have, specials included.
      min_frequency: the least count a pair must have to be merged.
      special_tokens: put first, in this order.

    Returns:
      The vocabulary (index = id), never longer than ``vocab_size``.
    """
    import heapq
    specials = list(special_tokens)
    if vocab_size < len(specials):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(specials)} special tokens")
    words = sorted(w for w, c in word_counts.items() if w and c > 0)
    counts = [int(word_counts[w]) for w in words]
    segs = [[w[0]] + ["##" + ch for ch in w[1:]] for w in words]

    sym_count: dict[str, int] = {}
    for w, seg, c in zip(words, segs, counts):
        for ch in w:                                       # every character as itself (Hugging Face's alphabet)
            sym_count.setdefault(ch, 0)
        for s in seg:
            sym_count[s] = sym_count.get(s, 0) + c
    room = vocab_size - len(specials)
    alphabet = sorted(s for s in sym_count if s not in specials)
    if len(alphabet) > room:                               # keep the most frequent symbols
        alphabet = sorted(sorted(alphabet, key=lambda s: (-sym_count[s], s))[:room])
    vocab = specials + alphabet
    known = set(vocab)
    if len(alphabet) < len(sym_count):                     # truncated: no room for merges
        return vocab

    pair_count: dict[tuple[str, str], int] = {}
    where: dict[tuple[str, str], set[int]] = {}
    for i, (seg, c) in enumerate(zip(segs, counts)):
        for p in zip(seg, seg[1:]):
            pair_count[p] = pair_count.get(p, 0) + c
            where.setdefault(p, set()).add(i)
    heap = [(-n, _merged(*p), p) for p, n in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, new, pair = heapq.heappop(heap)
        n = pair_count.get(pair, 0)
        if -neg != n:                                      # stale entry: requeue with the current count
            if n > 0:
                heapq.heappush(heap, (-n, new, pair))
            continue
        if n < min_frequency:
            break
        if new not in known:
            vocab.append(new)
            known.add(new)
        a, b = pair
        changed: dict[tuple[str, str], int] = {}
        for i in sorted(where.pop(pair)):
            seg, c = segs[i], counts[i]
            out, k = [], 0
            while k < len(seg):
                if k + 1 < len(seg) and seg[k] == a and seg[k + 1] == b:
                    out.append(new)
                    k += 2
                else:
                    out.append(seg[k])
                    k += 1
            if len(out) == len(seg):                       # the pair had left this word already
                continue
            for p in zip(seg, seg[1:]):
                changed[p] = changed.get(p, 0) - c
            for p in zip(out, out[1:]):
                changed[p] = changed.get(p, 0) + c
                where.setdefault(p, set()).add(i)
            segs[i] = out
        for p, d in changed.items():
            if d == 0:
                continue
            m = pair_count.get(p, 0) + d
            if m > 0:
                pair_count[p] = m
            else:
                pair_count.pop(p, None)
            if d > 0:                                      # a grown count needs its own heap entry
                heapq.heappush(heap, (-m, _merged(*p), p))
    return vocab


def count_words(texts: Iterable[str]) -> dict[str, int]:
    """Word counts after the demo tokenizer's normaliser and pre-tokenizer (lower-cased BERT rules)."""
    from tokenizers import normalizers, pre_tokenizers
    norm = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    pre = pre_tokenizers.BertPreTokenizer()
    out: dict[str, int] = {}
    for t in texts:
        for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)):
            out[w] = out.get(w, 0) + 1
    return out


def train_wordpiece(texts: Iterable[str], out_dir: str, *, vocab_size: int = 3000) -> str:
    """Learns a lower-cased BERT WordPiece vocabulary on ``texts``; saves an HF tokenizer dir.

    A pure function of (texts, vocab_size): the vocabulary comes from ``learn_wordpiece_vocab``
    (min_frequency 2), so vocab.txt and tokenizer.json are the same bytes on every run and in every process.
    The directory is ``PreTrainedTokenizerFast.save_pretrained``'s plus a plain BERT ``vocab.txt``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = learn_wordpiece_vocab(count_words(texts), vocab_size, min_frequency=2)
    tok = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:   # also a plain BERT vocab
        f.writelines(t + "\n" for t in vocab)
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
