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
from medvlp_jax.types import LossContext

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
    return jax.jit(lambda o, batch, step, t: obj.loss({}, o, batch, LossContext(step, teacher_out=t)))


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


def np_map(word, patches, tau, teacher=None, gamma=0.5, extra=None):
    """A over patches for one word (optionally times the teacher map ** gamma and an ``extra`` prior over the
    patches, renormalised)."""
    a = np_softmax([np.dot(word, pk) / tau for pk in patches])
    if teacher is not None:
        t_word, t_patches = teacher
        abar = np_softmax([np.dot(t_word, pk) / tau for pk in t_patches])
        a = a * abar ** gamma
        a = a / a.sum()
    if extra is not None:
        a = a * extra
        a = a / a.sum()
    return a


def np_pixel_importance(words, omega0, patches, tau):
    """pi over the patches of one image for one report: softmax_k(sum_t omega0_t <w_t, p_k> / tau)."""
    return np_softmax([sum(omega0[k] * np.dot(words[k], pk) for k in range(len(words))) / tau for pk in patches])


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
            rho_ns=0.3, eta=0.9, gamma=0.5, weights="mgca", pixel_beta=0.0, run_prior=None, run_gamma=0.0):
    """Returns {"itc", "loc", "cons", "kept"} for a stage (1, 2 or 3), from the equations.

    pixel_beta: pixel-importance exponent; run_prior, run_gamma: running map prior m [p] and its exponent."""
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
    omega0 = [np_mgca_weights(attn[a], mask[a]) if weights == "mgca" else mask[a] / mask[a].sum() for a in range(b)]

    def extra(a, bb):
        e = np.ones(p)
        if pixel_beta:
            e = e * np_pixel_importance(W[a], omega0[a], Pt[bb], tau) ** pixel_beta
        if run_gamma:
            e = e * np.asarray(run_prior, np.float64) ** run_gamma
        return e if (pixel_beta or run_gamma) else None
    # Words kept: entropy of the positive-pair (prior-refined) map.
    kept = np.zeros((b, t), bool)
    for a in range(b):
        for k in range(t):
            if mask[a, k]:
                am = np_map(W[a, k], Pt[a], tau, prior(a, k, a), gamma, extra(a, a))
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
                am = np_map(W[a, k], Pt[bb], tau, prior(a, k, bb), gamma, extra(a, bb))
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
                {}, out.replace(img_emb=img, txt_emb=txt, word_emb=w, patch_emb=p), {},
                LossContext(step, teacher_out=teacher))[0]

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
        {}, out.replace(word_emb=w, patch_emb=pt), {}, LossContext(20, teacher_out=out))[0]
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
        jax.jit(lambda o: obj.loss({}, o, {}, LossContext(0)))(out)
    with pytest.raises(ValueError, match="ema_decay"):
        objective(ema_decay=None)
    # Without stage 3 no teacher is needed.
    no3 = objective(stage3_start_epoch=None, ema_decay=None)
    assert no3.ema_decay is None
    total, m = jax.jit(lambda o: no3.loss({}, o, {}, LossContext(100)))(out)
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


# ---- issue 13: pixel importance, running map prior, the ResNet path ------------------------------------

@functools.lru_cache(maxsize=None)
def jitted_loss_with_params(obj):
    return jax.jit(lambda prm, o, batch, step, t: obj.loss(prm, o, batch, LossContext(step, teacher_out=t)))


def run_p(obj, prm, out, step, teacher=None, batch=None):
    return jitted_loss_with_params(obj)(prm, out, batch or {}, jnp.asarray(step, jnp.int32),
                                        teacher if teacher is not None else out)


def test_pixel_importance_matches_numpy_and_changes_only_the_local_maps():
    out = random_outputs(20)
    teacher = teacher_of(out)
    eta = entropy_quantile_eta(out)
    on, off = objective(ns_entropy=eta, pixel_importance=1.5), objective(ns_entropy=eta)
    assert plan.PlanConfig().pixel_importance == 0.0
    for step, stage in ((6, 2), (13, 3)):
        ref = np_plan(out, stage, teacher=teacher, eta=eta, pixel_beta=1.5)
        _, m = run(on, out, step, teacher)
        _, m_off = run(off, out, step, teacher)
        np.testing.assert_allclose(float(m["loss/loc"]), ref["loc"], rtol=1e-4, err_msg=str(step))
        np.testing.assert_allclose(float(m["plan/kept_words"]), ref["kept"], rtol=1e-6)
        assert abs(float(m["loss/loc"]) - float(m_off["loss/loc"])) > 1e-4
        for k in ("loss/itc", "loss/cons", "plan/lambda_loc", "plan/tau_w"):   # L_cons reads the raw maps
            assert float(m[k]) == float(m_off[k]), (step, k)
    # The maps handed to grounding carry the same prior.
    maps = np.asarray(jax.jit(on.similarity_maps)({}, out))
    W, Pt, mask = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64), np.asarray(out.word_mask)
    attn = np.asarray(out.word_attn, np.float64)
    for i in range(B):
        pi = np_pixel_importance(W[i], np_mgca_weights(attn[i], mask[i]), Pt[i], 0.05)
        for k in np.flatnonzero(mask[i]):
            a = np_map(W[i, k], Pt[i], 0.05, extra=pi ** 1.5)
            a = np.where(a >= 0.3 * a.max(), a, 0.0)
            np.testing.assert_allclose(maps[i, k], a / a.sum(), atol=1e-5)


def np_batch_map(out, valid, tau):
    W, Pt, mask = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64), np.asarray(out.word_mask)
    maps = [np_map(W[i, k], Pt[i], tau) for i in range(len(W)) for k in range(W.shape[1]) if mask[i, k] and valid[i]]
    return np.mean(maps, axis=0)


def test_running_prior_refines_the_maps_and_its_update_matches_numpy():
    out = random_outputs(21)
    teacher = teacher_of(out)
    eta = entropy_quantile_eta(out)
    obj = objective(ns_entropy=eta, running_prior_gamma=0.7, running_prior_momentum=0.9)
    prm0 = obj.init(jax.random.PRNGKey(0), out)
    np.testing.assert_allclose(prm0["map_prior"], np.full(P, 1.0 / P), rtol=1e-7)
    assert obj.trainable(0) == {"map_prior": False} and objective().update_state is None
    m = np.random.default_rng(22).dirichlet(np.ones(P)).astype(np.float32)
    prm = {"map_prior": jnp.asarray(m)}
    valid = np.array([True, True, False, True, True])
    batch = {"valid": jnp.asarray(valid)}
    _, m_off = run(objective(ns_entropy=eta), out, 13, teacher, batch)
    for step, stage, tau in ((0, 1, 0.1), (6, 2, 0.1), (13, 3, 0.05)):
        _, got = run_p(obj, prm, out, step, teacher, batch)
        ref = np_plan(out, stage, valid=valid, teacher=teacher, eta=eta, run_prior=m, run_gamma=0.7)
        np.testing.assert_allclose(float(got["loss/loc"]), ref["loc"], rtol=1e-4, atol=1e-7, err_msg=str(step))
        np.testing.assert_allclose(np.asarray(got["plan/map_batch"]), np_batch_map(out, valid, tau), atol=1e-6)
        np.testing.assert_allclose(float(got["plan/map_prior_entropy"]), -np.sum(m * np.log(m)), rtol=1e-5)
    for k in ("loss/itc", "loss/cons"):
        assert float(got[k]) == float(m_off[k]), k
    new, rest = obj.update_state(prm, got)
    np.testing.assert_allclose(new["map_prior"], 0.9 * m + 0.1 * np.asarray(got["plan/map_batch"]), rtol=1e-6)
    assert "plan/map_batch" not in rest and "plan/map_batch" in got and set(rest) == set(got) - {"plan/map_batch"}
    # A batch without a valid word leaves the prior where it is.
    _, none = run_p(obj, prm, out, 6, teacher, {"valid": jnp.zeros(B, bool)})
    np.testing.assert_allclose(np.asarray(none["plan/map_batch"]), m, rtol=1e-7)


class _FakeModel:
    """Stands in for the DualEncoder: embeddings are free parameters (normalised), masks come from the batch."""

    def apply(self, variables, batch, train=True, rngs=None, mutable=None):
        del train, rngs, mutable
        p = variables["params"]
        n = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        return EncoderOutputs(
            img_emb=n(p["img"]), txt_emb=n(p["txt"]), patch_emb=n(p["patch"]), word_emb=n(p["word"]),
            word_mask=batch["word_mask"], slot_mask=batch["slot_mask"], word_attn=batch["word_attn"],
            patch_attn=None, img_feat=None, txt_feat=None, patch_feat=None, word_feat=None, grid=(2, P // 2))


def test_train_step_carries_the_running_prior_without_gradient():
    import optax

    from medvlp_jax import sharding as sharding_lib
    from medvlp_jax.train.state import TrainState
    from medvlp_jax.train import optim
    from medvlp_jax.train.step import make_train_step

    b = 8                                                         # one row per (fake CPU) device
    out = random_outputs(23, b=b, n_words=(3, 5, 2, 4, 1, 2, 5, 3))
    obj = objective(stage2_start_epoch=0, stage3_start_epoch=None, running_prior_gamma=0.5,
                    running_prior_momentum=0.8)
    enc = {"img": out.img_emb, "txt": out.txt_emb, "patch": out.patch_emb, "word": out.word_emb}
    params = {"encoders": enc, "method": obj.init(jax.random.PRNGKey(1), out)}
    # decay would show if the prior were optimised; frozen as train.setup.build freezes it
    tx = optim.freeze_objective_leaves(optax.adamw(1e-2, weight_decay=0.5), obj)
    state0 = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={}, opt_state=tx.init(params),
                        rng=jax.random.PRNGKey(0), ema_params=None, nonfinite_steps=jnp.zeros((), jnp.int32))
    batch = {"word_mask": out.word_mask, "slot_mask": out.slot_mask, "word_attn": out.word_attn,
             "valid": jnp.ones((b,), bool)}
    train_step = make_train_step(_FakeModel(), obj, tx, lambda s: 1e-2)
    step = jax.jit(train_step)
    state = state0
    for _ in range(3):
        prior = np.asarray(state.params["method"]["map_prior"])
        o = _FakeModel().apply({"params": state.params["encoders"]}, batch)
        _, m = obj.loss(state.params["method"], o, batch, LossContext(state.step))
        state, metrics = step(state, batch)
        want = 0.8 * prior + 0.2 * np.asarray(m["plan/map_batch"])
        np.testing.assert_allclose(state.params["method"]["map_prior"], want, rtol=1e-5, atol=1e-7)
        assert "plan/map_batch" not in metrics and "plan/map_prior_entropy" in metrics
    assert np.abs(np.asarray(state.params["method"]["map_prior"]) - 1.0 / P).max() > 1e-4
    # A non-finite step leaves the prior (like every parameter) untouched.
    enc_bad = dict(state.params["encoders"], img=state.params["encoders"]["img"].at[0, 0].set(jnp.nan))
    bad = state.replace(params=dict(state.params, encoders=enc_bad))
    after_bad, bad_metrics = step(bad, batch)
    assert float(bad_metrics["train/finite"]) == 0.0
    np.testing.assert_array_equal(after_bad.params["method"]["map_prior"], state.params["method"]["map_prior"])
    # The batch sharded over the devices gives the same prior (a global mean under jit).
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))     # as training builds it
    assert mesh.size > 1 and b % mesh.size == 0                  # tests/conftest.py: 8 CPU devices
    sharded = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
    s1, _ = jax.jit(train_step, in_shardings=(sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)),
                    out_shardings=(sharding_lib.replicated(mesh), sharding_lib.replicated(mesh)))(state0, sharded)
    s2, _ = step(state0, batch)
    np.testing.assert_allclose(s1.params["method"]["map_prior"], s2.params["method"]["map_prior"],
                               rtol=1e-6, atol=1e-8)


def test_resnet_variant_is_the_papers_encoder_family():
    from configs import plan as plan_config
    from medvlp_jax.models import dual_encoder as de

    c = plan_config.get_config("image=resnet")                    # paper variant
    img = c.model.image
    assert c.variant == "paper" and img.name == "resnet50" and img.resize_to == 299
    assert tuple(img.stage_sizes) == (3, 4, 6, 3) and img.width == 64 and c.data.crop == 224
    assert c.method.name == "plan" and plan_config.get_config().model.image.name == "vit"
    model = de.build_model(c.model)
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), de.example_batch(c.model, 1, 8))
    o, _ = jax.eval_shape(lambda bt: model.init_with_output(jax.random.key(0), bt, train=False), batch)
    assert o.grid == (19, 19) and o.patch_emb.shape == (1, 361, c.model.proj.dim)
    assert o.img_feat.shape == (1, 2048) and o.patch_feat.shape == (1, 361, 1024) and o.patch_attn is None
