"""Text side of GLoRIA and MGCA end to end (issue 13; methods.md 1.4, 3.2, 4.6): hand-built token sequences
through ``data/tokenizer.py`` and the DualEncoder of ``configs/{gloria,mgca}.py:test``, faithful (the
configs' defaults) and fixed, against values computed by hand from the per-token outputs of the same
parameters (slots, masks, word attention, MGCA word weights, GLoRIA's report vector and word set)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gloria as gloria_config
from configs import mgca as mgca_config
from medvlp_jax.data import tokenizer as tokenizer_lib
from medvlp_jax.methods import gloria, local_ops, mgca
from medvlp_jax.models import dual_encoder as de

L = 8
# Row 0: an [UNK] in the middle (short report). Row 1: exactly L tokens, [SEP] at L - 1 (a truncated report).
TOKENS = [["[CLS]", "small", "[UNK]", "eff", "##usion", "seen", "[SEP]", "[PAD]"],
          ["[CLS]", "mild", "cardio", "##megaly", "no", "eff", "##usion", "[SEP]"]]


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _batch(crop):
    word_ids = np.stack([tokenizer_lib.word_ids_from_tokens(t) for t in TOKENS])
    bracket = np.stack([tokenizer_lib.bracket_words_from_tokens(t, w) for t, w in zip(TOKENS, word_ids)])
    mask = np.array([[t != "[PAD]" for t in row] for row in TOKENS], np.int32)
    ids = np.where(mask > 0, np.random.default_rng(0).integers(5, 400, mask.shape), 0).astype(np.int32)
    image = np.random.default_rng(1).standard_normal((2, crop, crop, 1)).astype(np.float32)
    return dict(image=image, input_ids=ids, attention_mask=mask, word_ids=word_ids.astype(np.int32),
                bracket_words=bracket)


def _outputs(config, batch, **text):
    """(merged EncoderOutputs with ``text`` overrides, per-token EncoderOutputs) from the same params."""
    model = de.build_model(config.model)
    variables = jax.jit(lambda b: model.init(jax.random.key(0), b, train=False))(batch)

    def run(**overrides):
        cfg = config.model.copy_and_resolve_references()
        cfg.text.update(overrides)
        m = de.build_model(cfg)
        return jax.jit(lambda v, b: m.apply(v, b, train=False))(variables, batch)

    return run, run(merge_word_pieces=False, word_attn_shift=0)


def test_tokenizer_slots_of_the_hand_built_sequences():
    b = _batch(8)
    np.testing.assert_array_equal(b["word_ids"], [[0, 1, 2, 3, 3, 4, 5, -1], [0, 1, 2, 2, 3, 4, 4, 5]])
    np.testing.assert_array_equal(b["bracket_words"], [[0, 0, 1, 0, 0, 0, 0, 0], [0] * 8])


def test_gloria_unk_slot_report_vector_and_words_used():
    config = gloria_config.get_config("test")
    assert config.model.text.get("full_length_tail", "keep") == "keep"     # GLoRIA's loop always reaches [SEP]
    batch = _batch(config.data.crop)
    run, tok = _outputs(config, batch)
    out = run()
    tf = np.asarray(tok.word_feat, np.float64)
    z = np.zeros_like(tf[0, 0])
    want_feat = [np.stack([tf[0, 0], tf[0, 1], tf[0, 2], tf[0, 3] + tf[0, 4], tf[0, 5], tf[0, 6], z, z]),
                 np.stack([tf[1, 0], tf[1, 1], tf[1, 2] + tf[1, 3], tf[1, 4], tf[1, 5] + tf[1, 6], tf[1, 7], z, z])]
    np.testing.assert_allclose(out.word_feat, np.stack(want_feat), atol=1e-5)
    np.testing.assert_array_equal(out.word_mask, [[0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(out.slot_mask, [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    # GLoRIA's word head is the identity on raw features: the report vector is the sum of ALL token
    # features ([UNK]'s included) over L slots.
    np.testing.assert_allclose(out.word_emb, out.word_feat, atol=0)
    g = gloria.report_vector(out.word_emb, out.slot_mask, out.txt_emb, "mean_all_slots")
    np.testing.assert_allclose(g[0], tf[0, :7].sum(0) / L, atol=1e-5)
    np.testing.assert_allclose(g[1], tf[1].sum(0) / L, atol=1e-5)
    # Words of the local term. Authors: n_0 = 3 counted words + 1, so [CLS] small [UNK] effusion ("seen",
    # the last real word, is lost); fixed: every word.
    n_unc = gloria.uncounted_words(batch, 2)
    np.testing.assert_array_equal(n_unc, [1, 0])
    faithful = gloria.words_used(out, local_ops.read_config(gloria.GloriaConfig, config.method), n_unc)
    np.testing.assert_array_equal(faithful, [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    fixed = gloria.words_used(out, gloria.GloriaConfig(count_unk_words=True), n_unc)
    np.testing.assert_array_equal(fixed, [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]])


def _np_omega(attn, lo=0.1, hi=0.9):
    """MGCA's word weights by hand: non-zero entries clipped to their own quantiles, normalised."""
    nz = attn != 0
    qlo, qhi = np.quantile(attn[nz], lo), np.quantile(attn[nz], hi)
    w = np.where(nz, np.clip(attn, qlo, qhi), 0.0)
    return w / w.sum()


def test_mgca_full_length_and_unk_faithful_and_fixed():
    config = mgca_config.get_config("test")
    assert config.model.text.full_length_tail == "drop" and config.model.text.word_attn_shift == 0
    batch = _batch(config.data.crop)
    run, tok = _outputs(config, batch)
    ta = np.asarray(tok.word_attn, np.float64)
    tf = np.asarray(tok.word_feat, np.float64)
    assert ta[0, 7] == 0.0                                             # the key after row 0's [SEP] is padding

    # Faithful (the authors' loop: off-by-one attention, full-length tail dropped).
    out = run(word_attn_shift=1)
    want_attn = [[ta[0, 1], ta[0, 2], ta[0, 3], ta[0, 4] + ta[0, 5], ta[0, 6], ta[0, 7], 0, 0],
                 [ta[1, 1], ta[1, 2], ta[1, 3] + ta[1, 4], ta[1, 5], 0, 0, 0, 0]]
    np.testing.assert_allclose(out.word_attn, want_attn, atol=1e-6)
    np.testing.assert_array_equal(out.slot_mask, [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(out.word_mask, [[0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0, 0]])
    np.testing.assert_allclose(out.word_feat[1, 4:], 0.0, atol=0)      # "effusion" and [SEP] are padding
    np.testing.assert_allclose(out.word_feat[0, 2], tf[0, 2], atol=1e-5)   # [UNK] is a word
    s = mgca.MgcaConfig()
    _, support, keys = mgca.word_slot_masks(out, s.word_slots)
    omega = np.asarray(mgca.word_weights(out, support, s.weight_quantiles))
    for i in range(2):
        np.testing.assert_allclose(omega[i], _np_omega(np.asarray(want_attn[i], np.float64)[1:]), atol=1e-6)
    assert omega[0, 4] == 0.0                                          # row 0's [SEP]: zero attention, no weight
    np.testing.assert_array_equal(keys[1], [1, 1, 1, 0, 0, 0, 0])      # patch side: dropped slots masked

    # Fixed: own attention, every slot of the full-length report kept.
    fixed = run(full_length_tail="keep")
    want_fixed = [[ta[0, 0], ta[0, 1], ta[0, 2], ta[0, 3] + ta[0, 4], ta[0, 5], ta[0, 6], 0, 0],
                  [ta[1, 0], ta[1, 1], ta[1, 2] + ta[1, 3], ta[1, 4], ta[1, 5] + ta[1, 6], ta[1, 7], 0, 0]]
    np.testing.assert_allclose(fixed.word_attn, want_fixed, atol=1e-6)
    np.testing.assert_array_equal(fixed.slot_mask, [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(fixed.word_mask, [[0, 1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_allclose(fixed.word_feat[1, 4], tf[1, 5] + tf[1, 6], atol=1e-5)
    # The switch touches the full-length row only.
    drop_own = run()
    for name in ("word_feat", "word_attn", "slot_mask", "word_mask"):
        np.testing.assert_array_equal(np.asarray(getattr(drop_own, name))[0], np.asarray(getattr(fixed, name))[0])
    np.testing.assert_array_equal(np.asarray(drop_own.txt_emb), np.asarray(fixed.txt_emb))
    np.testing.assert_array_equal(np.asarray(drop_own.img_emb), np.asarray(fixed.img_emb))
