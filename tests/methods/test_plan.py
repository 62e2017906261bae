"""PLAN objective: local term, noise suppression, teacher prior, consistency and the progressive schedule
against loop-by-loop NumPy references (methods.md section 7.2); chunked == unchunked; no [b, b, t, p]."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medvlp_jax.methods import OBJECTIVES, make_objective, plan
from medvlp_jax.types import EncoderOutputs

B, T, P, D = 5, 7, 6, 5
N_WORDS = (3, 5, 2, 4, 1)        # slot 0 = [CLS], 1..n = words, n + 1 = [SEP], rest padding
SPE = 4                          # steps per epoch in the schedule tests


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


def teacher_of(out, seed=100, noise=0.3):
    """A different but related set of outputs standing in for the EMA encoders."""
    rng = np.random.default_rng(seed)

    def nudge(x):
        x = np.asarray(x, np.float64) + noise * rng.normal(size=x.shape)
        return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), out.word_emb.dtype)

    return out.replace(word_emb=nudge(out.word_emb), patch_emb=nudge(out.patch_emb))


def objective(**kw):
    base = dict(name="plan", stage2_start_epoch=1, stage3_start_epoch=3, loc_ramp_epochs=2, text_chunk=2)
    base.update(kw)
    return make_objective(ml_collections.ConfigDict(base), steps_per_epoch=SPE)


@functools.lru_cache(maxsize=None)
def jitted_loss(obj):
    return jax.jit(lambda o, batch, step, t: obj.loss({}, o, batch, step, teacher_out=t))


def run(obj, out, step, teacher=None, batch=None):
    return jitted_loss(obj)(out, batch or {}, jnp.asarray(step, jnp.int32), teacher if teacher is not None else out)


def assert_grads_match_finite_differences(f, args, eps=1e-6, n_dirs=2, rtol=1e-5, atol=1e-7, seed=0):
    """Directional derivatives of f (float64) by central differences vs the analytic gradient."""
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


def np_softmax(x):
    e = np.exp(np.asarray(x) - np.max(x))
    return e / e.sum()


def np_map(word, patches, tau, teacher=None, gamma=0.5):
    """A over patches for one word (optionally times the teacher map ** gamma, renormalised)."""
    a = np_softmax([np.dot(word, pk) / tau for pk in patches])
    if teacher is not None:
        t_word, t_patches = teacher
        abar = np_softmax([np.dot(t_word, pk) / tau for pk in t_patches])
        a = a * abar ** gamma
        a = a / a.sum()
    return a


def np_mgca_weights(attn_row, mask_row, lo=0.1, hi=0.9):
    vals = np.array([attn_row[k] for k in range(len(attn_row)) if mask_row[k]], np.float64)
    qlo, qhi = np.quantile(vals, lo), np.quantile(vals, hi)
    w = np.array([min(max(attn_row[k], qlo), qhi) if mask_row[k] else 0.0 for k in range(len(attn_row))])
    return w / w.sum()


def np_bidir_sum(logits, valid):
    rows = [i for i in range(len(logits)) if valid[i]]
    i2t = np.mean([-logits[i][i] + np_logsumexp([logits[i][j] for j in rows]) for i in rows])
    t2i = np.mean([-logits[i][i] + np_logsumexp([logits[j][i] for j in rows]) for i in rows])
    return i2t + t2i


def np_plan(out, stage, valid=None, teacher=None, tau_w2=0.1, tau_w3=0.05, tau_agg=5.0, tau_r=0.1,
            rho_ns=0.3, eta=0.9, gamma=0.5, weights="mgca"):
    """Returns {"itc", "loc", "cons", "kept"} for a stage (1, 2 or 3), from the equations."""
    f = lambda x: np.asarray(x, np.float64)
    img, txt, W, Pt, attn = f(out.img_emb), f(out.txt_emb), f(out.word_emb), f(out.patch_emb), f(out.word_attn)
    mask = np.asarray(out.word_mask)
    b, t, p = W.shape[0], W.shape[1], Pt.shape[1]
    valid = np.ones(b, bool) if valid is None else valid
    res = {"itc": np_bidir_sum([[np.dot(img[i], txt[j]) / 0.07 for j in range(b)] for i in range(b)], valid),
           "loc": 0.0, "cons": 0.0, "kept": 0.0}
    if stage == 1:
        return res
    tau = tau_w2 if stage == 2 else tau_w3
    tW, tP = (f(teacher.word_emb), f(teacher.patch_emb)) if stage == 3 else (None, None)
    prior = (lambda a, k, bb: (tW[a, k], tP[bb])) if stage == 3 else (lambda a, k, bb: None)
    # Words kept: entropy of the positive-pair (prior-refined) map.
    kept = np.zeros((b, t), bool)
    for a in range(b):
        for k in range(t):
            if mask[a, k]:
                am = np_map(W[a, k], Pt[a], tau, prior(a, k, a), gamma)
                kept[a, k] = -np.sum(am * np.log(am)) <= eta * math.log(p)
        if not kept[a].any():
            kept[a] = mask[a]
    omega = np.zeros((b, t))
    for a in range(b):
        base = np_mgca_weights(attn[a], mask[a]) if weights == "mgca" else mask[a] / mask[a].sum()
        omega[a] = np.where(kept[a], base, 0.0)
        omega[a] /= omega[a].sum()
    R = np.zeros((b, b))
    for a in range(b):
        for bb in range(b):
            terms = []
            for k in range(t):
                if not kept[a, k]:
                    continue
                am = np_map(W[a, k], Pt[bb], tau, prior(a, k, bb), gamma)
                am = np.where(am >= rho_ns * am.max(), am, 0.0)      # noise suppression (stage >= 2)
                am = am / am.sum()
                rho = sum(am[j] * Pt[bb, j] for j in range(p))
                rho = rho / np.linalg.norm(rho)
                terms.append(math.log(omega[a, k]) + tau_agg * np.dot(W[a, k], rho))
            R[a, bb] = np_logsumexp(terms) / tau_agg
    res["loc"] = np_bidir_sum([[R[bb, a] / tau_r for bb in range(b)] for a in range(b)], valid)  # rows = images
    res["kept"] = kept[valid].sum() / mask[valid].sum()
    if stage == 3:
        kls = []
        for a in range(b):
            for k in range(t):
                if mask[a, k] and valid[a]:
                    s = np_map(W[a, k], Pt[a], tau)
                    tb = np_map(tW[a, k], tP[a], tau)
                    kls.append(float(np.sum(tb * (np.log(tb) - np.log(s)))))
        res["cons"] = np.mean(kls)
    return res


def entropy_quantile_eta(out, tau=0.1, q=0.5):
    """An eta that drops about half of the words, so that the entropy rule is exercised."""
    W, Pt, mask = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64), np.asarray(out.word_mask)
    ents = [-np.sum((a := np_map(W[i, k], Pt[i], tau)) * np.log(a)) for i in range(len(W))
            for k in range(W.shape[1]) if mask[i, k]]
    return float(np.quantile(ents, q) / math.log(Pt.shape[1])) + 1e-4


# ---- tests ------------------------------------------------------------------------------------------------

def test_schedule_and_every_term_match_numpy():
    """Stages switch at the configured steps; each stage's terms equal the loop reference."""
    out = random_outputs(0)
    teacher = teacher_of(out)
    eta = entropy_quantile_eta(out)
    obj = objective(ns_entropy=eta)
    ref = {s: np_plan(out, s, teacher=teacher, eta=eta) for s in (1, 2, 3)}
    assert 0.2 < ref[2]["kept"] < 0.9                        # the entropy rule dropped some words, not all
    assert ref[3]["cons"] > 1e-3
    # stage 2 starts at step 4 (epoch 1), the ramp lasts 8 steps (2 epochs), stage 3 starts at step 12.
    for step, stage, lam_loc in [(0, 1, 0.0), (3, 1, 0.0), (4, 2, 0.0), (6, 2, 0.25), (11, 2, 0.875),
                                 (12, 3, 1.0), (30, 3, 1.0)]:
        total, m = run(obj, out, step, teacher)
        r = ref[stage]
        assert float(m["plan/stage"]) == stage, step
        np.testing.assert_allclose(float(m["plan/lambda_loc"]), lam_loc, atol=1e-7, err_msg=str(step))
        np.testing.assert_allclose(float(m["loss/itc"]), r["itc"], rtol=1e-5)
        np.testing.assert_allclose(float(m["loss/loc"]), r["loc"], rtol=1e-4, atol=1e-6, err_msg=str(step))
        np.testing.assert_allclose(float(m["loss/cons"]), r["cons"], rtol=1e-4, atol=1e-6, err_msg=str(step))
        lam_cons = 0.1 if stage == 3 else 0.0
        np.testing.assert_allclose(float(total), r["itc"] + lam_loc * r["loc"] + lam_cons * r["cons"], rtol=1e-5)
        np.testing.assert_allclose(float(m["plan/tau_w"]), 0.05 if stage == 3 else 0.1, rtol=1e-7)
        if stage > 1:
            np.testing.assert_allclose(float(m["plan/kept_words"]), r["kept"], rtol=1e-6)


def test_uniform_weights_and_padded_rows_match_numpy():
    out = random_outputs(1)
    valid = np.array([True, True, False, True, True])
    obj = objective(word_weights="uniform", stage3_start_epoch=None, ns_entropy=1.0)
    _, m = run(obj, out, 8, batch={"valid": jnp.asarray(valid)})
    ref = np_plan(out, 2, valid=valid, weights="uniform", eta=1.0)
    np.testing.assert_allclose(float(m["loss/loc"]), ref["loc"], rtol=1e-4)
    np.testing.assert_allclose(float(m["loss/itc"]), ref["itc"], rtol=1e-5)


def test_chunked_equals_unchunked_and_gradients_match_finite_differences():
    with jax.enable_x64(True):
        out = random_outputs(2, dtype=np.float64)
        teacher = teacher_of(out)
        step = 12 * 1                                          # stage 3: prior, suppression and consistency

        def loss_fn(chunk):
            obj = objective(text_chunk=chunk, ns_entropy=entropy_quantile_eta(out))
            return lambda img, txt, w, p: obj.loss(
                {}, out.replace(img_emb=img, txt_emb=txt, word_emb=w, patch_emb=p), {}, step, teacher_out=teacher)[0]

        args = (out.img_emb, out.txt_emb, out.word_emb, out.patch_emb)
        v_full, g_full = jax.jit(jax.value_and_grad(loss_fn(None), argnums=(0, 1, 2, 3)))(*args)
        v_chunk, g_chunk = assert_grads_match_finite_differences(loss_fn(2), args)   # 5 reports: chunks 2+2+1(+1 pad)
        np.testing.assert_allclose(float(v_chunk), float(v_full), rtol=1e-12)
        for a, b in zip(g_chunk, g_full):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
        assert float(jnp.abs(g_chunk[2]).sum()) > 0 and float(jnp.abs(g_chunk[3]).sum()) > 0


def _max_intermediate_size(jaxpr) -> int:
    """Largest array produced by any equation, sub-jaxprs (lax.map, checkpoint, switch) included."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, int(np.prod(getattr(v.aval, "shape", ()) or (1,))))
        for p in eqn.params.values():
            subs = p if isinstance(p, (list, tuple)) else [p]
            for sub in subs:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    best = max(best, _max_intermediate_size(sub.jaxpr))
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    best = max(best, _max_intermediate_size(sub))
    return best


def test_chunked_gradient_never_builds_a_full_batch_local_tensor():
    b, t, p, d = 6, 5, 7, 4
    out = random_outputs(3, b=b, t=t, p=p, d=d, n_words=(2, 3, 1, 3, 2, 1))
    f = lambda chunk: lambda w, pt: objective(text_chunk=chunk).loss(
        {}, out.replace(word_emb=w, patch_emb=pt), {}, 20, teacher_out=out)[0]
    sizes = {c: _max_intermediate_size(jax.make_jaxpr(jax.grad(f(c), argnums=(0, 1)))(out.word_emb, out.patch_emb).jaxpr)
             for c in (None, 2)}
    assert sizes[None] >= b * b * t * p                       # the reference path does build it ...
    assert sizes[2] < b * b * t * p // 2                       # ... the chunked one never does


def test_stage3_without_teacher_raises_and_ema_decay_is_set():
    out = random_outputs(4)
    obj = objective()
    assert obj.ema_decay == 0.999
    assert objective(ema_decay=0.99).ema_decay == 0.99
    with pytest.raises(ValueError, match="ema_decay"):
        jax.jit(lambda o: obj.loss({}, o, {}, 0, teacher_out=None))(out)
    with pytest.raises(ValueError, match="ema_decay"):
        objective(ema_decay=None)
    # Without stage 3 no teacher is needed.
    no3 = objective(stage3_start_epoch=None, ema_decay=None)
    assert no3.ema_decay is None
    total, m = jax.jit(lambda o: no3.loss({}, o, {}, 100, teacher_out=None))(out)
    assert float(m["plan/stage"]) == 2 and np.isfinite(float(total))


def test_padding_and_special_tokens_change_nothing():
    out = random_outputs(5)
    teacher = teacher_of(out)
    obj = objective(ns_entropy=entropy_quantile_eta(out))
    ref, _ = run(obj, out, 13, teacher)
    rng = np.random.default_rng(6)
    not_word = ~np.asarray(out.word_mask)

    def scramble(o):
        w = np.where(not_word[..., None], rng.normal(size=o.word_emb.shape), np.asarray(o.word_emb))
        return o.replace(word_emb=jnp.asarray(w, jnp.float32))

    a = np.where(not_word, rng.uniform(size=out.word_attn.shape), np.asarray(out.word_attn)).astype(np.float32)
    got, _ = run(obj, scramble(out).replace(word_attn=jnp.asarray(a)), 13, scramble(teacher))
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    extra = random_outputs(7, n_words=(2, 2, 3, 1, 4))
    cat = lambda u, v: jax.tree_util.tree_map(lambda x, y: jnp.concatenate([x, y[:2]], 0), u, v)
    got, _ = run(obj, cat(out, extra), 13, cat(teacher, teacher_of(extra)),
                 batch={"valid": jnp.asarray([True] * B + [False] * 2)})
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)


def test_batch_permutation_invariance():
    out = random_outputs(8)
    teacher = teacher_of(out)
    obj = objective(ns_entropy=entropy_quantile_eta(out))
    perm = np.array([4, 2, 0, 1, 3])
    p = lambda o: jax.tree_util.tree_map(lambda x: x[perm], o)
    for step in (6, 13):
        ref, _ = run(obj, out, step, teacher)
        got, _ = run(obj, p(out), step, p(teacher))
        np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)


def test_similarity_maps_are_suppressed_soft_maps():
    out = random_outputs(9)
    maps = np.asarray(jax.jit(objective().similarity_maps)({}, out))
    W, Pt, mask = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64), np.asarray(out.word_mask)
    for i in range(B):
        for k in range(T):
            if not mask[i, k]:
                assert np.all(maps[i, k] == 0)
                continue
            a = np_map(W[i, k], Pt[i], 0.05)                   # last stage's tau_w, suppression on
            a = np.where(a >= 0.3 * a.max(), a, 0.0)
            np.testing.assert_allclose(maps[i, k], a / a.sum(), atol=1e-5)


def test_config_validation_and_registration():
    assert "plan" in OBJECTIVES
    with pytest.raises(ValueError, match="unknown config keys"):
        objective(tau_w=0.1)
    with pytest.raises(ValueError, match="stage3_start_epoch"):
        objective(stage2_start_epoch=5, stage3_start_epoch=2)
    assert isinstance(plan.PlanConfig(), plan.PlanConfig)
