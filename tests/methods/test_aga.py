"""AGA objective: gates, groups, IGA, BCGA and ITC against loop-by-loop NumPy references (methods.md 6.2)."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medvlp_jax.methods import OBJECTIVES, aga, common, make_objective
from medvlp_jax.types import EncoderOutputs
from medvlp_jax.types import LossContext

B, T, P, D = 4, 7, 5, 6
N_WORDS = (3, 4, 1, 5)           # slot 0 = [CLS], 1..n = words, n + 1 = [SEP], rest padding


def random_outputs(seed, b=B, t=T, p=P, d=D, n_words=N_WORDS, dtype=np.float32):
    """EncoderOutputs from random arrays (L2-normalised embeddings, every slot filled, padding included)."""
    rng = np.random.default_rng(seed)

    def unit(*shape):
        x = rng.normal(size=shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

    pos = np.arange(t)[None, :]
    n = np.asarray(n_words)[:, None]
    word_mask = (pos >= 1) & (pos <= n)
    slot_mask = pos <= n + 1
    word_attn = np.where(slot_mask, rng.uniform(0.01, 1.0, size=(b, t)), 0.0).astype(dtype)
    return EncoderOutputs(
        img_emb=jnp.asarray(unit(b, d)), txt_emb=jnp.asarray(unit(b, d)), patch_emb=jnp.asarray(unit(b, p, d)),
        word_emb=jnp.asarray(unit(b, t, d)), word_mask=jnp.asarray(word_mask), slot_mask=jnp.asarray(slot_mask),
        word_attn=jnp.asarray(word_attn), patch_attn=None, img_feat=None, txt_feat=None, patch_feat=None,
        word_feat=None, grid=(1, p))


def objective(**kw):
    return make_objective(ml_collections.ConfigDict(dict(name="aga", **kw)), steps_per_epoch=10)


def random_params(obj, out, seed=0, scale=0.5):
    """Initial gate params plus noise, so that the gates are not constant (the output kernel starts at 0)."""
    params = obj.init(jax.random.PRNGKey(seed), out)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


@functools.lru_cache(maxsize=None)
def jitted_loss(obj):
    return jax.jit(lambda prm, o, batch: obj.loss(prm, o, batch, LossContext(0)))


def run(obj, params, out, batch=None):
    return jitted_loss(obj)(params, out, batch or {})


def assert_grads_match_finite_differences(f, args, eps=1e-6, n_dirs=2, rtol=1e-5, atol=1e-7, seed=0):
    """Directional derivatives of f (float64) by central differences vs the analytic gradient.

    One jitted value_and_grad serves both, so there is a single compile.
    """
    vg = jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args)))))
    value, grads = vg(*args)
    rng = np.random.default_rng(seed)
    for _ in range(n_dirs):
        dirs = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), args)
        shift = lambda s: jax.tree_util.tree_map(lambda x, v: x + s * v, args, dirs)
        numeric = (float(vg(*shift(eps))[0]) - float(vg(*shift(-eps))[0])) / (2 * eps)
        analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree_util.tree_leaves(grads),
                                                              jax.tree_util.tree_leaves(dirs)))
        np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=atol)
    return value, grads


# ---- NumPy references (loops) -----------------------------------------------------------------------------

def np_logsumexp(x):
    m = max(x)
    return m + np.log(sum(np.exp(v - m) for v in x))


def np_gelu(x):      # flax nn.gelu default: tanh approximation
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_gate(gp, q, ctx, lo, hi):
    x = np.concatenate([q, ctx])
    h = np_gelu(x @ np.asarray(gp["hidden"]["kernel"], np.float64) + np.asarray(gp["hidden"]["bias"], np.float64))
    z = float(h @ np.asarray(gp["out"]["kernel"], np.float64)[:, 0] + float(gp["out"]["bias"][0]))
    return lo + (hi - lo) / (1.0 + math.exp(-z))


def np_group(q, keys, theta, kappa, hard):
    """Weights of one query over a list of keys (the equations of methods.md 6.2)."""
    s = np.array([np.dot(q, k) for k in keys])
    st = (s - s.min()) / (s.max() - s.min() + 1e-6)
    if not any(v >= theta for v in st):
        w = np.zeros(len(keys))
        w[int(np.argmax(s))] = 1.0
        return w
    m = np.array([(1.0 if v >= theta else 0.0) if hard else 1.0 / (1.0 + math.exp(-(v - theta) / kappa))
                  for v in st])
    return m * st / ((m * st).sum() + 1e-6)


def unit(v):
    return v / max(np.linalg.norm(v), 1e-12)


def np_pair(params, words, patches, kappa=0.05, hard=False, theta_max=0.95):
    """Groups of one pair. words: list of valid token vectors; patches: [p, d]."""
    p = len(patches)
    vbar, tbar = patches.mean(0), np.mean(words, 0)
    g_v, alpha, thetas = [], [], []
    for tok in words:
        th = np_gate(params["lang_gate"], tok, vbar, 1.0 / p, theta_max)
        w = np_group(tok, patches, th, kappa, hard)
        alpha.append(w)
        thetas.append(th)
        g_v.append(unit(sum(w[j] * patches[j] for j in range(p))))
    g_t = []
    lo = min(1.0 / len(words), theta_max)
    for v in patches:
        th = np_gate(params["vis_gate"], v, tbar, lo, theta_max)
        w = np_group(v, words, th, kappa, hard)
        g_t.append(unit(sum(w[i] * words[i] for i in range(len(words)))))
    return g_v, g_t, alpha, thetas


def np_iga_pair(words, patches, g_v, g_t, tau=0.1):
    lang = []
    for i, tok in enumerate(words):
        z = [np.dot(tok, g) / tau for g in g_v]
        lang.append(-z[i] + np_logsumexp(z))
    vis = []
    for j, v in enumerate(patches):
        z = [np.dot(v, g) / tau for g in g_t]
        vis.append(-z[j] + np_logsumexp(z))
    return np.mean(lang) + np.mean(vis)


def np_bidir(logits, valid, reduce="mean"):
    rows = [i for i in range(len(logits)) if valid[i]]
    i2t = np.mean([-logits[i][i] + np_logsumexp([logits[i][j] for j in rows]) for i in rows])
    t2i = np.mean([-logits[i][i] + np_logsumexp([logits[j][i] for j in rows]) for i in rows])
    return i2t + t2i if reduce == "sum" else 0.5 * (i2t + t2i)


def np_numpy_params(params):
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)


def np_reference(params, out, valid, hard=False, itc_tau=0.07, bcga_tau=0.07):
    img, txt = np.asarray(out.img_emb, np.float64), np.asarray(out.txt_emb, np.float64)
    W, Pt = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64)
    mask = np.asarray(out.word_mask)
    b = len(img)
    iga, gv_pool, gt_pool = [], [], []
    for bi in range(b):
        words = [W[bi, k] for k in range(W.shape[1]) if mask[bi, k]]
        g_v, g_t, _, _ = np_pair(params, words, Pt[bi], hard=hard)
        gv_pool.append(unit(np.mean(g_v, 0)))
        gt_pool.append(unit(np.mean(g_t, 0)))
        if valid[bi]:
            iga.append(np_iga_pair(words, Pt[bi], g_v, g_t))
    itc = np_bidir([[np.dot(img[i], txt[j]) / itc_tau for j in range(b)] for i in range(b)], valid)
    l_v = np_bidir([[np.dot(gv_pool[i], txt[j]) / bcga_tau for j in range(b)] for i in range(b)], valid)
    l_t = np_bidir([[np.dot(img[i], gt_pool[j]) / bcga_tau for j in range(b)] for i in range(b)], valid)
    return {"loss/itc": itc, "loss/iga": np.mean(iga), "loss/bcga": 0.5 * (l_v + l_t)}


def np_cross_bcga(params, out, valid, tau=0.07):
    W, Pt = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64)
    mask = np.asarray(out.word_mask)
    b = len(W)
    s_l, s_v = np.zeros((b, b)), np.zeros((b, b))
    for a in range(b):
        words = [W[a, k] for k in range(W.shape[1]) if mask[a, k]]
        for bi in range(b):
            g_v, g_t, _, _ = np_pair(params, words, Pt[bi])
            s_l[a, bi] = np.mean([np.dot(words[i], g_v[i]) for i in range(len(words))])
            s_v[a, bi] = np.mean([np.dot(Pt[bi, j], g_t[j]) for j in range(len(Pt[bi]))])
    l_l = np_bidir((s_l.T / tau).tolist(), valid)
    l_v = np_bidir((s_v.T / tau).tolist(), valid)
    return 0.5 * (l_l + l_v)


# ---- tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hard", [False, True])
def test_terms_match_numpy(hard):
    out = random_outputs(0)
    obj = objective(hard_membership=hard)
    params = random_params(obj, out)
    valid = np.array([True, True, True, False])
    _, m = run(obj, params, out, {"valid": jnp.asarray(valid)})
    ref = np_reference(np_numpy_params(params), out, valid, hard=hard)
    for k, v in ref.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=2e-5, err_msg=k)


def test_gate_init_and_similarity_maps_match_numpy():
    out = random_outputs(1)
    obj = objective()
    params = obj.init(jax.random.PRNGKey(0), out)
    lang, _ = aga.make_gates(aga.AgaConfig(), P, T)
    theta = lang.apply({"params": params["lang_gate"]}, out.word_emb, out.patch_emb.mean(1))
    np.testing.assert_allclose(np.asarray(theta), 0.5, atol=1e-6)             # bias initialised for theta 0.5
    params = random_params(obj, out)
    maps = np.asarray(jax.jit(obj.similarity_maps)(params, out))
    npp = np_numpy_params(params)
    W, Pt, mask = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64), np.asarray(out.word_mask)
    for bi in range(B):
        idx = [k for k in range(T) if mask[bi, k]]
        _, _, alpha, _ = np_pair(npp, [W[bi, k] for k in idx], Pt[bi])
        ref = np.zeros((T, P))
        ref[idx] = alpha
        np.testing.assert_allclose(maps[bi], ref, atol=2e-5)


def test_group_weights_empty_group_falls_back_to_argmax():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    key_mask = jnp.asarray([True, True, False, True, True, True])
    theta = jnp.asarray([0.3, 1.5, 2.0])                    # rows 1 and 2: no key can reach the threshold
    w = np.asarray(aga.group_weights(q, k, key_mask, theta, 0.05, False))
    s = np.asarray(q) @ np.asarray(k).T
    s[:, 2] = -np.inf
    for r in (1, 2):
        np.testing.assert_array_equal(w[r], np.eye(6)[int(np.argmax(s[r]))])
    keys = [np.asarray(k)[j] for j in range(6) if key_mask[j]]
    ref = np_group(np.asarray(q)[0], keys, 0.3, 0.05, False)
    np.testing.assert_allclose(np.delete(w[0], 2), ref, atol=1e-6)
    assert w[0, 2] == 0.0


def test_gate_thresholds_stay_in_range_for_extreme_inputs():
    d = 6
    gate = aga.LanguageGroupedThresholdGate(theta_min=0.1, theta_max=0.9)
    params = gate.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, d)), jnp.zeros((1, d)))
    params = jax.tree_util.tree_map(lambda x: x + 50.0 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
    rng = np.random.default_rng(3)
    for scale in (1e-6, 1.0, 1e4, 1e8, 1e30):
        for sign in (1.0, -1.0):
            q = jnp.asarray(sign * scale * rng.normal(size=(2, 9, d)), jnp.float32)
            ctx = jnp.asarray(sign * scale * rng.normal(size=(2, d)), jnp.float32)
            theta = np.asarray(gate.apply(params, q, ctx))
            assert np.all(np.isfinite(theta)) and theta.min() >= 0.1 and theta.max() <= 0.9, (scale, sign)
            lower = jnp.asarray([0.05, 0.95])                               # per-pair bound (one above max)
            theta = np.asarray(gate.apply(params, q, ctx, lower))
            assert np.all(theta[0] >= 0.05) and np.all(theta[0] <= 0.9) and np.all(theta[1] == np.float32(0.9))
    # Saturation is reached at both ends for huge inputs (so the clip is exercised, not just the sigmoid).
    q = jnp.asarray(1e30 * rng.normal(size=(1, 64, d)), jnp.float32)
    theta = np.asarray(gate.apply(params, q, jnp.zeros((1, d))))
    assert np.isclose(theta.min(), 0.1) and np.isclose(theta.max(), 0.9)


def test_iga_of_a_pair_ignores_the_other_pairs():
    out = random_outputs(4)
    obj = objective()
    params = random_params(obj, out)
    settings = aga.AgaConfig()
    gates = aga.make_gates(settings, P, T)

    @jax.jit
    def per_pair(o):
        g = aga.pair_groups(params, o.word_emb, o.word_mask, o.patch_emb, settings, gates)
        return aga.iga_per_pair(o.word_emb, o.word_mask, o.patch_emb, g, settings.iga_temperature)

    ref = np.asarray(per_pair(out))
    other = random_outputs(5, n_words=(3, 6, 2, 2))
    mixed = jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u[:1], v[1:]], 0), out, other)
    got = np.asarray(per_pair(mixed))
    assert got[0] == pytest.approx(ref[0], rel=1e-6)
    assert not np.allclose(got[1:], ref[1:])
    # And the per-pair values are what the loop reference says.
    npp = np_numpy_params(params)
    W, Pt, mask = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64), np.asarray(out.word_mask)
    for bi in range(B):
        words = [W[bi, k] for k in range(T) if mask[bi, k]]
        g_v, g_t, _, _ = np_pair(npp, words, Pt[bi])
        assert ref[bi] == pytest.approx(np_iga_pair(words, Pt[bi], g_v, g_t), rel=2e-5)


def test_cross_bcga_matches_numpy_chunking_is_exact_and_gradients_match_finite_differences():
    with jax.enable_x64(True):
        out = random_outputs(6, dtype=np.float64)
        valid = np.array([True, True, False, True])
        batch = {"valid": jnp.asarray(valid)}
        obj_full = objective(bcga_mode="cross", text_chunk=None)
        obj_chunk = objective(bcga_mode="cross", text_chunk=3)      # 4 reports -> chunks of 3 with padding
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), random_params(obj_full, out))

        def loss_fn(obj):
            def f(prm, img, txt, words, patches):
                o = out.replace(img_emb=img, txt_emb=txt, word_emb=words, patch_emb=patches)
                return obj.loss(prm, o, batch, LossContext(0))
            return f

        args = (params, out.img_emb, out.txt_emb, out.word_emb, out.patch_emb)
        vg_full = jax.jit(jax.value_and_grad(loss_fn(obj_full), argnums=(0, 1, 2, 3, 4), has_aux=True))
        (v_full, m_full), g_full = vg_full(*args)
        np.testing.assert_allclose(float(m_full["loss/bcga"]), np_cross_bcga(np_numpy_params(params), out, valid),
                                   rtol=1e-9)
        v_chunk, g_chunk = assert_grads_match_finite_differences(lambda *a: loss_fn(obj_chunk)(*a)[0], args)
        np.testing.assert_allclose(float(v_chunk), float(v_full), rtol=1e-12)
        for a, b in zip(jax.tree_util.tree_leaves(g_chunk), jax.tree_util.tree_leaves(g_full)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)


def test_padding_and_special_tokens_change_nothing():
    out = random_outputs(7)
    obj = objective()
    params = random_params(obj, out)
    ref, _ = run(obj, params, out)
    rng = np.random.default_rng(8)
    not_word = ~np.asarray(out.word_mask)
    w = np.where(not_word[..., None], rng.normal(size=out.word_emb.shape), np.asarray(out.word_emb))
    w = np.concatenate([w, rng.normal(size=(B, 2, D))], 1).astype(np.float32)
    pad = lambda m: jnp.concatenate([m, jnp.zeros((B, 2), bool)], 1)
    changed = out.replace(word_emb=jnp.asarray(w), word_mask=pad(out.word_mask), slot_mask=pad(out.slot_mask),
                          word_attn=jnp.concatenate([out.word_attn, jnp.ones((B, 2))], 1))
    got, _ = run(obj, params, changed)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    extra = random_outputs(9, b=2, n_words=(2, 5))
    stacked = jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v], 0), out, extra)
    got, _ = run(obj, params, stacked, {"valid": jnp.asarray([True] * B + [False] * 2)})
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)


@pytest.mark.parametrize("mode", ["pooled", "cross"])
def test_batch_permutation_invariance(mode):
    out = random_outputs(10)
    obj = objective(bcga_mode=mode, text_chunk=3)
    params = random_params(obj, out)
    perm = np.array([2, 0, 3, 1])
    ref, _ = run(obj, params, out)
    got, _ = run(obj, params, jax.tree_util.tree_map(lambda x: x[perm], out))
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        out = random_outputs(11, dtype=np.float64)
        obj = objective()
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), random_params(obj, out))

        def f(prm, img, txt, words, patches):
            o = out.replace(img_emb=img, txt_emb=txt, word_emb=words, patch_emb=patches)
            return obj.loss(prm, o, {}, LossContext(0))[0]

        _, (g, *_) = assert_grads_match_finite_differences(
            f, (params, out.img_emb, out.txt_emb, out.word_emb, out.patch_emb))
        # The gates receive a gradient through the soft membership.
        assert float(jnp.abs(g["lang_gate"]["out"]["bias"]).sum()) > 1e-6
        assert float(jnp.abs(g["vis_gate"]["out"]["bias"]).sum()) > 1e-6


def test_config_validation_and_registration():
    assert "aga" in OBJECTIVES
    with pytest.raises(ValueError, match="unknown config keys"):
        objective(bcga="cross")
    with pytest.raises(ValueError, match="bcga_mode"):
        objective(bcga_mode="filip")
    out = random_outputs(0)
    with pytest.raises(ValueError, match="theta_init"):
        objective(theta_init=0.99).init(jax.random.PRNGKey(0), out)


# ---- issue 13: ITC weight and the within-pair group-to-group BCGA ---------------------------------------

def np_pair_bcga(params, out, valid, tau=0.07, theta_max=0.95, kappa=0.05):
    """Within-pair BCGA from the module docstring: per pair, every visual group vs every language group."""
    W, Pt = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64)
    mask = np.asarray(out.word_mask)
    per_pair = []
    for bi in range(len(W)):
        if not valid[bi]:
            continue
        words = [W[bi, k] for k in range(W.shape[1]) if mask[bi, k]]
        g_v, g_t, alpha, _ = np_pair(params, words, Pt[bi], kappa=kappa, theta_max=theta_max)
        tbar = np.mean(words, 0)
        lo = min(1.0 / len(words), theta_max)
        beta = [np_group(v, words, np_gate(params["vis_gate"], v, tbar, lo, theta_max), kappa, False)
                for v in Pt[bi]]
        z = np.array([[np.dot(gv, gt) / tau for gt in g_t] for gv in g_v])          # [n words, p]
        lang = [-sum(alpha[i][j] * (z[i, j] - np_logsumexp(z[i])) for j in range(z.shape[1]))
                for i in range(len(words))]
        vis = [-sum(beta[j][i] * (z[i, j] - np_logsumexp(z[:, j])) for i in range(len(words)))
               for j in range(z.shape[1])]
        per_pair.append(0.5 * (np.mean(lang) + np.mean(vis)))
    return np.mean(per_pair)


def test_pair_bcga_matches_numpy_and_leaves_the_other_terms_unchanged():
    out = random_outputs(12)
    params = random_params(objective(), out)
    valid = np.array([True, False, True, True])
    batch = {"valid": jnp.asarray(valid)}
    _, pooled = run(objective(), params, out, batch)
    total, pair = run(objective(bcga_mode="pair"), params, out, batch)
    np.testing.assert_allclose(float(pair["loss/bcga"]), np_pair_bcga(np_numpy_params(params), out, valid),
                               rtol=2e-5)
    for k in ("loss/itc", "loss/iga", "loss/i2t", "loss/t2i", "gate/theta_lang", "gate/theta_vis"):
        assert float(pair[k]) == float(pooled[k]), k
    np.testing.assert_allclose(float(total), float(pair["loss/itc"] + pair["loss/iga"] + pair["loss/bcga"]),
                               rtol=1e-6)


def test_pair_bcga_of_a_pair_ignores_the_other_pairs():
    out = random_outputs(13)
    params = random_params(objective(), out)
    settings = aga.AgaConfig(bcga_mode="pair")
    gates = aga.make_gates(settings, P, T)

    @jax.jit
    def per_pair(o):
        g = aga.pair_groups(params, o.word_emb, o.word_mask, o.patch_emb, settings, gates)
        return aga.bcga_pair_per_pair(o.word_mask, g, settings.bcga_temperature)

    ref = np.asarray(per_pair(out))
    other = random_outputs(14, n_words=(3, 6, 2, 2))
    mixed = jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u[:1], v[1:]], 0), out, other)
    got = np.asarray(per_pair(mixed))
    assert got[0] == pytest.approx(ref[0], rel=1e-6) and not np.allclose(got[1:], ref[1:])
    empty = out.replace(word_mask=out.word_mask.at[2].set(False))
    assert float(per_pair(empty)[2]) == 0.0                           # a pair without words contributes 0


def test_pair_bcga_gradients_match_finite_differences():
    """The targets alpha, beta are stop-gradient: hold them at their base values, and the finite differences of
    the term must match its gradient (through the groups g^v, g^t, the gates included)."""
    with jax.enable_x64(True):
        out = random_outputs(15, dtype=np.float64)
        settings = aga.AgaConfig(bcga_mode="pair")
        gates = aga.make_gates(settings, P, T)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), random_params(objective(), out))
        mask, valid = out.word_mask, jnp.asarray([True, True, False, True])
        base = aga.pair_groups(params, out.word_emb, mask, out.patch_emb, settings, gates)

        def f(prm, words, patches):
            g = aga.pair_groups(prm, words, mask, patches, settings, gates)
            g = dict(g, alpha=base["alpha"], beta=base["beta"])
            return common.masked_mean(aga.bcga_pair_per_pair(mask, g, settings.bcga_temperature), valid)

        _, (g_prm, g_w, g_p) = assert_grads_match_finite_differences(f, (params, out.word_emb, out.patch_emb))
        assert float(jnp.abs(g_w).sum()) > 0 and float(jnp.abs(g_p).sum()) > 0
        assert float(jnp.abs(g_prm["lang_gate"]["out"]["bias"]).sum()) > 0
        # Within-pair group terms only: the global embeddings get no gradient from the whole objective.
        obj = objective(bcga_mode="pair", lambda_itc=0.0)
        loss = lambda img, txt: obj.loss(params, out.replace(img_emb=img, txt_emb=txt), {}, LossContext(0))[0]
        g_img, g_txt = jax.grad(loss, argnums=(0, 1))(out.img_emb, out.txt_emb)
        assert float(jnp.abs(g_img).sum()) == 0.0 and float(jnp.abs(g_txt).sum()) == 0.0


def test_itc_weight_scales_only_the_itc_term_and_zero_removes_it():
    out = random_outputs(16)
    params = random_params(objective(), out)
    t1, m1 = run(objective(), params, out)
    assert aga.AgaConfig().lambda_itc == 1.0
    # Default: today's sum, in today's order, bit for bit.
    f32 = np.float32
    assert np.asarray(t1) == f32(f32(m1["loss/itc"]) + f32(m1["loss/iga"])) + f32(m1["loss/bcga"])
    t0, m0 = run(objective(lambda_itc=0.0), params, out)
    th, mh = run(objective(lambda_itc=0.5), params, out)
    for k in m1:
        assert float(m0[k]) == float(m1[k]) == float(mh[k]), k          # every term is still reported
    np.testing.assert_allclose(float(t0), float(m1["loss/iga"] + m1["loss/bcga"]), rtol=1e-6)
    np.testing.assert_allclose(float(th), float(0.5 * m1["loss/itc"] + m1["loss/iga"] + m1["loss/bcga"]), rtol=1e-6)
    # Off means left out: a non-finite global embedding cannot reach the loss of the within-pair terms.
    bad = out.replace(img_emb=out.img_emb.at[0, 0].set(jnp.nan))
    t_bad, m_bad = run(objective(lambda_itc=0.0, bcga_mode="pair"), params, bad)
    assert np.isnan(float(m_bad["loss/itc"])) and np.isfinite(float(t_bad))
