"""Word slots from token strings (methods.md 1.4): [UNK] is an ordinary word, as in both authors' aggregation
loops; GLoRIA's uncounted words (``bracket_words``); ``encode`` end to end on a hand-written vocabulary."""
import numpy as np
import pytest

from medvlp_jax.data import tokenizer as tokenizer_lib

SPECIAL = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}

# "small ☃ effusion seen": the snowman is not in any radiology vocabulary -> [UNK], in the middle.
UNK_MIDDLE = ["[CLS]", "small", "[UNK]", "eff", "##usion", "seen", "[SEP]", "[PAD]", "[PAD]"]
# A report of exactly L = 8 tokens: [SEP] at position L - 1 (what truncation always produces).
FULL_LENGTH = ["[CLS]", "mild", "cardio", "##megaly", "no", "eff", "##usion", "[SEP]"]


def authors_words(tokens):
    """The word strings of GLoRIA's/MGCA's ``aggregate_tokens`` loop (the variant that reaches [SEP])."""
    words, bank = [], []
    for t in tokens:
        if t == "[SEP]":
            words += ["".join(bank), t]
            break
        if t.startswith("##"):
            bank.append(t[2:])
        else:
            if bank:
                words.append("".join(bank))
            bank = [t]
    return words


def test_unk_is_an_ordinary_word_slot():
    got = tokenizer_lib.word_ids_from_tokens(UNK_MIDDLE, SPECIAL)
    np.testing.assert_array_equal(got, [0, 1, 2, 3, 3, 4, 5, -1, -1])
    # Same slot count and order as the authors' loop: [CLS] small [UNK] effusion seen [SEP].
    assert authors_words(UNK_MIDDLE) == ["[CLS]", "small", "[UNK]", "effusion", "seen", "[SEP]"]
    assert got.max() + 1 == len(authors_words(UNK_MIDDLE))
    # The rule before issue 13 (kept behind skip_special): no slot for [UNK], later words move left.
    old = tokenizer_lib.word_ids_from_tokens(UNK_MIDDLE, SPECIAL, skip_special=True)
    np.testing.assert_array_equal(old, [0, 1, -1, 2, 2, 3, 4, -1, -1])


def test_word_pieces_after_unk_join_its_slot_and_full_length_keeps_every_token():
    tokens = ["[CLS]", "[UNK]", "##s", "seen", "[SEP]"]
    np.testing.assert_array_equal(tokenizer_lib.word_ids_from_tokens(tokens), [0, 1, 1, 2, 3])
    assert authors_words(tokens) == ["[CLS]", "[UNK]s", "seen", "[SEP]"]
    # The tokenizer gives a full-length report all its slots; MGCA's lost tail is the encoder's switch.
    np.testing.assert_array_equal(tokenizer_lib.word_ids_from_tokens(FULL_LENGTH), [0, 1, 2, 2, 3, 4, 4, 5])


def test_bracket_words_are_gloria_uncounted_words():
    w = tokenizer_lib.word_ids_from_tokens(UNK_MIDDLE)
    np.testing.assert_array_equal(tokenizer_lib.bracket_words_from_tokens(UNK_MIDDLE, w), [0, 0, 1, 0, 0, 0, 0, 0, 0])
    # GLoRIA's cap_lens: words not starting with "[" plus one ([CLS]); here 3 + 1 = 4 columns of 6 slots.
    words = authors_words(UNK_MIDDLE) + ["[PAD]"] * 3
    cap_len = len([x for x in words if not x.startswith("[")]) + 1
    n_slots_before_sep = int(w.max())                                  # [CLS] + 4 words
    assert cap_len == n_slots_before_sep - int(tokenizer_lib.bracket_words_from_tokens(UNK_MIDDLE, w).sum())
    # A literal "[" word and an [UNK] followed by a piece count once each; [CLS]/[SEP]/[PAD] never.
    tokens = ["[CLS]", "[", "[UNK]", "##x", "seen", "[SEP]", "[PAD]"]
    w = tokenizer_lib.word_ids_from_tokens(tokens)
    np.testing.assert_array_equal(tokenizer_lib.bracket_words_from_tokens(tokens, w), [0, 1, 1, 0, 0, 0, 0])
    words = authors_words(tokens)
    assert len([x for x in words if x.startswith("[")]) - 2 == 2         # minus [CLS] and [SEP]


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A BERT WordPiece tokenizer from a hand-written vocab.txt (no network)."""
    d = tmp_path_factory.mktemp("vocab")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "small", "eff", "##usion", "seen", "mild", "cardio",
             "##megaly", "no"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return tokenizer_lib.load_tokenizer(str(d)), {t: i for i, t in enumerate(vocab)}


def test_encode_end_to_end_unk_and_full_length(tiny_tokenizer):
    tok, ids = tiny_tokenizer
    enc = tokenizer_lib.encode(tok, ["small \u2603 effusion seen", "mild cardiomegaly no effusion seen"], 8)
    assert set(enc) == {"input_ids", "attention_mask", "word_ids", "bracket_words"}
    row0 = [ids[t] for t in UNK_MIDDLE[:7]] + [0]
    np.testing.assert_array_equal(enc["input_ids"][0], row0)
    np.testing.assert_array_equal(enc["word_ids"][0], [0, 1, 2, 3, 3, 4, 5, -1])
    np.testing.assert_array_equal(enc["bracket_words"][0], [0, 0, 1, 0, 0, 0, 0, 0])
    # Truncated to exactly 8 tokens: "seen" is cut, [SEP] sits at position 7.
    np.testing.assert_array_equal(enc["input_ids"][1], [ids[t] for t in FULL_LENGTH])
    np.testing.assert_array_equal(enc["word_ids"][1], [0, 1, 2, 2, 3, 4, 4, 5])
    np.testing.assert_array_equal(enc["attention_mask"][1], np.ones(8))
    assert not enc["bracket_words"][1].any()
    assert all(v.dtype == np.int32 for v in enc.values())
