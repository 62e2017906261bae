"""Our deterministic WordPiece vocabulary learner (data/tokenizer.learn_wordpiece_vocab, train_wordpiece).

Hugging Face's WordPieceTrainer gave a different vocabulary on every run on the same texts (ties between
equally frequent pairs follow hash-map order); these tests pin the learner's rules and its determinism."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from medvlp_jax.data import tokenizer as tokenizer_lib

SPECIALS = tokenizer_lib.SPECIAL_TOKENS
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Short reports with many equally frequent pairs, so that tie-breaking matters.
WORDS = ["left", "right", "lower", "upper", "lobe", "pleural", "effusion", "opacity", "atelectasis", "heart",
         "size", "normal", "mild", "cardiomegaly", "no", "pneumothorax", "clear", "lungs", "the", "is",
         "consolidation", "basilar", "granuloma", "calcified", "Über", "x-ray", "3.5", "cm", "(stable)"]


def reports(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) + "." for _ in range(n)]


def digests(out_dir):
    return {f: hashlib.sha256(open(os.path.join(out_dir, f), "rb").read()).hexdigest()
            for f in ("vocab.txt", "tokenizer.json")}


def read_vocab(out_dir):
    with open(os.path.join(out_dir, "vocab.txt"), encoding="utf-8") as f:
        return f.read().splitlines()


def test_hand_computed_merges_and_tie_broken_by_string():
    # Initial pieces: abc = a ##b ##c (x3), bc = b ##c (x2), de = d ##e (x5).
    # Pair counts: (d,##e) 5; (a,##b) 3 -> "ab"; (##b,##c) 3 -> "##bc"; (b,##c) 2 -> "bc".
    # 1st merge "de" (5). 2nd: the tie at 3 goes to the smaller string, "##bc" < "ab" ("#" < "a").
    # abc is then a ##bc: (a,##bc) 3 -> 3rd merge "abc"; then (b,##c) 2 -> "bc".
    counts = {"abc": 3, "bc": 2, "de": 5}
    alphabet = ["##b", "##c", "##e", "a", "b", "c", "d", "e"]    # every char as itself, "##c" if seen non-first
    head = SPECIALS + alphabet
    assert tokenizer_lib.learn_wordpiece_vocab(counts, len(head) + 3) == head + ["de", "##bc", "abc"]
    assert tokenizer_lib.learn_wordpiece_vocab(counts, 100) == head + ["de", "##bc", "abc", "bc"]
    # min_frequency bounds pair counts: "bc" (2) is not merged at 3; nothing left after "abc".
    assert tokenizer_lib.learn_wordpiece_vocab(counts, 100, min_frequency=3) == head + ["de", "##bc", "abc"]
    # A tie with the merged strings the other way round: "##yz" < "xy" again, whichever word comes first.
    assert tokenizer_lib.learn_wordpiece_vocab({"xyz": 2}, 100)[len(SPECIALS) + 5:] == ["##yz", "xyz"]


def test_words_seen_once_count_towards_pairs_as_in_hugging_face():
    # Each word once, the pair (##c, ##d) twice: merged (Hugging Face's trainer merges it too).
    vocab = tokenizer_lib.learn_wordpiece_vocab({"xcd": 1, "ycd": 1}, 100)
    assert vocab == SPECIALS + ["##c", "##d", "c", "d", "x", "y", "##cd"]
    # A pair seen once is not merged, but its characters are in the alphabet.
    assert tokenizer_lib.learn_wordpiece_vocab({"zq": 1}, 100) == SPECIALS + ["##q", "q", "z"]


def naive_vocab(counts, vocab_size, min_frequency=2):
    """The learner's rules, done the slow way: recount every pair after every merge."""
    words = sorted(counts)
    segs = {w: [w[0]] + ["##" + c for c in w[1:]] for w in words}
    vocab = SPECIALS + sorted({c for w in words for c in w} | {s for w in words for s in segs[w][1:]})
    while len(vocab) < vocab_size:
        pairs = {}
        for w in words:
            for p in zip(segs[w], segs[w][1:]):
                pairs[p] = pairs.get(p, 0) + counts[w]
        if not pairs:
            break
        a, b = best = min(pairs, key=lambda p: (-pairs[p], p[0] + p[1].removeprefix("##"), p))
        if pairs[best] < min_frequency:
            break
        new = a + b.removeprefix("##")
        if new not in vocab:
            vocab.append(new)
        for w in words:
            s, out, k = segs[w], [], 0
            while k < len(s):
                step = 2 if s[k:k + 2] == [a, b] else 1
                out.append(new if step == 2 else s[k])
                k += step
            segs[w] = out
    return vocab


def test_incremental_learner_matches_recounting_every_pair():
    rng = np.random.default_rng(0)
    for trial in range(150):
        counts = {}
        for _ in range(rng.integers(1, 8)):
            w = "".join(rng.choice(list("abc#"[:rng.integers(2, 4)]), size=rng.integers(1, 8)))
            counts[w] = counts.get(w, 0) + int(rng.integers(1, 5))
        for vocab_size in (12, 200):
            assert tokenizer_lib.learn_wordpiece_vocab(counts, vocab_size) == naive_vocab(counts, vocab_size), counts


def test_order_of_words_and_texts_does_not_matter():
    texts = reports()
    counts = tokenizer_lib.count_words(texts)
    a = tokenizer_lib.learn_wordpiece_vocab(counts, 150)
    b = tokenizer_lib.learn_wordpiece_vocab(dict(reversed(list(counts.items()))), 150)
    assert a == b
    assert tokenizer_lib.count_words(texts[::-1]) == counts


@pytest.mark.parametrize("vocab_size", [5, 12, 60, 120, 500])
def test_vocab_starts_with_specials_and_never_exceeds_vocab_size(tmp_path, vocab_size):
    out = tokenizer_lib.train_wordpiece(reports(), str(tmp_path / "tok"), vocab_size=vocab_size)
    vocab = read_vocab(out)
    assert vocab[:len(SPECIALS)] == SPECIALS
    assert len(vocab) <= vocab_size and len(vocab) == len(set(vocab))
    tok = tokenizer_lib.load_tokenizer(out)
    assert [tok.convert_ids_to_tokens(i) for i in range(len(vocab))] == vocab    # ids = vocab.txt lines
    assert len(tok) == len(vocab)


def test_vocab_size_below_the_specials_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="special tokens"):
        tokenizer_lib.train_wordpiece(reports(), str(tmp_path / "tok"), vocab_size=4)


def test_training_texts_tokenize_without_unk_and_encode_works(tmp_path):
    texts = reports()
    out = tokenizer_lib.train_wordpiece(texts, str(tmp_path / "tok"), vocab_size=120)
    tok = tokenizer_lib.load_tokenizer(out)
    unk = tok.convert_tokens_to_ids("[UNK]")
    for t in texts:
        ids = tok(t)["input_ids"]
        assert unk not in ids, (t, tok.convert_ids_to_tokens(ids))
    # Unseen words made of characters seen in those positions (every character may start a word).
    assert unk not in tok("pneumonia rlung tlesion")["input_ids"]
    pieces = tok.tokenize("Über ☃")                                     # lower-cased, accents stripped
    assert "".join(p.removeprefix("##") for p in pieces[:-1]) == "uber" and pieces[-1] == "[UNK]", pieces
    enc = tokenizer_lib.encode(tok, texts[:4] + ["☃ effusion"], max_len=16)
    assert {k: v.shape for k, v in enc.items()} == {k: (5, 16) for k in
                                                    ("input_ids", "attention_mask", "word_ids", "bracket_words")}
    assert (enc["input_ids"][:, 0] == tok.cls_token_id).all()
    w = enc["word_ids"][4]                                              # [CLS] [UNK] effusion [SEP]
    assert w[:2].tolist() == [0, 1] and sorted(set(w[w >= 0].tolist())) == [0, 1, 2, 3]
    assert enc["bracket_words"][4].tolist() == [0, 1] + [0] * 14


def test_same_bytes_in_processes_with_different_hash_seeds(tmp_path):
    texts = reports(n=200, seed=1)
    here = digests(tokenizer_lib.train_wordpiece(texts, str(tmp_path / "here"), vocab_size=300))
    script = ("import sys, json; from medvlp_jax.data import tokenizer as t; "
              "t.train_wordpiece(json.load(sys.stdin), sys.argv[1], vocab_size=300)")
    import json
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="true")
        out = str(tmp_path / f"seed{seed}")
        subprocess.run([sys.executable, "-c", script, out], input=json.dumps(texts), text=True, env=env,
                       check=True, timeout=120)
        assert digests(out) == here, seed
