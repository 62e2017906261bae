"""SISTA objective: SIA and STA against loop-by-loop NumPy references written from methods.md section 5.2."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medvlp_jax.methods import OBJECTIVES, make_objective, sista
from medvlp_jax.types import EncoderOutputs
from medvlp_jax.types import LossContext

B, T, P, D = 5, 8, 6, 5
N_WORDS = (3, 5, 2, 6, 4)        # words per report: slot 0 = [CLS], 1..n = words, n + 1 = [SEP], rest padding


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
        word_feat=None, grid=(2, p // 2))


def with_near_duplicates(out, pairs=((0, 2), (1, 3)), noise=0.05, seed=0):
    """Make reports j near copies of reports i so that the false-negative mask is non-empty."""
    rng = np.random.default_rng(seed)
    txt = np.array(out.txt_emb)
    for i, j in pairs:
        v = txt[i] + noise * rng.normal(size=txt.shape[1])
        txt[j] = v / np.linalg.norm(v)
    return out.replace(txt_emb=jnp.asarray(txt, out.txt_emb.dtype))


def objective(**kw):
    return make_objective(ml_collections.ConfigDict(dict(name="sista", **kw)), steps_per_epoch=10)


def run(obj, out, batch=None, step=100):
    return jax.jit(lambda o, s: obj.loss({}, o, batch or {}, LossContext(s)))(out, step)


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


# ---- NumPy references (loops, straight from the equations) -----------------------------------------------

def np_logsumexp(x):
    m = max(x)
    return m + np.log(sum(np.exp(v - m) for v in x))


def np_report_sim(txt):
    b = len(txt)
    return np.array([[float(np.dot(txt[i], txt[j]) / np.linalg.norm(txt[i]) / np.linalg.norm(txt[j]))
                      for j in range(b)] for i in range(b)])


def np_sia(img, txt, sim, valid, theta, tau, active, variant):
    b = len(img)
    S = np.array([[np.dot(img[i], txt[j]) / tau for j in range(b)] for i in range(b)])
    F = np.zeros((b, b), bool)
    for i in range(b):
        for j in range(b):
            F[i, j] = active and i != j and sim[i, j] >= theta and valid[i] and valid[j]
    rows = [i for i in range(b) if valid[i]]
    i2t, t2i = [], []
    for i in rows:
        if variant == "eliminate":
            i2t.append(-S[i, i] + np_logsumexp([S[i, j] for j in rows if not F[i, j]]))
            t2i.append(-S[i, i] + np_logsumexp([S[j, i] for j in rows if not F[j, i]]))
        else:
            y = {j: (1.0 if j == i else 0.0) + (sim[i, j] if F[i, j] else 0.0) for j in rows}
            z = sum(y.values())
            lse_r = np_logsumexp([S[i, j] for j in rows])
            lse_c = np_logsumexp([S[j, i] for j in rows])
            i2t.append(-sum(y[j] / z * (S[i, j] - lse_r) for j in rows))
            t2i.append(-sum(y[j] / z * (S[j, i] - lse_c) for j in rows))
    return np.mean(i2t) + np.mean(t2i), F


def np_mgca_weights(attn_row, mask_row, lo=0.1, hi=0.9):
    vals = np.array([attn_row[k] for k in range(len(attn_row)) if mask_row[k]], np.float64)
    qlo, qhi = np.quantile(vals, lo), np.quantile(vals, hi)        # numpy "linear" == torch.quantile
    w = np.zeros(len(attn_row))
    for k in range(len(attn_row)):
        if mask_row[k]:
            w[k] = min(max(attn_row[k], qlo), qhi)
    return w / w.sum()


def np_sta(word, patch, mask, attn, valid, tau, sparsify="threshold", topk=16, weights="uniform", threshold=None):
    b, t, _ = word.shape
    p = patch.shape[1]
    per_pair, alphas = [], np.zeros((b, t, p))
    for bi in range(b):
        words = [k for k in range(t) if mask[bi, k]]
        c = {}
        for k in range(t):                                         # every slot, for the maps
            s = np.array([np.dot(word[bi, k], patch[bi, j]) for j in range(p)])
            if sparsify == "softmax":
                s = np.exp(s / tau - np.max(s / tau))
            else:
                s = (s - s.min()) / (s.max() - s.min() + 1e-6)
            if sparsify == "softmax":
                pass
            elif sparsify == "topk":
                order = sorted(range(p), key=lambda j: -s[j])[:min(topk, p)]
                s = np.array([s[j] if j in order else 0.0 for j in range(p)])
            else:
                thr = 1.0 / p if threshold is None else threshold
                s = np.array([v if v >= thr else 0.0 for v in s])
            alpha = s / s.sum()
            alphas[bi, k] = alpha
            v = sum(alpha[j] * patch[bi, j] for j in range(p))
            c[k] = v / np.linalg.norm(v)
        if not valid[bi]:
            continue
        omega = (np_mgca_weights(attn[bi], mask[bi]) if weights == "mgca"
                 else np.array([1.0 / len(words) if mask[bi, k] else 0.0 for k in range(t)]))
        total = 0.0
        for k in words:
            row = [np.dot(c[k], word[bi, s]) / tau for s in words]
            col = [np.dot(word[bi, k], c[s]) / tau for s in words]
            me = words.index(k)
            total += omega[k] * 0.5 * ((-row[me] + np_logsumexp(row)) + (-col[me] + np_logsumexp(col)))
        per_pair.append(total)
    return np.mean(per_pair), alphas


def to_np(out):
    return {k: np.asarray(getattr(out, k), np.float64) for k in ("img_emb", "txt_emb", "patch_emb", "word_emb",
                                                                  "word_attn")} | {"mask": np.asarray(out.word_mask)}


# ---- tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["eliminate", "soft_positive"])
def test_sia_matches_numpy(variant):
    out = with_near_duplicates(random_outputs(0))
    valid = np.array([True, True, True, True, False])
    obj = objective(sia_variant=variant, fn_threshold=0.9, sia_warmup_epochs=0)
    _, m = run(obj, out, {"valid": jnp.asarray(valid)})
    x = to_np(out)
    ref, F = np_sia(x["img_emb"], x["txt_emb"], np_report_sim(x["txt_emb"]), valid, 0.9, 0.07, True, variant)
    assert F.sum() == 4                                                   # (0, 2) and (1, 3), both ways
    np.testing.assert_allclose(float(m["loss/sia"]), ref, rtol=1e-5)
    np.testing.assert_allclose(float(m["sia/false_negative_fraction"]), 4 / 12, rtol=1e-6)


def test_eliminating_false_negatives_changes_the_loss():
    out = with_near_duplicates(random_outputs(0))
    _, on = run(objective(sia_warmup_epochs=0), out)
    _, off = run(objective(sia_warmup_epochs=0, fn_threshold=2.0), out)
    assert abs(float(on["loss/sia"]) - float(off["loss/sia"])) > 1e-3


def test_label_jaccard_and_batch_embedding_similarity_sources():
    out = random_outputs(1)
    labels = np.array([[1, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    cfg = sista.SistaConfig(sia_similarity="label_jaccard")
    sim = np.asarray(sista.report_similarity(out, {"labels": jnp.asarray(labels)}, cfg))
    for i in range(5):
        for j in range(5):
            a, b = set(np.flatnonzero(labels[i])), set(np.flatnonzero(labels[j]))
            ref = 1.0 if not (a | b) else len(a & b) / len(a | b)
            assert sim[i, j] == pytest.approx(ref)
    emb = np.random.default_rng(2).normal(size=(5, 7))
    cfg = sista.SistaConfig(sia_similarity="batch_emb")
    sim = np.asarray(sista.report_similarity(out, {"report_sim_emb": jnp.asarray(emb, jnp.float32)}, cfg))
    np.testing.assert_allclose(sim, np_report_sim(emb), atol=1e-6)
    # Jaccard 1 between reports 0 and 1 and between the two label-free reports 2 and 4: 4 directed pairs.
    obj = objective(sia_similarity="label_jaccard", fn_threshold=0.99, sia_warmup_epochs=0)
    _, m = run(obj, out, {"labels": jnp.asarray(labels)})
    assert float(m["sia/false_negative_fraction"]) == pytest.approx(4 / 20)


@pytest.mark.parametrize("kw", [dict(), dict(sta_sparsify="topk", sta_topk=2), dict(sta_word_weights="mgca"),
                                dict(sta_threshold=0.5), dict(sta_sparsify="softmax")])
def test_sta_matches_numpy(kw):
    out = random_outputs(3)
    valid = np.array([True, False, True, True, True])
    obj = objective(**kw)
    _, m = run(obj, out, {"valid": jnp.asarray(valid)})
    x = to_np(out)
    ref, alphas = np_sta(x["word_emb"], x["patch_emb"], x["mask"], x["word_attn"], valid, 0.1,
                         kw.get("sta_sparsify", "threshold"), kw.get("sta_topk", 16),
                         kw.get("sta_word_weights", "uniform"), kw.get("sta_threshold"))
    np.testing.assert_allclose(float(m["loss/sta"]), ref, rtol=1e-5)
    maps = np.asarray(obj.similarity_maps({}, out))
    np.testing.assert_allclose(maps, np.where(x["mask"][..., None], alphas, 0.0), atol=1e-5)


def test_total_is_weighted_sum():
    out = with_near_duplicates(random_outputs(4))
    total, m = run(objective(lambda_sia=0.7, lambda_sta=2.5, sia_warmup_epochs=0), out)
    np.testing.assert_allclose(float(total), 0.7 * float(m["loss/sia"]) + 2.5 * float(m["loss/sta"]), rtol=1e-6)


def test_warmup_switches_at_configured_step():
    out = with_near_duplicates(random_outputs(5))
    obj = objective(sia_warmup_epochs=1.5)                             # 15 steps at 10 steps per epoch
    f = jax.jit(lambda s: obj.loss({}, out, {}, LossContext(s)))
    x = to_np(out)
    sim = np_report_sim(x["txt_emb"])
    valid = np.ones(B, bool)
    before, _ = np_sia(x["img_emb"], x["txt_emb"], sim, valid, 0.9, 0.07, False, "eliminate")
    after, _ = np_sia(x["img_emb"], x["txt_emb"], sim, valid, 0.9, 0.07, True, "eliminate")
    assert abs(before - after) > 1e-3
    for step, ref, active in [(0, before, 0.0), (14, before, 0.0), (15, after, 1.0), (40, after, 1.0)]:
        _, m = f(jnp.asarray(step, jnp.int32))
        np.testing.assert_allclose(float(m["loss/sia"]), ref, rtol=1e-5, err_msg=f"step {step}")
        assert float(m["sia/active"]) == active


def test_padding_and_special_tokens_change_nothing():
    out = with_near_duplicates(random_outputs(6))
    obj = objective(sta_word_weights="mgca", sia_warmup_epochs=0)
    ref, _ = run(obj, out)
    rng = np.random.default_rng(7)
    # Overwrite [CLS], [SEP] and padding slots (embeddings and attention), and append 3 padding slots.
    not_word = ~np.asarray(out.word_mask)
    w = np.where(not_word[..., None], rng.normal(size=out.word_emb.shape), np.asarray(out.word_emb))
    a = np.where(not_word, rng.uniform(size=out.word_attn.shape), np.asarray(out.word_attn))
    w = np.concatenate([w, rng.normal(size=(B, 3, D))], 1).astype(np.float32)
    a = np.concatenate([a, rng.uniform(size=(B, 3))], 1).astype(np.float32)
    pad = lambda m: jnp.concatenate([m, jnp.zeros((B, 3), bool)], 1)
    changed = out.replace(word_emb=jnp.asarray(w), word_attn=jnp.asarray(a), word_mask=pad(out.word_mask),
                          slot_mask=pad(out.slot_mask))
    got, _ = run(obj, changed)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    # Padded batch rows (valid False) with arbitrary content change nothing either.
    extra = random_outputs(8, b=2, n_words=(4, 1))
    stacked = jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v], 0), out, extra)
    valid = jnp.asarray([True] * B + [False] * 2)
    got, _ = run(obj, stacked, {"valid": valid})
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)


@pytest.mark.parametrize("variant", ["eliminate", "soft_positive"])
def test_batch_permutation_invariance(variant):
    out = with_near_duplicates(random_outputs(9))
    obj = objective(sia_variant=variant, sia_warmup_epochs=0, sta_word_weights="mgca")
    perm = np.array([3, 0, 4, 2, 1])
    ref, m_ref = run(obj, out)
    got, m = run(obj, jax.tree_util.tree_map(lambda x: x[perm], out))
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    assert float(m["sia/false_negative_fraction"]) == float(m_ref["sia/false_negative_fraction"]) > 0


@pytest.mark.parametrize("kw", [dict(sia_variant="eliminate"), dict(sia_variant="soft_positive"),
                                dict(sta_sparsify="topk", sta_topk=3, sta_word_weights="mgca")])
def test_gradients_match_finite_differences(kw):
    with jax.enable_x64(True):
        out = with_near_duplicates(random_outputs(10, dtype=np.float64))
        # A similarity source independent of the differentiated inputs, so that the (stop-gradient)
        # false-negative targets are constants for the finite differences too.
        sim_emb = jnp.asarray(np.asarray(out.txt_emb))
        obj = objective(sia_similarity="batch_emb", sia_warmup_epochs=0, **kw)

        def f(img, txt, words, patches):
            o = out.replace(img_emb=img, txt_emb=txt, word_emb=words, patch_emb=patches)
            return obj.loss({}, o, {"report_sim_emb": sim_emb}, LossContext(10))[0]

        _, m = obj.loss({}, out, {"report_sim_emb": sim_emb}, LossContext(10))
        assert float(m["sia/false_negative_fraction"]) > 0
        assert_grads_match_finite_differences(f, (out.img_emb, out.txt_emb, out.word_emb, out.patch_emb))


def test_config_validation_and_registration():
    assert "sista" in OBJECTIVES
    with pytest.raises(ValueError, match="word_to_patch"):
        objective(sta_sparsify="softmax", sta_direction="both")
    with pytest.raises(ValueError, match="unknown config keys"):
        objective(fn_treshold=0.8)
    with pytest.raises(ValueError, match="sia_variant"):
        objective(sia_variant="drop")


def test_check_metrics_warns_only_when_sia_has_no_negatives_after_the_warmup():
    check = objective(fn_threshold=0.8).check_metrics
    collapsed = {"sia/false_negative_fraction": 0.995, "sia/active": 1.0, "loss/sia": 0.0}
    warning = check(collapsed)
    assert list(warning) == ["sia_no_negatives"]
    assert "99.5%" in warning["sia_no_negatives"] and "fn_threshold=0.8" in warning["sia_no_negatives"]
    assert check({**collapsed, "sia/false_negative_fraction": 0.98}) == {}
    assert check({**collapsed, "sia/active": 0.5}) == {}          # the interval straddles the warm-up's end
    assert check({"loss/sia": 1.0}) == {}
    assert objective(lambda_sia=0.0).check_metrics(collapsed) == {}  # SIA is not trained: nothing lost


# ---- STA direction (issue 13): patches select their words ----------------------------------------------

def np_sta_p2w(word, patch, mask, valid, tau, sparsify="threshold", topk=16, threshold=None):
    """Patch -> word STA from the module docstring's equations, one loop per pair and patch."""
    b, p = patch.shape[:2]
    per_pair, betas = [], np.zeros((b, p, word.shape[1]))
    for bi in range(b):
        words = [k for k in range(word.shape[1]) if mask[bi, k]]
        groups = []
        for j in range(p):
            raw = np.array([np.dot(patch[bi, j], word[bi, k]) for k in words])
            s = (raw - raw.min()) / (raw.max() - raw.min() + 1e-6)
            if sparsify == "topk":
                order = sorted(range(len(words)), key=lambda i: -s[i])[:min(topk, len(words))]
                s = np.array([s[i] if i in order else 0.0 for i in range(len(words))])
            else:
                thr = 1.0 / len(words) if threshold is None else threshold
                s = np.array([v if v >= thr else 0.0 for v in s])
            w = s / s.sum() if s.sum() > 0 else np.eye(len(words))[int(np.argmax(raw))]
            betas[bi, j, words] = w
            v = sum(w[i] * word[bi, k] for i, k in enumerate(words))
            groups.append(v / np.linalg.norm(v))
        if not valid[bi]:
            continue
        ces = []
        for j in range(p):
            row = [np.dot(groups[j], patch[bi, l]) / tau for l in range(p)]
            col = [np.dot(patch[bi, j], groups[l]) / tau for l in range(p)]
            ces.append((-row[j] + np_logsumexp(row)) + (-col[j] + np_logsumexp(col)))
        per_pair.append(0.5 * np.mean(ces))
    return np.mean(per_pair), betas


@pytest.mark.parametrize("kw", [dict(), dict(sta_sparsify="topk", sta_topk=2), dict(sta_threshold=0.5)])
def test_sta_patch_to_word_and_both_match_numpy(kw):
    out = random_outputs(11, n_words=(1, 5, 2, 6, 4))               # report 0 has one word: the fallback
    valid = np.array([True, True, False, True, True])
    x = to_np(out)
    args = (x["word_emb"], x["patch_emb"], x["mask"])
    sparsify = (kw.get("sta_sparsify", "threshold"), kw.get("sta_topk", 16))
    p2w, betas = np_sta_p2w(*args, valid, 0.1, *sparsify, kw.get("sta_threshold"))
    w2p, alphas = np_sta(*args, x["word_attn"], valid, 0.1, *sparsify, "uniform", kw.get("sta_threshold"))
    batch = {"valid": jnp.asarray(valid)}
    ms = {d: run(objective(sta_direction=d, **kw), out, batch)[1] for d in ("word_to_patch", "patch_to_word", "both")}
    np.testing.assert_allclose(float(ms["patch_to_word"]["loss/sta"]), p2w, rtol=1e-5)
    np.testing.assert_allclose(float(ms["both"]["loss/sta"]), 0.5 * (p2w + w2p), rtol=1e-5)
    np.testing.assert_allclose(float(ms["word_to_patch"]["loss/sta"]), w2p, rtol=1e-5)
    assert abs(p2w - w2p) > 1e-3
    for d in ("patch_to_word", "both"):      # nothing but STA changes
        for k in ("loss/sia", "loss/i2t", "loss/t2i", "sia/false_negative_fraction"):
            assert float(ms[d][k]) == float(ms["word_to_patch"][k]), (d, k)
    maps = np.asarray(objective(sta_direction="patch_to_word", **kw).similarity_maps({}, out))
    np.testing.assert_allclose(maps, np.where(x["mask"][..., None], betas.transpose(0, 2, 1), 0.0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(objective(sta_direction="both", **kw).similarity_maps({}, out)),
                               np.where(x["mask"][..., None], alphas, 0.0), atol=1e-5)


def test_sta_default_direction_is_word_to_patch():
    out = with_near_duplicates(random_outputs(12))
    a, ma = run(objective(), out)
    b, mb = run(objective(sta_direction="word_to_patch"), out)
    assert sista.SistaConfig().sta_direction == "word_to_patch"
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for k in ma:
        np.testing.assert_array_equal(np.asarray(ma[k]), np.asarray(mb[k]), err_msg=k)


def test_sta_patch_to_word_gradients_match_finite_differences():
    with jax.enable_x64(True):
        out = random_outputs(13, dtype=np.float64)
        obj = objective(sta_direction="both", lambda_sia=0.0)

        def f(words, patches):
            return obj.loss({}, out.replace(word_emb=words, patch_emb=patches), {}, LossContext(10))[0]

        _, (gw, gp) = assert_grads_match_finite_differences(f, (out.word_emb, out.patch_emb))
        assert float(jnp.abs(gw).sum()) > 0 and float(jnp.abs(gp).sum()) > 0
    with pytest.raises(ValueError, match="sta_direction"):
        objective(sta_direction="patches")


# ---- STA with the batch's words as negatives (issue 10) --------------------------------------------------

def np_sta_batch(word, patch, mask, valid, tau):
    """word_to_patch STA whose softmaxes run over every valid word / group of every valid pair (loops)."""
    b, t, _ = word.shape
    p = patch.shape[1]
    c = {}
    for bi in range(b):
        for k in range(t):
            s = np.array([np.dot(word[bi, k], patch[bi, j]) for j in range(p)])
            s = (s - s.min()) / (s.max() - s.min() + 1e-6)
            s = np.array([v if v >= 1.0 / p else 0.0 for v in s])
            v = sum((s[j] / s.sum()) * patch[bi, j] for j in range(p))
            c[bi, k] = v / np.linalg.norm(v)
    keys = [(bi, k) for bi in range(b) for k in range(t) if mask[bi, k] and valid[bi]]
    per_pair = []
    for bi in range(b):
        if not valid[bi]:
            continue
        words = [k for k in range(t) if mask[bi, k]]
        total = 0.0
        for k in words:
            row = [np.dot(c[bi, k], word[key]) / tau for key in keys]
            col = [np.dot(word[bi, k], c[key]) / tau for key in keys]
            me = keys.index((bi, k))
            total += (1.0 / len(words)) * 0.5 * ((-row[me] + np_logsumexp(row)) + (-col[me] + np_logsumexp(col)))
        per_pair.append(total)
    return np.mean(per_pair)


@pytest.mark.parametrize("chunk", [None, 2])
def test_sta_batch_negatives_match_numpy(chunk):
    """sta_negatives="batch": every valid word of every valid pair competes (chunked or not); the maps and
    the SIA term are those of "pair"."""
    out = random_outputs(3)
    valid = np.array([True, False, True, True, True])
    batch = {"valid": jnp.asarray(valid)}
    _, m = run(objective(sta_negatives="batch", sta_chunk=chunk), out, batch)
    _, pair = run(objective(), out, batch)
    x = to_np(out)
    ref = np_sta_batch(x["word_emb"], x["patch_emb"], x["mask"], valid, 0.1)
    np.testing.assert_allclose(float(m["loss/sta"]), ref, rtol=1e-5)
    assert float(m["loss/sta"]) > float(pair["loss/sta"]) + 0.1       # more negatives, a larger CE
    assert float(m["loss/sia"]) == float(pair["loss/sia"])
    np.testing.assert_array_equal(objective(sta_negatives="batch").similarity_maps({}, out),
                                  objective().similarity_maps({}, out))


def test_sta_batch_negatives_gradients_match_finite_differences():
    with jax.enable_x64(True):
        out = random_outputs(11, dtype=np.float64)
        obj = objective(sta_negatives="batch", sta_chunk=2, lambda_sia=0.0)

        def f(words, patches):
            return obj.loss({}, out.replace(word_emb=words, patch_emb=patches), {}, LossContext(10))[0]

        assert_grads_match_finite_differences(f, (out.word_emb, out.patch_emb))
