"""GLoRIA objective vs a loop-by-loop NumPy transcription of the authors' loss (methods.md section 3)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from medvlp_jax.methods import OBJECTIVES, gloria, make_objective
from medvlp_jax.types import EncoderOutputs
from medvlp_jax.types import LossContext
from tests.helpers import assert_trees_close

B, T, P, D = 4, 7, 6, 5
N_WORDS = (2, 5, 1, 3)       # slot 0 = [CLS], 1..n = words, n + 1 = [SEP] (text 1 fills all 7 slots), rest padding


def random_outputs(seed, b=B, t=T, p=P, d=D, n_words=N_WORDS, normalize=False, pad="zero", dtype=np.float32):
    """EncoderOutputs from random arrays. GLoRIA's embeddings are raw (varied norms) unless ``normalize``.

    pad: "zero" (padding slots are zero vectors, as after GLoRIA's identity word head) or "random".
    """
    rng = np.random.default_rng(seed)

    def vec(*shape):
        x = rng.normal(size=shape)
        if normalize:
            return x / np.linalg.norm(x, axis=-1, keepdims=True)
        return x * rng.uniform(0.5, 2.0, size=shape[:-1] + (1,))

    n = np.asarray(n_words)[:, None]
    pos = np.arange(t)[None, :]
    word_mask = (pos >= 1) & (pos <= n)
    slot_mask = pos <= n + 1
    word_emb = vec(b, t, d)
    if pad == "zero":
        word_emb = np.where(slot_mask[:, :, None], word_emb, 0.0)
    word_attn = np.where(slot_mask, rng.uniform(0.01, 1.0, size=(b, t)), 0.0)
    cast = lambda x: jnp.asarray(x, dtype)
    return EncoderOutputs(
        img_emb=cast(vec(b, d)), txt_emb=cast(vec(b, d)), patch_emb=cast(vec(b, p, d)), word_emb=cast(word_emb),
        word_mask=jnp.asarray(word_mask), slot_mask=jnp.asarray(slot_mask), word_attn=cast(word_attn),
        patch_attn=None, img_feat=None, txt_feat=None, patch_feat=None, word_feat=None, grid=(2, p // 2))


@functools.lru_cache(maxsize=None)
def _objective(items):
    return make_objective(ml_collections.ConfigDict(dict(name="gloria", **dict(items))), steps_per_epoch=10)


def objective(**kw):
    return _objective(tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _jitted(obj):
    return jax.jit(lambda o, batch: obj.loss({}, o, batch, LossContext(0)))    # one compile per objective and shape


def run(obj, out, batch=None):
    return _jitted(obj)(out, batch or {})


# ---- NumPy reference: the authors' loops (gloria_loss.local_loss / global_loss) -----------------------------

def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_cos(x, y):
    return float(np.sum(x * y) / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-8))


def np_columns(i, n_words, cls=True, sep=False):
    """The authors take the first cap_len = n + 1 columns ([CLS] + words); switches add/remove ends."""
    cols = ([0] if cls else []) + list(range(1, n_words[i] + 1)) + ([n_words[i] + 1] if sep else [])
    return cols


def np_local_R(E, V, n_words, temp1, temp2, cls=True, sep=False, agg="sum", regions=False):
    """R[j, i] for image j, text i, looping exactly as local_loss (agg 'max' as get_local_similarities)."""
    b_txt, b_img = E.shape[0], V.shape[0]
    R = np.zeros((b_img, b_txt))
    for i in range(b_txt):
        word = E[i, np_columns(i, n_words, cls, sep)]                    # [n, d]
        for j in range(b_img):
            ctx = V[j]                                                   # [p, d]
            if regions:                                                  # the paper: one softmax over regions
                attn = np_softmax(temp1 * (ctx @ word.T).T, axis=1)     # [n, p]
            else:
                attn = np_softmax(ctx @ word.T, axis=1)                  # [p, n], softmax over words
                attn = np_softmax(temp1 * attn.T, axis=1)                # [n, p], softmax over regions
            wctx = attn @ ctx                                            # [n, d]
            sims = np.array([np.exp(temp2 * np_cos(word[t], wctx[t])) for t in range(len(word))])
            if agg == "sum":
                R[j, i] = np.log(sims.sum())
            elif agg == "mean":
                R[j, i] = np.log(sims.mean())
            else:
                R[j, i] = np.log(sims.max())
    return R


def np_ce_both(M):
    n = M.shape[0]
    l0 = np.mean([-(M[j, j] - np.log(np.exp(M[j]).sum())) for j in range(n)])
    l1 = np.mean([-(M[i, i] - np.log(np.exp(M[:, i]).sum())) for i in range(n)])
    return l0, l1


def np_report(E, txt, n_words, mode):
    if mode == "cls":
        return txt
    if mode == "mean_all_slots":
        return E.sum(axis=1) / E.shape[1]
    return np.stack([E[i, :n_words[i] + 2].mean(axis=0) for i in range(E.shape[0])])


def np_gloria(out, n_words=N_WORDS, temp1=4.0, temp2=5.0, temp3=10.0, cls=True, sep=False,
              report="mean_all_slots", agg="sum", paper=False, lw=1.0, gw=1.0, regions=False):
    f = lambda x: np.asarray(x, np.float64)
    E, V = f(out.word_emb), f(out.patch_emb)
    R = np_local_R(E, V, n_words, temp1, temp2, cls, sep, agg, regions)
    if paper:
        R = R / temp2
    l0, l1 = np_ce_both(temp3 * R)
    g_txt = np_report(E, f(out.txt_emb), n_words, report)
    img = f(out.img_emb)
    G = temp3 * np.array([[np_cos(img[j], g_txt[i]) for i in range(len(g_txt))] for j in range(len(img))])
    g0, g1 = np_ce_both(G)
    return lw * (l0 + l1) + gw * (g0 + g1), l0 + l1, g0 + g1


# ---- tests ------------------------------------------------------------------------------------------------------

def test_registered_and_defaults_are_the_authors():
    assert "gloria" in OBJECTIVES
    s = gloria.GloriaConfig()
    assert (s.temp1, s.temp2, s.temp3, s.local_weight, s.global_weight) == (4.0, 5.0, 10.0, 1.0, 1.0)
    assert s.include_cls_word and not s.include_sep_word and s.report_vector == "mean_all_slots"
    assert not s.count_unk_words
    assert not s.paper_local_scale and s.local_agg == "sum"


def test_faithful_loss_matches_reference():
    out = random_outputs(0)
    total, m = run(objective(text_chunk=3), out)           # 3 does not divide 4: the padded-chunk path
    want, local, glob = np_gloria(out)
    np.testing.assert_allclose(total, want, rtol=2e-5)
    np.testing.assert_allclose(m["loss/local"], local, rtol=2e-5)
    np.testing.assert_allclose(m["loss/global"], glob, rtol=2e-5)


def test_fixed_switches_match_reference():
    out = random_outputs(1)
    cfg = dict(include_cls_word=False, include_sep_word=True, report_vector="mean_slots", paper_local_scale=True,
               local_agg="mean", temp1=3.0, temp2=4.0, temp3=7.0, local_weight=0.5, global_weight=2.0)
    total, _ = run(objective(**cfg), out)
    want, _, _ = np_gloria(out, temp1=3.0, temp2=4.0, temp3=7.0, cls=False, sep=True, report="mean_slots",
                           agg="mean", paper=True, lw=0.5, gw=2.0)
    np.testing.assert_allclose(total, want, rtol=2e-5)
    total_cls, _ = run(objective(report_vector="cls"), out)
    np.testing.assert_allclose(total_cls, np_gloria(out, report="cls")[0], rtol=2e-5)


def _loss_fn(obj, out):
    def f(word_emb, patch_emb, img_emb, txt_emb):
        o = out.replace(word_emb=word_emb, patch_emb=patch_emb, img_emb=img_emb, txt_emb=txt_emb)
        return obj.loss({}, o, {}, LossContext(0))[0]
    return f


def test_chunked_equals_unchunked_value_and_gradient():
    out = random_outputs(2)
    args = (out.word_emb, out.patch_emb, out.img_emb, out.txt_emb)
    ref_v, ref_g = jax.jit(jax.value_and_grad(_loss_fn(objective(text_chunk=None), out), argnums=(0, 1, 2, 3)))(*args)
    for chunk in (1, 3):
        v, g = jax.jit(jax.value_and_grad(_loss_fn(objective(text_chunk=chunk), out), argnums=(0, 1, 2, 3)))(*args)
        np.testing.assert_allclose(v, ref_v, rtol=1e-6)
        # Chunks sum in another order: rounding is judged at each gradient's scale (issue 16), not per element.
        assert_trees_close(g, ref_g, err_msg=f"chunk {chunk}")
    assert np.abs(np.asarray(ref_g[1])).max() > 0           # the local term reaches the regions


def test_gradients_match_finite_differences_float64():
    with jax.enable_x64(True):
        out = random_outputs(3, b=3, t=5, p=4, d=3, n_words=(1, 3, 2), dtype=np.float64)
        f = _loss_fn(objective(text_chunk=2), out)
        args = (out.word_emb, out.patch_emb, out.img_emb, out.txt_emb)
        vg = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
        _, grads = vg(*args)
        rng = np.random.default_rng(0)
        for _ in range(3):
            dirs = [jnp.asarray(rng.normal(size=a.shape)) for a in args]
            eps = 1e-6
            plus = vg(*[a + eps * v for a, v in zip(args, dirs)])[0]
            minus = vg(*[a - eps * v for a, v in zip(args, dirs)])[0]
            numeric = (float(plus) - float(minus)) / (2 * eps)
            analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(grads, dirs))
            np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_padding_slots_matter_only_through_the_authors_report_vector():
    out = random_outputs(4)
    noisy = random_outputs(4, pad="random")                 # same real slots, random padding vectors
    np.testing.assert_array_equal(np.asarray(out.word_emb)[np.asarray(out.slot_mask)],
                                  np.asarray(noisy.word_emb)[np.asarray(noisy.slot_mask)])
    faithful, fixed = objective(), objective(report_vector="mean_slots")
    (a, ma), (b, mb) = run(faithful, out), run(faithful, noisy)
    assert abs(float(a) - float(b)) > 1e-3                  # mean over all slots reads the padding
    np.testing.assert_allclose(ma["loss/local"], mb["loss/local"], rtol=1e-6)
    (c, _), (d, _) = run(fixed, out), run(fixed, noisy)
    np.testing.assert_allclose(c, d, rtol=1e-6)


def test_sep_and_cls_enter_the_local_term_only_as_configured():
    out = random_outputs(5)
    we = np.array(out.word_emb)
    sep = np.array([n + 1 for n in N_WORDS])
    we2 = we.copy()
    we2[np.arange(B), sep] += 3.0
    moved_sep = out.replace(word_emb=jnp.asarray(we2))
    local = lambda obj, o: float(run(obj, o)[1]["loss/local"])
    faithful, with_sep = objective(), objective(include_sep_word=True)
    assert local(faithful, out) == local(faithful, moved_sep)
    assert abs(local(with_sep, out) - local(with_sep, moved_sep)) > 1e-4
    we3 = we.copy()
    we3[:, 0] += 3.0
    moved_cls = out.replace(word_emb=jnp.asarray(we3))
    no_cls = objective(include_cls_word=False)
    assert abs(local(faithful, out) - local(faithful, moved_cls)) > 1e-4
    assert local(no_cls, out) == local(no_cls, moved_cls)


def test_batch_permutation_invariance_and_valid_rows():
    out = random_outputs(6)
    obj = objective(text_chunk=2)
    perm = np.array([2, 0, 3, 1])
    permuted = jax.tree_util.tree_map(lambda x: x[perm], out)
    np.testing.assert_allclose(run(obj, permuted)[0], run(obj, out)[0], rtol=1e-6)
    valid = jnp.asarray([True, False, True, True])
    keep = np.asarray(valid)
    sub = jax.tree_util.tree_map(lambda x: x[keep], out)
    want = np_gloria(sub, n_words=tuple(np.asarray(N_WORDS)[keep]))[0]
    np.testing.assert_allclose(run(obj, out, {"valid": valid})[0], want, rtol=2e-5)


def test_paper_attention_over_regions_matches_reference():
    """attention="regions": one softmax over the regions of temp1 * dots (the paper), in the loss and the maps;
    the global term is untouched."""
    out = random_outputs(3)
    total, m = run(objective(attention="regions", text_chunk=3), out)
    want, local, glob = np_gloria(out, regions=True)
    np.testing.assert_allclose(total, want, rtol=2e-5)
    np.testing.assert_allclose(m["loss/global"], run(objective(), out)[1]["loss/global"], rtol=1e-6)
    maps = np.asarray(objective(attention="regions").similarity_maps({}, out))
    E, V = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64)
    cols = np_columns(0, N_WORDS)
    np.testing.assert_allclose(maps[0, cols], np_softmax(4.0 * E[0, cols] @ V[0].T, axis=1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="attention"):
        objective(attention="words")


def test_similarity_maps_are_the_matching_pair_attention():
    out = random_outputs(7)
    maps = np.asarray(objective().similarity_maps({}, out))
    assert maps.shape == (B, T, P)
    E, V = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64)
    for i in range(B):
        cols = np_columns(i, N_WORDS)
        attn = np_softmax(V[i] @ E[i, cols].T, axis=1)
        beta = np_softmax(4.0 * attn.T, axis=1)
        np.testing.assert_allclose(maps[i, cols], beta, rtol=1e-5, atol=1e-7)
        others = np.setdiff1d(np.arange(T), cols)
        assert np.all(maps[i, others] == 0)


def test_map_diagnostics_match_reference():
    """[CLS]'s share of the first softmax and the words' peak mass, against loops over the pairs."""
    out = random_outputs(8)
    stats = jax.device_get(objective().map_diagnostics({}, out))
    E, V = np.asarray(out.word_emb, np.float64), np.asarray(out.patch_emb, np.float64)
    for i in range(B):
        cols = np_columns(i, N_WORDS)
        attn = np_softmax(V[i] @ E[i, cols].T, axis=1)                   # [p, words]: first softmax per region
        beta = np_softmax(4.0 * attn.T, axis=1)                          # [words, p]
        np.testing.assert_allclose(stats["first_softmax_cls_share"][i], attn[:, 0].mean(), rtol=1e-5)
        np.testing.assert_allclose(stats["first_softmax_top_share"][i], attn.max(axis=1).mean(), rtol=1e-5)
        # the peak mass counts the real words only ([CLS] is column 0 of beta)
        np.testing.assert_allclose(stats["word_map_peak_mass"][i], beta[1:].max(axis=1).mean(), rtol=1e-5)
        norms = np.linalg.norm(E[i, cols], axis=1)
        np.testing.assert_allclose(stats["cls_word_norm_ratio"][i], norms[0] / norms[1:].mean(), rtol=1e-5)
    assert np.all(jax.device_get(objective(include_cls_word=False).map_diagnostics({}, out))
                  ["first_softmax_cls_share"] == 0)
    assert set(objective(attention="regions").map_diagnostics({}, out)) == {"word_map_peak_mass",
                                                                            "cls_word_norm_ratio"}


def test_a_dominant_cls_flattens_every_word_map():
    """When [CLS] aligns far better with every region than the words do, it takes the first softmax and
    each word's second-softmax map tends to uniform (peak mass 1/p): the demo's collapse (methods/gloria.py)."""
    out = random_outputs(9, normalize=True)
    base = jax.device_get(objective().map_diagnostics({}, out))
    assert np.all(base["word_map_peak_mass"] > 1.2 / P) and np.all(base["first_softmax_cls_share"] < 0.9)
    shared = np.random.default_rng(9).normal(size=(B, 1, D))             # a direction every region shares
    out = dataclasses.replace(out, patch_emb=jnp.asarray(shared + 0.3 * np.asarray(out.patch_emb), jnp.float32))
    strong = np.asarray(out.word_emb).copy()
    strong[:, 0] = 10.0 * shared[:, 0]                                    # [CLS] along it, scaled up
    dominated = dataclasses.replace(out, word_emb=jnp.asarray(strong))
    stats = jax.device_get(objective().map_diagnostics({}, dominated))
    assert np.all(stats["first_softmax_cls_share"] > 0.99)
    np.testing.assert_allclose(stats["first_softmax_top_share"], stats["first_softmax_cls_share"], rtol=1e-6)
    np.testing.assert_allclose(stats["word_map_peak_mass"], 1.0 / P, rtol=0.05)


def test_zero_shot_scores_match_reference():
    imgs = random_outputs(8, b=5, n_words=(2, 5, 1, 3, 4))
    prompts = random_outputs(9, b=4, n_words=(2, 3, 1, 4))
    prompt_class = np.array([0, 1, 0, 2])
    prompt_emb = gloria.report_vector(prompts.word_emb, prompts.slot_mask, prompts.txt_emb, "mean_all_slots")
    scores = jax.jit(gloria.gloria_zero_shot_scores,
                     static_argnames=("num_classes", "text_chunk", "normalize", "attention"))
    got = scores(imgs.img_emb, imgs.patch_emb, prompt_emb, prompts.word_emb, prompts.word_mask,
                 jnp.asarray(prompt_class), num_classes=3, text_chunk=3)
    f = lambda x: np.asarray(x, np.float64)
    local = np_local_R(f(prompts.word_emb), f(imgs.patch_emb), (2, 3, 1, 4), 4.0, 5.0, cls=False, agg="max")
    g = f(prompt_emb)
    glob = np.array([[np_cos(f(imgs.img_emb)[j], g[i]) for i in range(4)] for j in range(5)])
    sim = (local + glob) / 2
    cls_scores = np.stack([sim[:, prompt_class == c].max(axis=1) for c in range(3)], axis=1)
    want = (cls_scores - cls_scores.mean(0)) / cls_scores.std(0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    raw = scores(imgs.img_emb, imgs.patch_emb, prompt_emb, prompts.word_emb, prompts.word_mask,
                 jnp.asarray(prompt_class), num_classes=3, text_chunk=3, normalize=False)
    np.testing.assert_allclose(raw, cls_scores, rtol=1e-5, atol=1e-6)
    # method.attention="regions" (the paper's single softmax) is scored with that attention too.
    regions = scores(imgs.img_emb, imgs.patch_emb, prompt_emb, prompts.word_emb, prompts.word_mask,
                     jnp.asarray(prompt_class), num_classes=3, text_chunk=3, normalize=False, attention="regions")
    local_r = np_local_R(f(prompts.word_emb), f(imgs.patch_emb), (2, 3, 1, 4), 4.0, 5.0, cls=False, agg="max",
                         regions=True)
    sim_r = (local_r + glob) / 2
    want_r = np.stack([sim_r[:, prompt_class == c].max(axis=1) for c in range(3)], axis=1)
    np.testing.assert_allclose(regions, want_r, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want_r, cls_scores, rtol=1e-3)


def test_zero_shot_evaluator_scores_with_the_runs_attention(monkeypatch):
    """evaluators.zero_shot.gloria_scores scores with the run objective's zero_shot_scores (GLoRIA: its
    method.attention); a method without one gets GLoRIA's default attention."""
    import types

    from medvlp_jax.evaluators import zero_shot
    seen = []
    real = gloria.gloria_zero_shot_scores

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attention"))
        return real(*args, **kwargs)
    prompts = random_outputs(9, b=2, n_words=(2, 3))
    imgs = random_outputs(8, b=3, n_words=(2, 2, 2))
    encoded = {"word_emb": np.asarray(prompts.word_emb), "slot_mask": np.asarray(prompts.slot_mask),
               "txt_emb": np.asarray(prompts.txt_emb), "word_mask": np.asarray(prompts.word_mask)}
    monkeypatch.setattr(zero_shot, "encode_prompts", lambda run, config, texts: encoded)
    monkeypatch.setattr(gloria, "gloria_zero_shot_scores", spy)
    emb = {"img_emb": np.asarray(imgs.img_emb), "patch_emb": np.asarray(imgs.patch_emb)}
    for name, attention, expected in [("gloria", "regions", "regions"), ("gloria", None, "words_then_regions"),
                                      ("mgca", "regions", "words_then_regions")]:
        method = ml_collections.ConfigDict({"name": name} | ({"attention": attention} if attention else {}))
        objective = (gloria.make(method, steps_per_epoch=1) if name == "gloria"
                     else types.SimpleNamespace(zero_shot_scores=None))
        run = types.SimpleNamespace(config=ml_collections.ConfigDict({"method": method}), objective=objective)
        got = zero_shot.gloria_scores(run, None, emb, {"a": ["p0"], "b": ["p1"]}, image_chunk=4)
        assert got.shape == (3, 2) and seen[-1] == expected


# ---- [UNK] words (issue 13; methods.md 3.2 "Words used") ----------------------------------------------------

# Text 1 (5 words) has one [UNK] word (slot 2, in the middle); text 3 (3 words) has two. The authors count
# n_i = #words not starting with "[" + 1, so their first n_i columns lose the LAST real word(s).
UNK_SLOTS = {1: [2], 3: [1, 3]}


def _bracket_words(b=B, t=T):
    x = np.zeros((b, t), np.int32)
    for i, slots in UNK_SLOTS.items():
        x[i, slots] = 1
    return jnp.asarray(x)


def test_counted_words_drop_the_last_real_words():
    pos = np.arange(T)[None, :]
    word_mask = jnp.asarray((pos >= 1) & (pos <= np.asarray(N_WORDS)[:, None]))
    got = np.asarray(gloria.counted_words(word_mask, jnp.asarray([0, 1, 0, 2])))
    want = np.zeros((B, T), bool)
    for i, n in enumerate((2, 4, 1, 1)):                          # N_WORDS minus the [UNK] count
        want[i, 1:n + 1] = True
    np.testing.assert_array_equal(got, want)


def test_unk_words_faithful_and_fixed_match_reference():
    out = random_outputs(10)
    batch = {"bracket_words": _bracket_words()}
    n_counted = tuple(n - len(UNK_SLOTS.get(i, [])) for i, n in enumerate(N_WORDS))      # (2, 4, 1, 1)
    total, m = run(objective(text_chunk=3), out, batch)
    want, local, glob = np_gloria(out, n_words=n_counted)      # columns 0..n_i - 1; report vector unchanged
    np.testing.assert_allclose(total, want, rtol=2e-5)
    np.testing.assert_allclose(m["loss/local"], local, rtol=2e-5)
    # Fixed: every word counts ([UNK] included) -- the value without the key, bit for bit.
    fixed_total, fixed_m = run(objective(text_chunk=3, count_unk_words=True), out, batch)
    np.testing.assert_allclose(fixed_total, np_gloria(out)[0], rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(fixed_total), np.asarray(run(objective(text_chunk=3), out)[0]))
    # Only the local term changes; the global term (report vector over all slots) is identical.
    np.testing.assert_array_equal(np.asarray(m["loss/global"]), np.asarray(fixed_m["loss/global"]))
    assert abs(float(m["loss/local"]) - float(fixed_m["loss/local"])) > 1e-4
    np.testing.assert_allclose(float(m["loss/global"]), glob, rtol=2e-5)


def test_sum_aggregation_adds_log_word_count_and_mean_does_not():
    """Texts made of k copies of one word vector: R = 5 cos + log k with the authors' log-sum-exp (``local_agg=
    "sum"``), R = 5 cos with log-mean-exp ("mean"). Times temp3 = 10 that is 10 log k logits in favour of longer
    texts in the image->text direction, the start of the demo's [CLS] collapse (docs/demo_results.md)."""
    rng = np.random.default_rng(3)
    word = rng.normal(size=(D,))
    counts = (1, 2, 4, 6)
    word_emb = np.zeros((len(counts), T, D))
    word_set = np.zeros((len(counts), T), bool)
    for i, k in enumerate(counts):
        word_emb[i, :k] = word
        word_set[i, :k] = True
    patches = jnp.asarray(rng.normal(size=(3, P, D)), jnp.float32)
    r = {agg: np.asarray(gloria.local_similarity(jnp.asarray(word_emb, jnp.float32), jnp.asarray(word_set),
                                                 patches, agg=agg))
         for agg in ("sum", "mean")}                                              # [images, texts]
    vbar = np.asarray(patches).mean(axis=1)                                       # identical words: uniform maps
    cos = vbar @ word / (np.linalg.norm(vbar, axis=1) * np.linalg.norm(word))
    np.testing.assert_allclose(r["mean"], np.repeat(5.0 * cos[:, None], len(counts), axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["sum"] - r["mean"], np.broadcast_to(np.log(counts), r["sum"].shape), atol=1e-5)
