"""ViT tower: shapes, [CLS] attention map against a NumPy recomputation, remat, HF/timm parity."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax.models import hf_import
from medvlp_jax.models.vit import ViT
from tests import helpers


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    """Tiny models: XLA compile time dominates, so skip most optimisations here (restored afterwards)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)

TINY = dict(patch_size=8, width=16, depth=2, num_heads=2, mlp_dim=24, image_size=32)


def _init(model, images):
    return jax.jit(model.init)(jax.random.key(0), images)


def test_shapes_demo_and_base_sizes():
    demo = ViT(patch_size=16, width=192, depth=4, num_heads=3, mlp_dim=768, image_size=128)
    x = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)
    out, variables = jax.eval_shape(lambda x: demo.init_with_output(jax.random.key(0), x), x)
    assert out["cls"].shape == (2, 192) and out["patches"].shape == (2, 64, 192)
    assert out["attn"].shape == (2, 64) and out["attn_row"].shape == (2, 65) and demo.grid == (8, 8)
    assert variables["params"]["pos_embed"].shape == (1, 65, 192)

    base = ViT()                                        # ViT-B/16 at 224
    out, variables = jax.eval_shape(lambda x: base.init_with_output(jax.random.key(0), x),
                                    jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert out["patches"].shape == (1, 196, 768) and base.grid == (14, 14)
    n_params = sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"]))
    assert n_params == 85_798_656                       # timm vit_base_patch16_224 without its head


def test_wrong_image_size_raises():
    with pytest.raises(ValueError, match="32x32"):
        jax.eval_shape(lambda x: ViT(**TINY).init(jax.random.key(0), x),
                       jax.ShapeDtypeStruct((1, 40, 40, 3), jnp.float32))


def _layernorm(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_cls_attention_matches_numpy_and_rows_sum_to_one():
    model = ViT(**{**TINY, "depth": 1})
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    variables = _init(model, images)
    out = jax.jit(model.apply)(variables, images)
    p = jax.tree.map(np.asarray, variables["params"])

    # Independent NumPy forward up to the block's attention: patchify, embed, LN, q.k^T softmax.
    b, ps, w, h = 2, 8, 16, 2
    patches = images.reshape(b, 4, ps, 4, ps, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 16, ps * ps * 3)
    x = patches @ p["patch_embed"]["kernel"].reshape(ps * ps * 3, w) + p["patch_embed"]["bias"]
    x = np.concatenate([np.broadcast_to(p["cls_token"], (b, 1, w)), x], 1) + p["pos_embed"]
    y = _layernorm(x, p["block_0"]["ln_1"])
    a = p["block_0"]["attn"]
    q = (y @ a["query"]["kernel"] + a["query"]["bias"]).reshape(b, 17, h, w // h)
    k = (y @ a["key"]["kernel"] + a["key"]["bias"]).reshape(b, 17, h, w // h)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(w // h)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    row = probs[:, :, 0].mean(1)                                   # [b, 17]

    np.testing.assert_allclose(out["attn_row"], row, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["attn_row"]).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out["attn"], row[:, 1:], atol=1e-5)   # CLS key excluded


def test_remat_same_values_and_grads():
    images = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    plain, remat = ViT(**{**TINY, "depth": 1}), ViT(**{**TINY, "depth": 1}, remat=True)
    variables = _init(plain, images)
    assert jax.tree.structure(variables) == jax.tree.structure(_init(remat, images))
    # Fixed random read-outs: every parameter gets an O(1) gradient. (A sum of squared final-LN features is
    # nearly constant, so its gradient was float cancellation: up to ~6% float32 error per leaf, host-dependent.)
    w_cls, w_attn = (np.random.default_rng(s).standard_normal((2, 16)).astype(np.float32) for s in (2, 3))

    def loss(model, params):
        out = model.apply({"params": params}, images, train=True)
        return (out["cls"] * w_cls).sum() + (out["attn"] * w_attn).sum(), out

    grad = lambda model: jax.jit(jax.grad(lambda p: loss(model, p), has_aux=True))
    g1, out1 = grad(plain)(variables["params"])
    remat_grad = grad(remat)
    g2, out2 = remat_grad(variables["params"])
    # Remat recomputes the block in another order: judge each leaf against its own scale, not per element
    # (measured here: remat and XLA's optimised order differ by <= 1.3e-6 of a leaf's scale). The attention
    # key bias's exact gradient is 0 (softmax cancels q.b_k): floor=1e-2 judges its noise (~4e-7) against
    # 1% of the largest gradient, which is below every other leaf's own scale.
    helpers.assert_trees_close({k: out2[k] for k in ("cls", "patches", "attn")},
                               {k: out1[k] for k in ("cls", "patches", "attn")}, err_msg="outputs")
    helpers.assert_trees_close(g2, g1, floor=1e-2, err_msg="grads")
    # The same tolerance rejects a small real difference inside the remat block (a 1e-3 change of one
    # LayerNorm scale there), through the same compiled function.
    bugged = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 1.001 if jax.tree_util.keystr(path) == "['block_0']['ln_2']['scale']" else x,
        variables["params"])
    with pytest.raises(AssertionError, match="grads"):
        helpers.assert_trees_close(remat_grad(bugged)[0], g1, floor=1e-2, err_msg="grads")


def test_bfloat16_compute_keeps_float32_params():
    model = ViT(**TINY, dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
    assert out["cls"].dtype == jnp.bfloat16 and out["attn"].dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))


def _hf_vit():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                                 image_size=32, patch_size=8, layer_norm_eps=1e-6, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg, add_pooling_layer=True).eval()
    return torch, model


@pytest.mark.parity
def test_parity_with_hf_vitmodel():
    torch, hf = _hf_vit()
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    params, report = hf_import.convert_vit_state_dict(sd)
    assert report.ok and report.ignored == ["pooler.dense.bias", "pooler.dense.weight"]
    model = ViT(**TINY)
    ref = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, ref["params"])

    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = hf(pixel_values=torch.tensor(x), output_attentions=True)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))
    out, inter = apply(params, x.transpose(0, 2, 3, 1))
    tokens = np.concatenate([np.asarray(out["cls"])[:, None], np.asarray(out["patches"])], 1)
    assert np.abs(tokens - want.last_hidden_state.numpy()).max() < 1e-4
    for i in range(2):
        got = np.asarray(inter["intermediates"][f"block_{i}"]["attn"]["attn_probs"][0])
        assert np.abs(got - want.attentions[i].numpy()).max() < 1e-4
    assert np.abs(np.asarray(out["attn"]) - want.attentions[-1].numpy()[:, :, 0, 1:].mean(1)).max() < 1e-5


@pytest.mark.parity
def test_timm_layout_converts_to_the_same_params():
    _, hf = _hf_vit()
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    hf_params, _ = hf_import.convert_vit_state_dict({"vit." + k: v for k, v in sd.items()})  # prefix stripped
    timm = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
            "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
            "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
            "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
            "head.weight": np.zeros((5, 16), np.float32), "head.bias": np.zeros((5,), np.float32)}
    for i in range(2):
        h, t = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            timm[t + "attn.qkv." + kind] = np.concatenate(
                [sd[h + f"attention.attention.{n}.{kind}"] for n in ("query", "key", "value")], 0)
            for theirs, ours in (("norm1", "layernorm_before"), ("norm2", "layernorm_after"),
                                 ("attn.proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
                                 ("mlp.fc2", "output.dense")):
                timm[f"{t}{theirs}.{kind}"] = sd[f"{h}{ours}.{kind}"]
    timm_params, report = hf_import.convert_vit_state_dict(timm)
    assert report.ok and sorted(report.ignored) == ["head.bias", "head.weight"]
    jax.tree.map(np.testing.assert_array_equal, timm_params, hf_params)


@pytest.mark.parity
def test_load_image_tower_from_hf_directory(tmp_path):
    import ml_collections
    from medvlp_jax.models import dual_encoder as de
    _, hf = _hf_vit()
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    cfg = ml_collections.ConfigDict(dict(
        image=dict(name="vit", hf_checkpoint=str(tmp_path), **TINY),
        text=dict(vocab_size=20, width=8, depth=1, num_heads=2, mlp_dim=8, max_position=8), proj=dict(dim=4)))
    abstract = jax.eval_shape(lambda b: de.build_model(cfg).init(jax.random.key(0), b, train=False),
                              de.example_batch(cfg, 1))
    variables, report = hf_import.load_image_tower(abstract, cfg)
    assert report.ok and variables["params"]["text"] is abstract["params"]["text"]
    want, _ = hf_import.convert_vit_state_dict({k: v.numpy() for k, v in hf.state_dict().items()})
    jax.tree.map(np.testing.assert_array_equal, variables["params"]["image"], want)
    cfg.image.layer_norm_eps = 1e-12                       # HF ViT's default eps differs from timm/DeiT
    with pytest.raises(ValueError, match="layer_norm_eps"):
        hf_import.load_image_tower(abstract, cfg)
    cfg.image.layer_norm_eps, cfg.image.image_size = 1e-6, 48   # another position table: shape check
    abstract = jax.eval_shape(lambda b: de.build_model(cfg).init(jax.random.key(0), b, train=False),
                              de.example_batch(cfg, 1))
    with pytest.raises(ValueError, match="image_size|pos_embed"):
        hf_import.load_image_tower(abstract, cfg)
