"""MGCA objective vs a loop-by-loop NumPy transcription of the authors' loss (methods.md section 4)."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medvlp_jax.methods import OBJECTIVES, make_objective, mgca
from medvlp_jax.types import EncoderOutputs
from medvlp_jax.types import LossContext
from tests.helpers import assert_trees_close

B, T, P, D, K = 4, 7, 6, 5, 8
N_WORDS = (2, 5, 1, 3)       # slot 0 = [CLS], 1..n = words, n + 1 = [SEP] (text 1 fills all 7 slots), rest padding
STEPS_PER_EPOCH = 10


def random_outputs(seed, b=B, t=T, p=P, d=D, n_words=N_WORDS, cnn=False, dtype=np.float32, pad_seed=None):
    """EncoderOutputs from random arrays, embeddings L2-normalised.

    Every slot has a unit vector (MGCA's local head makes padding non-zero); ``pad_seed`` redraws only the
    padding slots. word_attn is positive on occupied slots except text 0's [SEP], which is 0 (as MGCA's
    off-by-one attention gives it), so "non-zero entries" and "occupied slots" differ there.
    """
    rng = np.random.default_rng(seed)

    def unit(*shape, r=rng):
        x = r.normal(size=shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    n = np.asarray(n_words)[:, None]
    pos = np.arange(t)[None, :]
    word_mask = (pos >= 1) & (pos <= n)
    slot_mask = pos <= n + 1
    word_emb = unit(b, t, d)
    if pad_seed is not None:
        word_emb = np.where(slot_mask[:, :, None], word_emb, unit(b, t, d, r=np.random.default_rng(pad_seed)))
    word_attn = np.where(slot_mask, rng.uniform(0.01, 1.0, size=(b, t)), 0.0)
    word_attn[0, n_words[0] + 1] = 0.0
    patch_attn = None if cnn else jnp.asarray(rng.uniform(0.001, 0.2, size=(b, p)), dtype)
    cast = lambda x: jnp.asarray(x, dtype)
    return EncoderOutputs(
        img_emb=cast(unit(b, d)), txt_emb=cast(unit(b, d)), patch_emb=cast(unit(b, p, d)), word_emb=cast(word_emb),
        word_mask=jnp.asarray(word_mask), slot_mask=jnp.asarray(slot_mask), word_attn=cast(word_attn),
        patch_attn=patch_attn, img_feat=None, txt_feat=None, patch_feat=None, word_feat=None, grid=(2, p // 2))


def random_prototypes(seed, k=K, d=D, dtype=np.float32):
    x = np.random.default_rng(seed).normal(size=(k, d))
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), dtype)


@functools.lru_cache(maxsize=None)
def _objective(items):
    cfg = dict(name="mgca", num_prototypes=K, **dict(items))
    return make_objective(ml_collections.ConfigDict(cfg), steps_per_epoch=STEPS_PER_EPOCH)


def objective(**kw):
    return _objective(tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _jitted(obj):
    return jax.jit(lambda params, o, batch, step: obj.loss(params, o, batch, LossContext(step)))


def run(obj, out, protos, batch=None, step=100):
    return _jitted(obj)({"prototypes": protos}, out, batch or {}, step)


# ---- NumPy reference ------------------------------------------------------------------------------------------

def lse(v):
    v = np.asarray(v, np.float64)
    m = v.max()
    return m + np.log(np.exp(v - m).sum())


def np_clip_weights(x, support, lo=0.1, hi=0.9):
    """MGCA: clip the supported entries to their own torch-linear quantiles, zeros stay, normalise."""
    w = np.zeros(len(x))
    idx = np.nonzero(support)[0]
    vals = np.asarray(x, np.float64)[idx]
    w[idx] = np.clip(vals, np.quantile(vals, lo), np.quantile(vals, hi))
    return w / w.sum()


def np_sinkhorn(scores, eps, iters):
    q = np.exp(scores.T / eps)
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q *= (1.0 / k) / q.sum(axis=1, keepdims=True)
        q *= (1.0 / b) / q.sum(axis=0, keepdims=True)
    return (q / q.sum(axis=0, keepdims=True)).T


def np_ita(img, txt, tau, reduce="sum"):
    S = img @ txt.T / tau
    n = len(S)
    i2t = np.mean([lse(S[i]) - S[i, i] for i in range(n)])
    t2i = np.mean([lse(S[:, j]) - S[j, j] for j in range(n)])
    return i2t + t2i if reduce == "sum" else (i2t + t2i) / 2


def np_pair_masks(out, b, word_slots):
    a = np.asarray(out.word_attn, np.float64)[b, 1:]
    occ = np.asarray(out.slot_mask)[b, 1:]
    words = np.asarray(out.word_mask)[b, 1:]
    if word_slots == "all":
        return np.ones_like(occ), a != 0, occ
    m = occ if word_slots == "occupied" else words
    return m, m, m


def np_local_vectors(out, b, tau, word_slots, patch_norm):
    f = lambda x: np.asarray(x, np.float64)
    w, p = f(out.word_emb)[b, 1:], f(out.patch_emb)[b]
    neg, support, keys = np_pair_masks(out, b, word_slots)
    o = []
    for t in range(len(w)):
        A = np.exp([w[t] @ p[k] / tau for k in range(len(p))])
        v = (A / A.sum()) @ p
        o.append(v / np.linalg.norm(v))
    q = []
    kidx = np.nonzero(keys)[0]
    for k in range(len(p)):
        Bk = np.exp([p[k] @ w[t] / tau for t in kidx])
        v = (Bk / Bk.sum()) @ w[kidx]
        q.append(v / np.linalg.norm(v) if patch_norm else v)
    omega = np_clip_weights(f(out.word_attn)[b, 1:], support)
    if out.patch_attn is None:
        pi = np.full(len(p), 1.0 / len(p))
    else:
        pi = np_clip_weights(f(out.patch_attn)[b], np.ones(len(p), bool))
    return w, np.array(o), neg, omega, p, np.array(q), pi


def np_pair_ce(x, y, neg, weight, tau):
    """sum_t weight_t CE(<x_t, y_:>, t) and sum_s weight_s CE(<x_:, y_s>, s); negatives where neg (or self)."""
    n = len(x)
    l1 = sum(weight[t] * (lse([x[t] @ y[s] / tau for s in range(n) if neg[s] or s == t]) - x[t] @ y[t] / tau)
             for t in range(n))
    l2 = sum(weight[s] * (lse([x[t] @ y[s] / tau for t in range(n) if neg[t] or t == s]) - x[s] @ y[s] / tau)
             for s in range(n))
    return l1, l2


def np_batch_ce(xs, ys, negs, weights, tau):
    """The same over all tokens of all pairs (local_negatives='batch'); item (b, t) matches (b, t)."""
    items = [(b, t) for b in range(len(xs)) for t in range(len(xs[b]))]
    l1 = l2 = 0.0
    for (b, t) in items:
        cols = [(c, s) for (c, s) in items if negs[c][s] or (c, s) == (b, t)]
        l1 += weights[b][t] * (lse([xs[b][t] @ ys[c][s] / tau for c, s in cols]) - xs[b][t] @ ys[b][t] / tau)
        l2 += weights[b][t] * (lse([ys[b][t] @ xs[c][s] / tau for c, s in cols]) - xs[b][t] @ ys[b][t] / tau)
    return l1, l2


def np_cpa(img, txt, C, tau_p, eps, iters):
    s_i, s_r = img @ C.T, txt @ C.T
    q_i, q_r = np_sinkhorn(s_i, eps, iters), np_sinkhorn(s_r, eps, iters)
    logsm = lambda s: s / tau_p - np.array([lse(r / tau_p) for r in s])[:, None]
    i2t = -np.mean(np.sum(q_i * logsm(s_r), axis=1))
    t2i = -np.mean(np.sum(q_r * logsm(s_i), axis=1))
    return (i2t + t2i) / 2


def np_mgca(out, protos, word_slots="all", patch_norm=None, ita_reduce="sum", negatives="pair",
            lambdas=(1.0, 1.0, 1.0), tau_g=0.07, tau_l=0.1, tau_p=0.2, eps=0.05, iters=3):
    f = lambda x: np.asarray(x, np.float64)
    b = out.img_emb.shape[0]
    if patch_norm is None:
        patch_norm = out.patch_attn is None
    l_ita = np_ita(f(out.img_emb), f(out.txt_emb), tau_g, ita_reduce)
    vecs = [np_local_vectors(out, i, tau_l, word_slots, patch_norm) for i in range(b)]
    if negatives == "pair":
        lw = np.sum([np_pair_ce(w, o, neg, om, tau_l) for w, o, neg, om, _, _, _ in vecs], axis=0) / b
        lp = np.sum([np_pair_ce(p, q, np.ones(len(p), bool), pi, tau_l) for *_, p, q, pi in vecs], axis=0) / b
    else:
        lw = np.array(np_batch_ce([v[0] for v in vecs], [v[1] for v in vecs], [v[2] for v in vecs],
                                  [v[3] for v in vecs], tau_l)) / b
        lp = np.array(np_batch_ce([v[4] for v in vecs], [v[5] for v in vecs],
                                  [np.ones(len(v[4]), bool) for v in vecs], [v[6] for v in vecs], tau_l)) / b
    l_cta = lw.mean() + lp.mean()
    l_cpa = np_cpa(f(out.img_emb), f(out.txt_emb), f(protos), tau_p, eps, iters)
    total = lambdas[0] * l_ita + lambdas[1] * l_cta + lambdas[2] * l_cpa
    return total, dict(ita=l_ita, cta_word=lw.mean(), cta_patch=lp.mean(), cpa=l_cpa)


def assert_terms(metrics, total, want, rtol=2e-5):
    want_total, terms = want
    np.testing.assert_allclose(total, want_total, rtol=rtol)
    for name, value in terms.items():
        np.testing.assert_allclose(metrics[f"loss/{name}"], value, rtol=rtol, err_msg=name)


# ---- tests ------------------------------------------------------------------------------------------------------

def test_registered_and_defaults_are_the_authors():
    assert "mgca" in OBJECTIVES
    s = mgca.MgcaConfig()
    assert (s.temperature, s.local_temperature, s.proto_temperature) == (0.07, 0.1, 0.2)
    assert (s.num_prototypes, s.epsilon, s.sinkhorn_iterations, s.freeze_prototypes_epochs) == (500, 0.05, 3, 1.0)
    assert (s.lambda_ita, s.lambda_cta, s.lambda_cpa) == (1.0, 1.0, 1.0)
    assert (s.word_slots, s.patch_context_norm, s.ita_reduce, s.local_negatives, s.ita_groups) == (
        "all", "auto", "sum", "pair", 1)


def test_faithful_vit_loss_matches_reference_term_by_term():
    out, protos = random_outputs(0), random_prototypes(0)
    total, m = run(objective(), out, protos)
    assert_terms(m, total, np_mgca(out, protos))


def test_faithful_cnn_uses_uniform_patch_weights_and_normalised_patch_context():
    out, protos = random_outputs(1, cnn=True), random_prototypes(1)
    total, m = run(objective(), out, protos)
    assert_terms(m, total, np_mgca(out, protos))


def test_fixed_switches_match_reference():
    out, protos = random_outputs(2), random_prototypes(2)
    for slots in ("occupied", "words"):
        kw = dict(word_slots=slots, patch_context_norm="always", ita_reduce="mean", lambda_cta=0.7, lambda_cpa=0.5)
        total, m = run(objective(**kw), out, protos)
        assert_terms(m, total, np_mgca(out, protos, word_slots=slots, patch_norm=True, ita_reduce="mean",
                                       lambdas=(1.0, 0.7, 0.5)))


def test_batch_local_negatives_match_reference_and_chunking_is_exact():
    out, protos = random_outputs(3), random_prototypes(3)
    total, m = run(objective(local_negatives="batch", word_slots="occupied", local_chunk=3), out, protos)
    assert_terms(m, total, np_mgca(out, protos, negatives="batch", word_slots="occupied"))

    def f(obj):
        def loss(word_emb, patch_emb):
            return obj.loss({"prototypes": protos}, out.replace(word_emb=word_emb, patch_emb=patch_emb), {},
                            LossContext(0))[0]
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    v0, g0 = f(objective(local_negatives="batch", local_chunk=None))(out.word_emb, out.patch_emb)
    v1, g1 = f(objective(local_negatives="batch", local_chunk=3))(out.word_emb, out.patch_emb)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    assert_trees_close(g1, g0, err_msg="chunked grads")          # rounding judged at each leaf's scale


def test_gradients_match_finite_differences_float64():
    with jax.enable_x64(True):
        out = random_outputs(4, b=3, t=5, p=4, d=3, n_words=(1, 3, 2), dtype=np.float64)
        protos = random_prototypes(4, k=5, d=3, dtype=np.float64)
        # CPA's Sinkhorn targets are stop-gradient, so finite differences of the full loss would see their
        # change; the local and global terms are checked here, CPA against its closed form below.
        obj = objective(lambda_cpa=0.0)

        def f(img, txt, patch, word):
            o = out.replace(img_emb=img, txt_emb=txt, patch_emb=patch, word_emb=word)
            return obj.loss({"prototypes": protos}, o, {}, LossContext(0))[0]

        args = (out.img_emb, out.txt_emb, out.patch_emb, out.word_emb)
        vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
        _, grads = vg(*args)
        rng = np.random.default_rng(0)
        for _ in range(3):
            dirs = [jnp.asarray(rng.normal(size=a.shape)) for a in args]
            e = 1e-6
            numeric = (float(vg(*[a + e * v for a, v in zip(args, dirs)])[0])
                       - float(vg(*[a - e * v for a, v in zip(args, dirs)])[0])) / (2 * e)
            analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(grads, dirs))
            np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_cpa_gradient_treats_codes_as_constants():
    out, protos = random_outputs(5), random_prototypes(5)
    tau_p = 0.2
    obj = objective(lambda_ita=0.0, lambda_cta=0.0)

    def f(img, txt, c):
        return obj.loss({"prototypes": c}, out.replace(img_emb=img, txt_emb=txt), {}, LossContext(0))[0]

    g_img, g_txt, g_c = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(out.img_emb, out.txt_emb, protos)
    img, txt, C = (np.asarray(x, np.float64) for x in (out.img_emb, out.txt_emb, protos))
    s_i, s_r = img @ C.T, txt @ C.T
    q_i, q_r = np_sinkhorn(s_i, 0.05, 3), np_sinkhorn(s_r, 0.05, 3)
    sm = lambda s: np.exp(s / tau_p - np.array([lse(r / tau_p) for r in s])[:, None])
    # d/ds of -sum_k q_k log softmax(s / tau)_k = (softmax(s / tau) - q) / tau (rows of q sum to 1).
    d_sr = 0.5 * (sm(s_r) - q_i) / tau_p / B
    d_si = 0.5 * (sm(s_i) - q_r) / tau_p / B
    np.testing.assert_allclose(g_img, d_si @ C, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_txt, d_sr @ C, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_c, d_si.T @ img + d_sr.T @ txt, rtol=1e-4, atol=1e-6)


def test_padding_slots_are_negatives_only_in_faithful_mode():
    protos = random_prototypes(6)
    out, noisy = random_outputs(6), random_outputs(6, pad_seed=99)
    changed = np.asarray(out.word_emb) != np.asarray(noisy.word_emb)
    assert changed.any() and not changed[np.asarray(out.slot_mask)].any()
    (_, ma), (_, mb) = run(objective(), out, protos), run(objective(), noisy, protos)
    assert abs(float(ma["loss/cta_word"]) - float(mb["loss/cta_word"])) > 1e-4      # authors: padding competes
    for name in ("cta_patch", "ita", "cpa"):                                         # padding keys masked
        np.testing.assert_allclose(ma[f"loss/{name}"], mb[f"loss/{name}"], rtol=1e-6)
    for slots in ("occupied", "words"):
        (a, _), (b, _) = run(objective(word_slots=slots), out, protos), run(objective(word_slots=slots), noisy, protos)
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sep_slot_is_a_word_unless_masked():
    protos, out = random_prototypes(7), random_outputs(7)
    we = np.array(out.word_emb)
    sep = np.array([n + 1 for n in N_WORDS[1:]])          # text 0's [SEP] has zero attention; move the others
    we[np.arange(1, B), sep] = -we[np.arange(1, B), sep]
    moved = out.replace(word_emb=jnp.asarray(we))
    for slots, same in (("occupied", False), ("words", True)):
        a, b = run(objective(word_slots=slots), out, protos)[0], run(objective(word_slots=slots), moved, protos)[0]
        assert (abs(float(a) - float(b)) < 1e-6) == same, slots


def test_batch_permutation_invariance():
    out, protos = random_outputs(8), random_prototypes(8)
    perm = np.array([2, 0, 3, 1])
    permuted = jax.tree_util.tree_map(lambda x: x[perm], out)
    (a, ma), (b, mb) = run(objective(), out, protos), run(objective(), permuted, protos)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for name in ("ita", "cta", "cpa"):
        np.testing.assert_allclose(ma[f"loss/{name}"], mb[f"loss/{name}"], rtol=1e-6)


def test_invalid_rows_are_removed_from_every_term():
    out, protos = random_outputs(9), random_prototypes(9)
    valid = np.array([True, True, False, True])
    total, m = run(objective(), out, protos, {"valid": jnp.asarray(valid)})
    sub = jax.tree_util.tree_map(lambda x: x[valid], out)
    assert_terms(m, total, np_mgca(sub, protos))


def test_ita_groups_take_negatives_within_blocks():
    out, protos = random_outputs(10), random_prototypes(10)
    _, m = run(objective(ita_groups=2), out, protos)
    img, txt = np.asarray(out.img_emb, np.float64), np.asarray(out.txt_emb, np.float64)
    want = 0.5 * (np_ita(img[:2], txt[:2], 0.07) + np_ita(img[2:], txt[2:], 0.07))
    np.testing.assert_allclose(m["loss/ita"], want, rtol=2e-5)
    assert abs(want - np_ita(img, txt, 0.07)) > 1e-3


def test_prototype_freeze_schedule_switches_at_the_configured_step():
    for epochs, switch in ((1.0, 10), (0.5, 5), (2, 20)):
        obj = objective(freeze_prototypes_epochs=epochs)
        trainable = jax.jit(obj.trainable)
        assert not bool(trainable(jnp.int32(switch - 1))["prototypes"])
        assert bool(trainable(jnp.int32(switch))["prototypes"])
        assert bool(obj.trainable(switch + 7)["prototypes"]) and not bool(obj.trainable(0)["prototypes"])
    out = random_outputs(11)
    _, m = run(objective(), out, random_prototypes(11), step=9)
    assert float(m["prototypes/trainable"]) == 0.0


def test_init_and_prepare_params_normalise_prototype_rows_outside_the_gradient():
    obj = objective()
    params = obj.init(jax.random.PRNGKey(0), random_outputs(12))
    assert params["prototypes"].shape == (K, D)
    np.testing.assert_allclose(np.linalg.norm(params["prototypes"], axis=-1), 1.0, rtol=1e-6)
    raw = {"prototypes": 3.0 * random_prototypes(12) + 0.1}
    prepared = obj.prepare_params(raw)
    np.testing.assert_allclose(np.linalg.norm(prepared["prototypes"], axis=-1), 1.0, rtol=1e-6)
    g = jax.grad(lambda p: jnp.sum(obj.prepare_params(p)["prototypes"] * jnp.arange(D)))(raw)
    assert np.all(np.asarray(g["prototypes"]) == 0)


def test_similarity_maps_are_word_to_patch_attention():
    out = random_outputs(13)
    maps = np.asarray(objective().similarity_maps({}, out))
    assert maps.shape == (B, T, P)
    w, p = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64)
    for b in range(B):
        for t in range(T):
            logits = p[b] @ w[b, t] / 0.1
            np.testing.assert_allclose(maps[b, t], np.exp(logits - lse(logits)), rtol=1e-5, atol=1e-7)


def test_map_diagnostics_peak_mass_is_the_words_mean_largest_attention():
    out = random_outputs(14)
    stats = jax.device_get(objective().map_diagnostics({}, out))
    w, p = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64)
    words = np.asarray(out.word_mask)
    for b in range(B):
        peaks = [np.exp((p[b] @ w[b, t] / 0.1) - lse(p[b] @ w[b, t] / 0.1)).max() for t in range(T) if words[b, t]]
        np.testing.assert_allclose(stats["word_map_peak_mass"][b], np.mean(peaks), rtol=1e-5)


class _FakeModel:
    """Stands in for the DualEncoder: embeddings are free parameters (normalised), masks come from the batch."""

    def apply(self, variables, batch, train=True, rngs=None, mutable=None):
        del train, rngs, mutable
        p = variables["params"]
        n = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        return EncoderOutputs(
            img_emb=n(p["img"]), txt_emb=n(p["txt"]), patch_emb=n(p["patch"]), word_emb=n(p["word"]),
            word_mask=batch["word_mask"], slot_mask=batch["slot_mask"], word_attn=batch["word_attn"],
            patch_attn=batch["patch_attn"], img_feat=None, txt_feat=None, patch_feat=None, word_feat=None,
            grid=(2, P // 2))


def test_train_step_leaves_prototypes_untouched_until_the_configured_step():
    import optax

    from medvlp_jax.train.state import TrainState
    from medvlp_jax.train import optim
    from medvlp_jax.train.step import make_train_step

    out = random_outputs(14)
    obj = objective()
    enc = {"img": out.img_emb, "txt": out.txt_emb, "patch": out.patch_emb, "word": out.word_emb}
    params = {"encoders": enc, "method": obj.init(jax.random.PRNGKey(1), out)}
    tx = optim.freeze_objective_leaves(optax.adamw(1e-2, weight_decay=0.05), obj)   # as train.setup.build
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state={}, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0), ema_params=None, nonfinite_steps=jnp.zeros((), jnp.int32))
    batch = {"word_mask": out.word_mask, "slot_mask": out.slot_mask, "word_attn": out.word_attn,
             "patch_attn": out.patch_attn, "valid": jnp.ones((B,), bool)}
    step = jax.jit(make_train_step(_FakeModel(), obj, tx, lambda s: 1e-2))
    protos0 = np.asarray(params["method"]["prototypes"])
    for i in range(STEPS_PER_EPOCH + 1):
        before = np.asarray(state.params["method"]["prototypes"])
        enc_before = np.asarray(state.params["encoders"]["img"])
        state, _ = step(state, batch)
        after = np.asarray(state.params["method"]["prototypes"])
        assert np.abs(np.asarray(state.params["encoders"]["img"]) - enc_before).max() > 1e-4   # encoders train
        if i < STEPS_PER_EPOCH:
            np.testing.assert_allclose(after, protos0, rtol=1e-6, atol=1e-7, err_msg=f"step {i}")
        else:
            assert np.abs(after - before).max() > 1e-4, "prototypes must train from the configured step on"
