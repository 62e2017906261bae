"""Phrase grounding: scoring of maps against boxes, query grouping, the word-averaged objective maps and the
cosine maps against independent computations, and the evaluator end to end on ``syn_run``."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest


def _gaussian(h, w, cy, cx, sigma=3.0):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))


def test_map_peaking_inside_the_box_scores_well():
    from medvlp_jax.evaluators.grounding import score_map
    box = np.array([[0.25, 0.5, 0.75, 1.0]])          # rows 8..23, cols 16..31 of a 32x32 map
    inside = score_map(_gaussian(32, 32, 16, 24), box)
    assert inside["pointing_game"] == 1.0 and inside["cnr"] > 0.5 and inside["miou"] > 0.1
    outside = score_map(_gaussian(32, 32, 4, 4), box)
    assert outside["pointing_game"] == 0.0 and outside["miou"] < inside["miou"]
    # A map equal to the box is perfect at every threshold.
    m = np.zeros((32, 32))
    m[8:24, 16:32] = 1.0
    exact = score_map(m, box)
    assert exact["pointing_game"] == 1.0 and exact["miou"] == pytest.approx(1.0) and exact["cnr"] == np.inf
    # Chance of the pointing game: the box covers 16 x 16 of 32 x 32 pixels; two overlapping boxes count once.
    assert exact["pointing_game_chance"] == 0.25
    two = score_map(m, np.array([[0.25, 0.5, 0.75, 1.0], [0.5, 0.5, 1.0, 1.0]]))   # rows 8..31, cols 16..31
    assert two["pointing_game_chance"] == pytest.approx(24 * 16 / 1024)


def test_signed_contrast_tells_hot_from_cold_maps():
    """CNR is unsigned: a map hot on the box and the same map negated score the same CNR; the signed contrast
    ((mean in - mean out) / sd, by hand here) is positive for one and negative for the other."""
    from medvlp_jax.evaluators.grounding import score_map, signed_contrast
    box = np.array([[0.25, 0.5, 0.75, 1.0]])          # rows 8..23, cols 16..31 of a 32x32 map
    m = np.zeros((32, 32))
    m[8:24, 16:32] = 1.0
    m[0, 0] = 3.0                                     # outside values that are not all equal
    inside = np.zeros((32, 32), bool)
    inside[8:24, 16:32] = True
    expected = (1.0 - 3.0 / 768) / m.std()            # 256 ones inside; outside 767 zeros and one 3
    hot, cold = score_map(m, box), score_map(-m, box)
    assert hot["cnr"] == pytest.approx(cold["cnr"])
    assert hot["signed_contrast"] == pytest.approx(expected) and hot["cold_fraction"] == 0.0
    assert cold["signed_contrast"] == pytest.approx(-expected) and cold["cold_fraction"] == 1.0
    assert signed_contrast(np.ones((4, 4)), inside[:4, :4]) == {"signed_contrast": 0.0, "cold_fraction": 0.0}
    assert signed_contrast(m, np.zeros((32, 32), bool))["signed_contrast"] == 0.0


def test_map_specificity_against_hand_built_maps():
    """phrase_specificity: 1 - correlation of two phrases' maps on one image; image_specificity: 1 -
    correlation of one phrase's maps on consecutive images that hold it (consecutive pairs only)."""
    from medvlp_jax.evaluators.grounding import PhraseQuery, map_specificity
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 4, 4))
    box = np.zeros((1, 4))
    q = lambda example, phrase: PhraseQuery(example, phrase, phrase, box)  # noqa: E731
    queries = [q(0, "p"), q(0, "r"), q(1, "p"), q(1, "r"), q(2, "p")]
    # Maps that ignore the text (one map per image) and follow the image: phrase 0, image 1.
    grids = np.stack([a, a, b, b, a])
    corr_ab = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    out = map_specificity(queries, grids)
    assert out["phrase_specificity"] == pytest.approx(0.0, abs=1e-12)
    # "p" pairs: (image 0, image 1) -> corr(a, b); (image 1, image 2) -> corr(b, a); "r": (0, 1) -> corr(a, b).
    assert out["image_specificity"] == pytest.approx(1.0 - corr_ab)
    # Maps tied to the text whatever the image: image specificity 0; opposite maps for the two phrases: 2.
    grids = np.stack([a, -a, a, -a, a])
    out = map_specificity(queries, grids)
    assert out["image_specificity"] == pytest.approx(0.0, abs=1e-12)
    assert out["phrase_specificity"] == pytest.approx(2.0)
    # No image with two phrases and no repeated text: neither key; a constant map counts as correlation 1.
    assert map_specificity([q(0, "p"), q(1, "r")], grids[:2]) == {}
    assert map_specificity([q(0, "p"), q(0, "r")], np.stack([a, np.zeros((4, 4))])) == {"phrase_specificity": 0.0}


def test_phrase_discrimination_tells_phrase_maps_from_saliency_maps():
    """Two phrases on one 4x4 image (boxes: top-left and bottom-right cells), one phrase on another image.
    Maps that follow the phrase hit their own box; maps that both light up the top-left finding hit their own
    box and the other phrase's box equally often."""
    from medvlp_jax.evaluators.grounding import PhraseQuery, phrase_discrimination
    top_left, bottom_right = np.array([[0.0, 0.0, 0.25, 0.25]]), np.array([[0.75, 0.75, 1.0, 1.0]])
    queries = [PhraseQuery(0, "a", "a", top_left), PhraseQuery(0, "b", "b", bottom_right),
               PhraseQuery(1, "a", "a", top_left)]
    hot_tl, hot_br = np.zeros((4, 4)), np.zeros((4, 4))
    hot_tl[0, 0] = hot_br[3, 3] = 1.0
    follow = phrase_discrimination(queries, np.stack([hot_tl, hot_br, hot_br]))
    assert follow == {"pointing_game_multi": 1.0, "pointing_game_multi_other": 0.0, "protocol/num_phrases_multi": 2}
    salient = phrase_discrimination(queries, np.stack([hot_tl, hot_tl, hot_tl]))
    assert salient["pointing_game_multi"] == 0.5 and salient["pointing_game_multi_other"] == 0.5
    assert phrase_discrimination(queries[2:], np.stack([hot_tl])) == {}


def _split(phrases, names, boxes, size=8):
    from medvlp_jax.evaluators.localized import LocalizedSplit
    n = len(phrases)
    return LocalizedSplit(split="test", ids=[f"i{k}" for k in range(n)], index=np.arange(n),
                          images=np.zeros((n, size, size, 1), np.float32), reports=[""] * n, names=names,
                          phrases=phrases, boxes=[np.asarray(b, np.float32).reshape(-1, 4) for b in boxes],
                          masks=[np.zeros((len(b), size, size), bool) for b in boxes])


def test_phrase_queries_group_boxes_of_one_phrase():
    from medvlp_jax.evaluators.grounding import aggregate, phrase_queries
    split = _split([["left effusion", "opacity here", "left effusion"], [], ["", "nodule"]],
                   [["effusion", "opacity", "effusion"], [], ["x", "nodule"]],
                   [[[0, 0, .5, .5], [.1, .1, .2, .2], [.5, .5, 1, 1]], [], [[0, 0, 1, 1], [0, 0, .3, .3]]])
    q = phrase_queries(split)
    assert [(x.example, x.phrase, x.name, len(x.boxes)) for x in q] == [
        (0, "left effusion", "effusion", 2), (0, "opacity here", "opacity", 1), (2, "nodule", "nodule", 1)]
    agg = aggregate([{"cnr": 1.0}, {"cnr": 2.0}, {"cnr": 4.0}], ["effusion", "effusion", "nodule"])
    assert agg["cnr"] == pytest.approx(7 / 3) and agg["cnr/effusion"] == 1.5 and agg["cnr/nodule"] == 4.0
    assert agg["protocol/num_phrases"] == 3 and agg["protocol/num_phrases/effusion"] == 2


def test_objective_maps_are_averaged_over_the_phrase_words(syn_run):
    """A fake objective whose word slot t points at patch t: the phrase map is 1/n_words on patches 1..n_words."""
    import jax.numpy as jnp
    from medvlp_jax.data import tokenizer as tokenizer_lib
    from medvlp_jax.evaluators.grounding import phrase_maps

    def fake_maps(method_params, out):
        t, p = out.word_emb.shape[1], out.patch_emb.shape[1]
        return jnp.broadcast_to(jnp.eye(t, p)[None], (out.word_emb.shape[0], t, p))

    run = dataclasses.replace(syn_run, objective=syn_run.objective._replace(similarity_maps=fake_maps))
    phrases = ["small left pleural effusion", "the heart is enlarged", "opacity"]
    images = np.zeros((3, 32, 32, 1), np.float32)
    maps = phrase_maps(run, images, phrases, mode="objective")
    assert maps.shape == (3, 4, 4)
    word_ids = tokenizer_lib.encode(run.tokenizer, phrases, run.config.data.max_text_len)["word_ids"]
    for m, w in zip(maps, word_ids):
        n_words = int(w.max()) - 1                      # slots: [CLS] 0, words 1..n, [SEP] n+1
        want = np.zeros(16)
        want[1:n_words + 1] = 1.0 / n_words
        np.testing.assert_allclose(m.reshape(-1), want, atol=1e-6)
    with pytest.raises(ValueError):
        phrase_maps(syn_run, images, phrases, mode="objective")   # ConVIRT has no local maps


def test_cosine_maps_match_the_towers(syn_run):
    import jax
    from medvlp_jax.data import tokenizer as tokenizer_lib
    from medvlp_jax.evaluators.grounding import phrase_maps, resolve_mode
    assert resolve_mode(syn_run, "auto") == "cosine"
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 32, 32, 1)).astype(np.float32)
    phrases = ["small left pleural effusion", "the heart is enlarged", "patchy opacity"]
    maps = phrase_maps(syn_run, images, phrases, mode="auto", batch_size=8)
    model, v = syn_run.model, jax.device_get(syn_run.variables)
    tok = tokenizer_lib.encode(syn_run.tokenizer, phrases, syn_run.config.data.max_text_len)
    # The towers separately (the evaluator runs the joint forward on (image, phrase) rows).
    patch = np.asarray(jax.jit(lambda x: model.apply(v, {"image": x}, train=False,
                                                     method="encode_image").patch_emb)(images), np.float64)
    txt = np.asarray(jax.jit(lambda t: model.apply(v, t, train=False, method="encode_text").txt_emb)(tok),
                     np.float64)
    want = np.einsum("bd,bpd->bp", txt / np.linalg.norm(txt, axis=-1, keepdims=True),
                     patch / np.linalg.norm(patch, axis=-1, keepdims=True))
    np.testing.assert_allclose(maps.reshape(3, -1), want, atol=1e-4)


def test_evaluate_on_the_synthetic_run(syn_run):
    import ml_collections
    from medvlp_jax import evaluators
    from medvlp_jax.data.sources import synthetic
    from medvlp_jax.evaluators import grounding
    assert evaluators.get("grounding") is grounding.evaluate
    cfg = ml_collections.ConfigDict(dict(data=evaluators.default_data(), seed=0, map="auto", num_heatmaps=2))
    res = grounding.evaluate(syn_run, cfg)
    assert res["protocol/map"] == "cosine" and res["protocol/num_images"] == 32
    assert res["protocol/num_phrases"] == sum(res[f"protocol/num_phrases/{n}"] for n in synthetic._PHRASES)
    for name in [""] + [f"/{n}" for n in synthetic._PHRASES]:
        assert res[f"cnr{name}"] >= 0 and 0 <= res[f"pointing_game{name}"] <= 1 and 0 <= res[f"miou{name}"] <= 1
    assert "protocol/heatmaps" in res, sorted(k for k in res if k.startswith("protocol/"))
    # The map is already the cosine: the cosine/ keys repeat the main figures; the chance is the boxes' share.
    assert res["cosine/cnr"] == res["cnr"] and res["cosine/pointing_game"] == res["pointing_game"]
    assert "cosine/protocol/num_phrases" not in res and "cosine/pointing_game_chance" not in res
    assert 0 < res["pointing_game_chance"] < 1
    out_dir = res["protocol/heatmaps"].split(" PNG in ", 1)[1]
    pngs = sorted(os.listdir(out_dir))
    assert len(pngs) >= 2 and all(p.endswith(".png") for p in pngs)
    # The untrained baseline (this fixture's state) writes beside the checkpoint's pictures, not over them.
    assert syn_run.untrained and os.path.basename(out_dir) == "heatmaps_untrained"
    trained = grounding.evaluate(dataclasses.replace(syn_run, untrained=False), cfg)
    assert os.path.basename(trained["protocol/heatmaps"].split(" PNG in ", 1)[1]) == "heatmaps"


def test_evaluate_rewards_a_map_that_finds_the_box(syn_run, monkeypatch):
    """Maps that light up exactly the phrase's box give pointing game 1, mIoU ~1 and a large CNR."""
    import ml_collections
    from medvlp_jax import evaluators
    from medvlp_jax.evaluators import grounding
    from medvlp_jax.evaluators.localized import read_localized_split

    config = evaluators.eval_config(syn_run, ml_collections.ConfigDict(dict(data=evaluators.default_data())))
    split = read_localized_split(config, "test")
    boxes = {(q.example, q.phrase): q.boxes for q in grounding.phrase_queries(split)}
    by_image = {split.images[i].tobytes(): i for i in range(len(split))}

    rng = np.random.default_rng(0)

    def oracle(run, images, phrases, **kw):   # image-sized maps: the phrase's box, plus a little noise
        out = []
        for image, phrase in zip(images, phrases):
            b = boxes[(by_image[np.asarray(image).tobytes()], phrase)]
            out.append(grounding.box_masks(b, 32, 32).any(0) + 0.01 * rng.random((32, 32)))
        maps = np.stack(out).astype(np.float32)
        return (maps, {}) if kw.get("with_diagnostics") else maps

    monkeypatch.setattr(grounding, "phrase_maps", oracle)
    res = grounding.evaluate(syn_run, ml_collections.ConfigDict(dict(data=evaluators.default_data(),
                                                                    num_heatmaps=0)))
    assert res["pointing_game"] == 1.0 and res["miou"] > 0.8 and res["cnr"] > 1.0


def test_objective_maps_are_also_scored_as_cosine_maps(syn_run):
    """A method with its own maps: the main keys score those, cosine/* the phrase-patch cosine maps."""
    import jax.numpy as jnp
    import ml_collections
    from medvlp_jax import evaluators
    from medvlp_jax.evaluators import grounding

    def corner_maps(method_params, out):            # every word points at patch 0 (the top-left corner)
        b, t, p = out.word_emb.shape[0], out.word_emb.shape[1], out.patch_emb.shape[1]
        return jnp.broadcast_to(jax_onehot(p)[None, None], (b, t, p))

    def jax_onehot(p):
        return jnp.zeros((p,)).at[0].set(1.0)

    run = dataclasses.replace(syn_run, objective=syn_run.objective._replace(similarity_maps=corner_maps))
    cfg = ml_collections.ConfigDict(dict(data=evaluators.default_data(), seed=0, map="auto", num_heatmaps=0))
    res = grounding.evaluate(run, cfg)
    cosine = grounding.evaluate(syn_run, cfg)
    assert res["protocol/map"] == "objective"
    for k in ("cnr", "pointing_game", "miou"):
        assert res[f"cosine/{k}"] == pytest.approx(cosine[k])
    # The corner map points at the top-left patch's centre ((0.5 / 4) of the crop on the 4x4 grid): a hit
    # exactly when one of the phrase's boxes holds that point (the crop's opacity box starts at 0.0625).
    from medvlp_jax.evaluators.localized import read_localized_split
    split = read_localized_split(evaluators.eval_config(syn_run, cfg), "test")
    hits = [any(b[0] <= 0.125 <= b[2] and b[1] <= 0.125 <= b[3] for b in q.boxes)
            for q in grounding.phrase_queries(split)]
    assert 0 < np.mean(hits) < 1 and res["pointing_game"] == pytest.approx(np.mean(hits))
    cfg.also_cosine = False
    assert not any(k.startswith("cosine/") for k in grounding.evaluate(run, cfg))


def test_map_collapse_against_hand_built_grids():
    from medvlp_jax.evaluators.grounding import map_collapse
    flat = np.full((2, 2, 3), 0.25, np.float32)                        # constant maps (to float32 precision)
    flat[1] += np.float32(1e-8)
    peaked = np.zeros((4, 2, 3), np.float32)
    for k, cell in enumerate([4, 4, 4, 1]):
        peaked[k].flat[cell] = 1.0
    res = map_collapse(np.concatenate([flat, peaked]))
    assert res["flat_fraction"] == pytest.approx(2 / 6)
    # peaks: the flat maps at cell 0 (first maximum), then 4, 4, 4, 1 -> cell 4 holds 3 of 6
    assert res["argmax_mode_share"] == pytest.approx(3 / 6) and res["argmax_mode_cell"] == 4
    assert map_collapse(np.eye(4).reshape(4, 2, 2))["argmax_mode_share"] == 0.25


def test_evaluate_reports_gloria_attention_diagnostics(syn_run):
    """A GLoRIA objective on the synthetic run: attention/* are the means over the phrase queries of the
    objective's own statistics, computed here on the same (image, phrase) rows."""
    import jax
    import ml_collections
    from medvlp_jax import evaluators
    from medvlp_jax.data import tokenizer as tokenizer_lib
    from medvlp_jax.evaluators import grounding
    from medvlp_jax.evaluators.localized import read_localized_split
    from medvlp_jax.methods import make_objective

    gloria = make_objective(ml_collections.ConfigDict(dict(name="gloria")), steps_per_epoch=1)
    run = dataclasses.replace(syn_run, objective=gloria)
    cfg = ml_collections.ConfigDict(dict(data=evaluators.default_data(), seed=0, map="auto", num_heatmaps=0,
                                         also_oracle=False))
    res = grounding.evaluate(run, cfg)
    split = read_localized_split(evaluators.eval_config(run, cfg), "test")
    queries = grounding.phrase_queries(split)
    tokens = tokenizer_lib.encode(run.tokenizer, [q.phrase for q in queries], run.config.data.max_text_len)
    batch = {"image": split.images[[q.example for q in queries]], **tokens}
    out = jax.jit(lambda v, b: run.model.apply(v, b, train=False))(run.variables, batch)
    want = jax.device_get(gloria.map_diagnostics({}, out))
    for k, v in want.items():
        assert res[f"attention/{k}"] == pytest.approx(float(np.mean(v)), rel=1e-4)
    assert res["attention/uniform_peak_mass"] == pytest.approx(1 / 16)          # the 4x4 grid
    assert 0 < res["attention/first_softmax_cls_share"] < 1
    assert 1 / 16 <= res["attention/word_map_peak_mass"] <= 1
    for prefix in ("", "cosine/"):
        assert 0 <= res[f"{prefix}flat_fraction"] <= 1 and 0 < res[f"{prefix}argmax_mode_share"] <= 1
    # Methods without diagnostics, and cosine maps, report no attention/* keys.
    assert not any(k.startswith("attention/") for k in grounding.evaluate(syn_run, cfg))


def test_cells_in_box_follow_the_grid_centres():
    """Half-pixel centres: the same cells as metrics.box_to_mask without keep_small; CNN centres (cell i at pixel
    s * i) move the cells a box holds up-left by half a cell."""
    from medvlp_jax import metrics
    from medvlp_jax.evaluators.grounding import cells_in_box
    rng = np.random.default_rng(0)
    for _ in range(20):
        y0, x0 = rng.uniform(0, 0.8, 2)
        box = np.array([y0, x0, y0 + rng.uniform(0.05, 0.2), x0 + rng.uniform(0.05, 0.2)])
        np.testing.assert_array_equal(cells_in_box(box, (8, 8)), metrics.box_to_mask(box, 8, 8, keep_small=False))
    box = np.array([0.26, 0.26, 0.3, 0.3])                  # 33.3..38.4 px of 128: no centre of either kind
    cnn = ((16 / 128, 0.5 / 128),) * 2                       # cell i of an 8x8 layer3 grid centred on pixel 16 i
    assert not cells_in_box(box, (8, 8)).any() and not cells_in_box(box, (8, 8), cnn).any()
    box = np.array([0.25, 0.25, 0.3, 0.3])                  # pixels 32..38: holds cell 2's CNN centre (32.5 px)
    assert cells_in_box(box, (8, 8), cnn)[2, 2] and cells_in_box(box, (8, 8), cnn).sum() == 1
    assert not cells_in_box(box, (8, 8)).any()               # the half-pixel centre of cell 2 is at 40 px
