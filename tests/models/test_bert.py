"""BERT tower: shapes, attention rows, the MGCA position quirk, last-layer sums, dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax.models.bert import Bert


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    """Tiny models: XLA compile time dominates, so skip most optimisations here (restored afterwards)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)

TINY = dict(vocab_size=40, width=16, depth=3, num_heads=2, mlp_dim=24, max_position=12)


def _batch(seed=0, b=3, l=9):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 40, (b, l)).astype(np.int32)
    mask = np.ones((b, l), np.int32)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def tiny():
    model = Bert(**TINY)
    ids, mask = _batch()
    variables = jax.jit(model.init)(jax.random.key(0), ids, mask)
    return model, variables, ids, mask


def _run(model, variables, ids, mask, **kw):
    return jax.jit(lambda v, i, m: model.apply(v, i, m, mutable=["intermediates"], **kw))(variables, ids, mask)


def test_shapes_base_size():
    model = Bert(depth=6)                                   # MGCA's 6-layer Bio_ClinicalBERT
    i = jax.ShapeDtypeStruct((2, 112), jnp.int32)
    out, variables = jax.eval_shape(lambda i, m: model.init_with_output(jax.random.key(0), i, m), i, i)
    assert out["cls"].shape == (2, 768) and out["tokens"].shape == (2, 112, 768) and out["attn"].shape == (2, 112)
    assert variables["params"]["word_embeddings"]["embedding"].shape == (28996, 768)
    assert "pooler" not in variables["params"] and "pooled" not in out


def test_attention_rows_sum_to_one_and_ignore_padding(tiny):
    model, variables, ids, mask = tiny
    out, inter = _run(model, variables, ids, mask)
    attn = np.asarray(out["attn"])
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    assert (attn[mask == 0] == 0).all()
    probs = np.asarray(inter["intermediates"]["layer_2"]["attn"]["attn_probs"][0])       # [b, h, l, l]
    np.testing.assert_allclose(attn, probs[:, :, 0].mean(1), atol=1e-7)
    # Padding does not leak into real tokens: truncating the padded row gives the same hidden states.
    short, _ = _run(model, variables, ids[2:, :3], mask[2:, :3])
    np.testing.assert_allclose(short["tokens"][0], out["tokens"][2, :3], atol=1e-5)


def test_mgca_quirk_every_token_at_position_zero(tiny):
    _, variables, ids, mask = tiny
    quirk = Bert(**TINY, use_position_ids=False)
    out_quirk, _ = _run(quirk, variables, ids, mask)
    out_zero, _ = _run(Bert(**TINY), variables, ids, mask, position_ids=jnp.zeros(ids.shape[1], jnp.int32))
    out_pos, _ = _run(Bert(**TINY), variables, ids, mask)
    np.testing.assert_allclose(out_quirk["tokens"], out_zero["tokens"], atol=1e-6)
    assert np.abs(np.asarray(out_quirk["tokens"]) - np.asarray(out_pos["tokens"])).max() > 1e-2
    # Without positions the encoder is permutation-equivariant over the (unpadded) tokens.
    perm = np.array([0, 3, 1, 2, 5, 4, 6, 8, 7])
    out_perm, _ = _run(quirk, variables, ids[:1, perm], mask[:1, perm])
    np.testing.assert_allclose(out_perm["tokens"][0], out_quirk["tokens"][0, perm], atol=1e-5)


def test_sum_last_layers(tiny):
    _, variables, ids, mask = tiny
    out, inter = _run(Bert(**TINY, sum_last_layers=2), variables, ids, mask)
    hidden = inter["intermediates"]["hidden_states"][0]                  # embeddings + 3 layers
    assert len(hidden) == 4
    np.testing.assert_allclose(out["tokens"], np.asarray(hidden[2]) + np.asarray(hidden[3]), atol=1e-6)
    np.testing.assert_allclose(out["cls"], out["tokens"][:, 0], atol=0)
    with pytest.raises(ValueError, match="sum_last_layers"):
        jax.eval_shape(lambda: Bert(**TINY, sum_last_layers=4).init(jax.random.key(0), ids, mask))


def test_text_longer_than_position_table_fails():
    i = jax.ShapeDtypeStruct((1, 13), jnp.int32)
    with pytest.raises(ValueError, match="max_position 12"):
        jax.eval_shape(lambda i: Bert(**TINY).init(jax.random.key(0), i, i), i)
    jax.eval_shape(lambda i: Bert(**TINY, use_position_ids=False).init(jax.random.key(0), i, i), i)   # all at 0


def test_dropout_only_in_train(tiny):
    model, variables, ids, mask = tiny
    fn = jax.jit(lambda v, r, train: model.apply(v, ids, mask, train, rngs={"dropout": r}), static_argnums=2)
    a, b = fn(variables, jax.random.key(1), True), fn(variables, jax.random.key(2), True)
    assert np.abs(np.asarray(a["tokens"]) - np.asarray(b["tokens"])).max() > 1e-3
    c, d = fn(variables, jax.random.key(1), False), fn(variables, jax.random.key(2), False)
    np.testing.assert_array_equal(c["tokens"], d["tokens"])
