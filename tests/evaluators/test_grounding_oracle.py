"""Oracle checks of phrase grounding (issue 10, item 1): is the evaluator itself right, end to end?

Maps built from the ground truth at an encoder's grid size go through the evaluator's own code path
(``read_localized_split`` -> ``phrase_maps`` / ``phrase_map_fn`` -> ``batched_apply`` -> grid reshape ->
``viz.upsample_bilinear`` -> ``score_map`` -> ``aggregate``; ``write_heatmaps`` for the pictures) and must
score as an oracle does; the same maps flipped left-right, flipped up-down or transposed must score at or
below the pointing game's chance. The oracle is computed by this file's own area averaging from a source
independent of the box path under test: the evaluation image's pixels or the stored finding masks (both
decoded by ``decode.decode_image``), never the boxes (mapped into the crop by ``crop_boxes``). A wrong box
transform, a transposed or flipped grid, a shifted upsampling or a wrongly drawn box therefore fails here.

The fixture is built for that: stored images are not square (72x96 and 96x72, so the resize pads one axis
or the other) and are resized to 80 and centre-cropped to 64 (as the demo's 146/128), and every finding is a
bright ellipse off-centre and off the diagonal (top-right or bottom-left quadrant: its mirror images and its
transpose do not overlap it; checked below). Grids: 4x4, 8x8, 16x16 and a non-square, non-dividing 6x10.
"""
from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import pytest

CROP, RESIZE = 64, 80
STORED = ((72, 96), (96, 72))            # (height, width): landscape pads y, portrait pads x
GRIDS = ((4, 4), (8, 8), (16, 16), (6, 10))
CONTROLS = ("fliplr", "flipud", "transpose")
KINDS = ("opacity", "effusion", "mass", "consolidation")
WHERE = {"tr": "right upper", "bl": "left lower"}   # wording only; placement is by quadrant
BOX_GREEN = np.array([0, 255, 102])      # viz.BOX_COLOR


# ----------------------------------------------------------------------------------------------------------
# The oracle: area averaging onto a grid (this file's own code, independent of the evaluator's).

def area_weights(n: int, g: int) -> np.ndarray:
    """[g, n] weights that average n pixels into g equal cells (fractional overlaps weighted by length)."""
    edges = np.arange(g + 1) * n / g
    px = np.arange(n)
    overlap = np.minimum(edges[1:, None], px[None, :] + 1) - np.maximum(edges[:-1, None], px[None, :])
    w = np.clip(overlap, 0.0, None)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def area_pool(a: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[..., h, w] -> [..., gh, gw]: the mean of ``a`` over each grid cell (row-major, y first)."""
    a = np.asarray(a, np.float32)
    return np.einsum("gh,...hw,kw->...gk", area_weights(a.shape[-2], grid[0]), a, area_weights(a.shape[-1], grid[1]))


def control(grid_map, how: str):
    """A wrongly oriented copy of [..., gh, gw] maps: 'fliplr', 'flipud', 'transpose' (or 'none')."""
    if how == "none":
        return grid_map
    if how == "fliplr":
        return grid_map[..., ::-1]
    if how == "flipud":
        return grid_map[..., ::-1, :]
    if how == "transpose":
        return grid_map.swapaxes(-1, -2)
    raise ValueError(how)


@dataclasses.dataclass(frozen=True)
class PixelOracleModel:
    """Stands in for the DualEncoder: each patch's value is the evaluation image's brightness averaged over
    the patch's cell (every fixture image shows one bright finding on a flat background).

    ``patch_emb`` [b, p, 2] = (value, 1) row-major over the grid and ``txt_emb`` = (1, 0), so the cosine map
    is a monotone function of the value (same maximum); ``oracle`` [b, p] is the value itself.
    """
    grid: tuple[int, int]
    how: str = "none"

    def apply(self, variables, batch, train=False):
        import jax.numpy as jnp
        x = batch["image"][..., 0]                                        # [b, crop, crop] in [-1, 1]
        wy = jnp.asarray(area_weights(x.shape[1], self.grid[0]))
        wx = jnp.asarray(area_weights(x.shape[2], self.grid[1]))
        g = control(jnp.einsum("gh,bhw,kw->bgk", wy, x, wx), self.how)    # [b, gh, gw]
        b, gh, gw = g.shape
        value = g.reshape(b, gh * gw)
        return SimpleNamespace(grid=(gh, gw), oracle=value, word_mask=batch["attention_mask"] > 0,
                               patch_emb=jnp.stack([value, jnp.ones_like(value)], axis=-1),
                               txt_emb=jnp.broadcast_to(jnp.array([1.0, 0.0]), (b, 2)))


def _oracle_maps(method_params, out):
    """similarity_maps of the oracle objective: every word slot gets the patch values [b, t, p]."""
    import jax.numpy as jnp
    t = out.word_mask.shape[1]
    return jnp.broadcast_to(out.oracle[:, None, :], (out.oracle.shape[0], t, out.oracle.shape[1]))


# ----------------------------------------------------------------------------------------------------------
# Fixture data: non-square radiograph-like images, one bright ellipse per finding, masks and boxes.

def _crop_geometry(h: int, w: int) -> tuple[float, int, int]:
    """(scale, pad_y - off, pad_x - off) of stored -> crop pixels, written out for placing the blobs only."""
    scale = RESIZE / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    off = (RESIZE - CROP) // 2
    return scale, (RESIZE - nh) // 2 - off, (RESIZE - nw) // 2 - off


def _blob(rng, h: int, w: int, quadrant: str) -> np.ndarray:
    """[h, w] bool ellipse centred off-centre and off-diagonal in the crop ('tr' or 'bl' quadrant)."""
    low, high = rng.uniform(0.21, 0.29), rng.uniform(0.71, 0.79)
    cy, cx = (low, high) if quadrant == "tr" else (high, low)
    ry, rx = rng.uniform(0.13, 0.17, size=2)                   # fractions of the crop: 8-11 px of 64
    scale, dy, dx = _crop_geometry(h, w)
    # Crop fractions -> stored pixels (inverse of the resize / pad / centre crop).
    cy_s, cx_s = (cy * CROP - dy) / scale, (cx * CROP - dx) / scale
    ry_s, rx_s = ry * CROP / scale, rx * CROP / scale
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return ((yy - cy_s) / ry_s) ** 2 + ((xx - cx_s) / rx_s) ** 2 <= 1.0


def oracle_examples(n: int, *, multi: bool, seed: int):
    """Schema examples: ``multi`` False: one finding per image; True: two findings with their own phrases
    (top-right and bottom-left), and every third image one phrase naming two nodules (a two-box query)."""
    from medvlp_jax.data import images, render
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = STORED[i % len(STORED)]
        if not multi:
            found = [(KINDS[i % len(KINDS)], rng.choice(["tr", "bl"]))]
            found = [(k, q, f"{k} {WHERE[q]} zone") for k, q in found]
        elif i % 3 == 2:
            found = [("nodule", "tr", "bilateral nodules"), ("nodule", "bl", "bilateral nodules")]
        else:
            a, b = rng.choice(len(KINDS), size=2, replace=False)
            found = [(KINDS[a], "tr", f"{KINDS[a]} {WHERE['tr']} zone"),
                     (KINDS[b], "bl", f"{KINDS[b]} {WHERE['bl']} zone")]
        img = 70.0 + 4.0 * rng.standard_normal((h, w))
        masks = []
        for _, quadrant, _ in found:
            m = _blob(rng, h, w, quadrant)
            img = img + 140.0 * m
            masks.append(m)
        names = [k for k, _, _ in found]
        phrases = [p for _, _, p in found]
        labels = np.array([0.0] + [float(k in names) for k in KINDS + ("nodule",)], np.float32)
        yield {
            "id": f"oracle-{seed}-{i:03d}", "patient_id": f"p{seed}-{i:03d}", "study_id": f"s{i:03d}",
            "image": images.encode_png(np.clip(img, 0, 255).astype(np.uint8)),
            "report": ". ".join(dict.fromkeys(phrases)) + ".", "labels": labels,
            "finding_names": names, "finding_phrases": phrases,
            "finding_boxes": np.stack([render.mask_box(m) for m in masks]).astype(np.float32),
            "finding_masks": [images.encode_png(m) for m in masks],
        }


@pytest.fixture(scope="module")
def oracle_root(tmp_path_factory):
    """Prepared data: split 'single' (24 images, one finding each), 'multi' (12 images), a tokenizer."""
    from medvlp_jax.data import tokenizer as tokenizer_lib
    from medvlp_jax.data.writer import ShardedWriter
    root = str(tmp_path_factory.mktemp("oracle"))
    texts = []
    for split, n, multi in (("single", 24, False), ("multi", 12, True)):
        with ShardedWriter(root, split, num_shards=2, class_names=["normal", *KINDS, "nodule"], name="oracle") as w:
            for ex in oracle_examples(n, multi=multi, seed=len(texts)):
                texts.append(ex["report"])
                w.write(ex)
    tokenizer_lib.train_wordpiece(texts * 2, os.path.join(root, "tokenizer"), vocab_size=120)
    return root


@pytest.fixture(scope="module")
def oracle_run(oracle_root, tmp_path_factory):
    """A Run whose model is the pixel oracle (8x8) and whose objective hands its values out as word maps."""
    from medvlp_jax import sharding as sharding_lib
    from medvlp_jax.data import tokenizer as tokenizer_lib
    from medvlp_jax.evaluators.common import Run
    from medvlp_jax.methods import Objective
    from tests.helpers import load_config
    config = load_config("convirt", "test")
    config.data.root = oracle_root
    config.data.tokenizer_dir = os.path.join(oracle_root, "tokenizer")
    config.data.resize, config.data.crop = RESIZE, CROP
    objective = Objective(name="oracle", init=None, loss=None, similarity_maps=_oracle_maps)
    return Run(config=config, workdir=str(tmp_path_factory.mktemp("oracle_run")), step=None,
               model=PixelOracleModel((8, 8)), variables={}, method_params={}, objective=objective,
               mesh=sharding_lib.make_mesh(config.mesh),
               tokenizer=tokenizer_lib.load_tokenizer(config.data.tokenizer_dir), state=None)


def _cfg(split: str, **fields):
    import ml_collections
    from medvlp_jax import evaluators
    return ml_collections.ConfigDict(dict(data=evaluators.default_data(test_split=split, resize=RESIZE, crop=CROP),
                                          num_heatmaps=0, **fields))


def _read(run, split: str):
    from medvlp_jax import evaluators
    from medvlp_jax.evaluators.localized import read_localized_split
    return read_localized_split(evaluators.eval_config(run, _cfg(split)), split)


# ----------------------------------------------------------------------------------------------------------
# The fixture is what the controls need.

def test_fixture_findings_are_off_centre_off_diagonal_and_boxed(oracle_run):
    """Decoded masks sit inside their crop boxes, the boxes are tight (within a pixel of the mask's own
    extent), and no mask overlaps its left-right or up-down mirror or its transpose."""
    from medvlp_jax import metrics
    for name in ("single", "multi"):
        split = _read(oracle_run, name)
        assert len(split) == {"single": 24, "multi": 12}[name] and split.findings_dropped == 0
        assert split.masks_from_boxes == 0 and split.size == CROP
        for i in range(len(split)):
            # The evaluation image shows each finding: brighter inside its mask than anywhere outside all masks.
            image = split.images[i][..., 0]
            union = split.masks[i].any(axis=0)
            for mask, box in zip(split.masks[i], split.boxes[i]):
                assert image[mask].mean() > image[~union].mean() + 0.8
                assert not (mask & metrics.box_to_mask(box, CROP, CROP) ^ mask).any()   # mask inside box
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                extent = np.array([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])
                np.testing.assert_allclose(box * CROP, extent, atol=1.0)
                for how in CONTROLS:
                    assert not (mask & control(mask, how)).any(), (name, i, how)


# ----------------------------------------------------------------------------------------------------------
# The evaluator on oracle maps.

@pytest.fixture(scope="module")
def single(oracle_run):
    """Split 'single' as the evaluator reads it."""
    return _read(oracle_run, "single")


def _with_model(run, grid, how: str = "none"):
    return dataclasses.replace(run, model=PixelOracleModel(tuple(grid), how))


def _mean(scores, key: str) -> float:
    return float(np.mean([s[key] for s in scores]))


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_oracle_maps_score_as_an_oracle_through_evaluate(oracle_run, grid):
    """evaluate() with pixel-oracle maps: pointing game >= 0.95 for every finding, CNR > 1.5 and mIoU > 0.25
    (measured: PG 1.0 at every grid, CNR 2.3-2.5, mIoU 0.31 at 4x4 and 0.54-0.61 finer; uniform-noise grid maps
    score CNR 0.17-0.44 and mIoU 0.09 here); the cosine maps (a monotone function of the same values) point at
    the same place."""
    from medvlp_jax.evaluators import grounding
    res = grounding.evaluate(_with_model(oracle_run, grid), _cfg("single"))
    assert res["protocol/map"] == "objective" and res["protocol/num_phrases"] == 24
    assert 0.04 < res["pointing_game_chance"] < 0.2           # the boxes' share of the patch centres
    assert res["pointing_game"] >= 0.95, res
    assert res["cnr"] > 1.5 and res["miou"] > 0.25, res
    assert res["cosine/pointing_game"] == res["pointing_game"]
    assert res["oracle/pointing_game"] >= 0.95 and res["oracle/cnr"] > 1.5, res      # the evaluator's mask oracle
    for kind in KINDS:
        assert res[f"pointing_game/{kind}"] >= 0.95


@pytest.mark.parametrize("grid", [(8, 8), (6, 10), (16, 16)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_misoriented_oracle_maps_score_at_or_below_chance(oracle_run, single, grid):
    """The same oracle flipped left-right, up-down or transposed (what a y/x swap or a flipped grid or
    upsampling would do) misses: pointing game <= chance, mIoU ~0, CNR a fraction of the oracle's."""
    from medvlp_jax.evaluators import grounding
    _, _, right, _, _ = grounding.ground_split(_with_model(oracle_run, grid), single, mode="objective")
    assert _mean(right, "pointing_game") >= 0.95
    for how in CONTROLS:
        _, _, wrong, _, _ = grounding.ground_split(_with_model(oracle_run, grid, how), single, mode="objective")
        assert _mean(wrong, "pointing_game") <= _mean(right, "pointing_game_chance"), how
        assert _mean(wrong, "miou") < 0.05 and _mean(wrong, "cnr") < _mean(right, "cnr") / 3, how


def test_pointing_game_chance_is_the_hit_rate_of_noise_maps(single):
    """``pointing_game_chance`` is what it says: uniform-noise grid maps hit at that rate (8x8, 60 draws per
    phrase; 3 standard errors). Before the patch-centre rule, noise maps whose maximum fell on an edge patch
    always missed (a plateau to the border under the strict tie rule), well below the stated chance."""
    from medvlp_jax import viz
    from medvlp_jax.evaluators import grounding
    rng = np.random.default_rng(0)
    queries = grounding.phrase_queries(single)
    hits, chance = [], []
    for _ in range(60):
        for q in queries:
            g = rng.random((8, 8))
            s = grounding.score_map(viz.upsample_bilinear(g, (CROP, CROP)), q.boxes, grid_map=g)
            hits.append(s["pointing_game"])
            chance.append(s["pointing_game_chance"])
    se = np.sqrt(np.mean(chance) * (1 - np.mean(chance)) / len(hits))
    assert abs(np.mean(hits) - np.mean(chance)) < 3 * se, (np.mean(hits), np.mean(chance), se)


def test_edge_patch_maximum_is_scored_at_the_patch_centre():
    """A unique maximum on an edge patch: its upsampled plateau reaches the border, yet the map points at
    the patch centre; a box holding that centre is a hit, one beside it a miss, a constant map a miss."""
    from medvlp_jax import viz
    from medvlp_jax.evaluators import grounding
    g = np.zeros((4, 4))
    g[0, 3] = 1.0                                        # top-right patch, centre (0.125, 0.875)
    up = viz.upsample_bilinear(g, (32, 32))
    assert (up == up.max()).sum() > 1 and up[0, 31] == up.max()          # the plateau reaches the corner
    hit = grounding.score_map(up, np.array([[0.05, 0.7, 0.3, 0.95]]), grid_map=g)
    assert hit["pointing_game"] == 1.0 and hit["pointing_game_chance"] == 1 / 16
    assert grounding.score_map(up, np.array([[0.15, 0.7, 0.4, 0.95]]), grid_map=g)["pointing_game"] == 0.0
    flat = np.ones((4, 4))
    assert grounding.score_map(viz.upsample_bilinear(flat, (32, 32)), np.array([[0.0, 0.0, 0.6, 1.0]]),
                               grid_map=flat)["pointing_game"] == 0.0
    # A box smaller than a patch that holds no patch centre cannot be pointed at (and adds nothing to chance).
    tiny = grounding.score_map(up, np.array([[0.0, 0.95, 0.05, 1.0]]), grid_map=g)
    assert tiny["pointing_game"] == 0.0 and tiny["pointing_game_chance"] == 0.0


@pytest.fixture(scope="module")
def mask_oracle(oracle_run):
    """Split 'multi' and a stand-in for ``grounding.phrase_maps`` returning [m, gh, gw] grid maps of the
    phrase's decoded finding masks (union over findings sharing the phrase), area-averaged by this file."""
    split = _read(oracle_run, "multi")
    by_image = {split.images[i].tobytes(): i for i in range(len(split))}

    def make(grid, how="none"):
        def phrase_maps(run, images, phrases, **kw):
            out = []
            for image, phrase in zip(images, phrases):
                i = by_image[np.asarray(image).tobytes()]
                union = split.masks[i][[p == phrase for p in split.phrases[i]]].any(axis=0)
                out.append(control(area_pool(union, grid), how))
            return (np.stack(out), {}) if kw.get("with_diagnostics") else np.stack(out)
        return phrase_maps

    return split, make


@pytest.mark.parametrize("grid", [(4, 4), (8, 8), (16, 16)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_mask_oracle_with_several_findings_per_image(oracle_run, mask_oracle, monkeypatch, grid):
    """Images with two findings (and two-box phrases): the mask oracle scores as an oracle, and misoriented
    copies of the single-box queries miss (a two-box query spans both off-diagonal quadrants, so its
    transpose would hit)."""
    from medvlp_jax.evaluators import grounding
    split, make = mask_oracle
    monkeypatch.setattr(grounding, "phrase_maps", make(grid))
    res = grounding.evaluate(oracle_run, _cfg("multi"))
    assert res["protocol/num_phrases"] == 20 and res["protocol/num_phrases/nodule"] == 4
    assert res["pointing_game"] >= 0.95 and res["cnr"] > 1.5 and res["miou"] > 0.35, res
    # The evaluator's own oracle (its pooling of the masks, nearest cell centre) is this file's area-pooled mask
    # oracle at half-pixel centres: the same scores.
    for k in ("pointing_game", "cnr", "miou"):
        assert res[f"oracle/{k}"] == pytest.approx(res[k], rel=1e-5), k
    # Hot on every finding, and each phrase's map differs from the other phrase's on the same image.
    assert res["cold_fraction"] == 0.0 and res["signed_contrast"] > 1.0, res
    assert res["phrase_specificity"] > 1.0, res
    assert res["protocol/num_phrases_multi"] == 16 and res["pointing_game_multi"] >= 0.95, res
    assert res["pointing_game_multi_other"] <= 0.05, res          # never into the other phrase's finding
    queries, _, scores, _, _ = grounding.ground_split(oracle_run, split)
    two_box = [len(q.boxes) == 2 for q in queries]
    assert sum(two_box) == 4
    chance = np.mean([s["pointing_game_chance"] for s in scores])
    for how in CONTROLS:
        monkeypatch.setattr(grounding, "phrase_maps", make(grid, how))
        _, _, wrong, _, _ = grounding.ground_split(oracle_run, split)
        single = [s for s, two in zip(wrong, two_box) if not two]
        assert np.mean([s["pointing_game"] for s in single]) <= chance, how
        assert np.mean([s["miou"] for s in single]) < 0.05, how
        assert np.mean([s["signed_contrast"] for s in single]) < 0, how      # cold on its own finding


# ----------------------------------------------------------------------------------------------------------
# The real encoders' patch order, through the evaluator's reshape.

def random_variables(model, model_cfg, seed: int = 0):
    """Random encoder variables drawn with numpy on the model's shapes (He-normal kernels and embeddings,
    unit scales, zero biases, BatchNorm statistics mean 0 / var 1): what ``model.init`` would give, without
    its compile (~20 s for the demo ResNet on a loaded 2-core host)."""
    import jax
    from medvlp_jax.models.dual_encoder import example_batch
    abstract = jax.eval_shape(lambda k: model.init(k, example_batch(model_cfg, 1), train=False),
                              jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "batch_stats" in name:
            return np.full(leaf.shape, 1.0 if name.endswith("['var']") else 0.0, leaf.dtype)
        if name.endswith("['scale']") or name.endswith("['bias']"):
            return np.full(leaf.shape, 1.0 if name.endswith("['scale']") else 0.0, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
        return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.mark.parametrize("variant,image,cell", [("demo", "resnet", 16), ("test", "vit", 8)])
def test_real_encoder_patch_order_matches_the_evaluator_grid(oracle_run, variant, image, cell):
    """A bright square on one grid cell of a blank image changes the local features of that cell most: the
    evaluator's [gh, gw] map (``phrase_maps``, objective mode, word maps = each patch's feature change from
    the blank image's) peaks on or next to the lit cell and far from its mirror images and transpose, for
    the demo ResNet (layer3, 8x8 at 128 px) and a ViT (4x4 at 32 px) with random weights.

    "Next to": the ResNet's receptive fields overlap and, with torchvision's symmetric padding, layer3 cell
    i is centred near pixel 16 i, not at its block's centre 16 i + 8, so a neighbour can respond nearly as
    much. The ViT's patches do not overlap: there the lit cell itself must win.
    """
    import jax.numpy as jnp
    from medvlp_jax.evaluators import grounding
    from medvlp_jax.methods import Objective
    from medvlp_jax.models.dual_encoder import build_model
    from tests.helpers import load_config
    config = load_config("convirt", f"{variant},image={image}")
    config.data.max_text_len = 8
    model = build_model(config.model)
    variables = random_variables(model, config.model)

    def change_from_row0(method_params, out):   # [b, t, p]: how far each patch's features moved from image 0's
        d = jnp.linalg.norm(out.patch_feat - out.patch_feat[:1], axis=-1)
        return jnp.broadcast_to(d[:, None, :], (d.shape[0], out.word_mask.shape[1], d.shape[1]))

    size = config.data.crop
    g = size // cell
    lit = [(g - 1, 0), (0, g - 1), (1, g - 2), (g - 2, 1)]
    images = np.zeros((1 + len(lit), size, size, 1), np.float32)
    for k, (r, c) in enumerate(lit, start=1):
        images[k, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 1.0
    run = dataclasses.replace(oracle_run, config=config, model=model, variables=variables,
                              objective=Objective(name="probe", init=None, loss=None, similarity_maps=change_from_row0))
    maps = grounding.phrase_maps(run, images, ["opacity"] * len(images), mode="objective", batch_size=8)
    assert maps.shape == (len(images), g, g)
    tolerance = 1 if image == "resnet" else 0
    for k, (r, c) in enumerate(lit, start=1):
        peak = np.array(np.unravel_index(int(np.argmax(maps[k])), (g, g)))
        assert np.abs(peak - (r, c)).max() <= tolerance, (k, (r, c), peak, np.round(maps[k] / maps[k].max(), 2))
        for wrong in [(r, g - 1 - c), (g - 1 - r, c), (c, r)]:       # mirrors and transpose, where distinct
            if np.abs(np.array(wrong) - (r, c)).max() >= 2:
                assert maps[k][wrong] < maps[k].max()


# ----------------------------------------------------------------------------------------------------------
# The picture: the hot region and the drawn box coincide in the saved PNG.

def _panels(png: np.ndarray, n_panels: int) -> list[dict]:
    """Per heatmap panel of a ``phrase_figure`` PNG: the drawn box's pixel bbox and the hot pixels' centroid.

    Panels are equal-width columns; the first shows the image alone. The box is the pixels of the box
    colour; "hot" pixels are those where the jet overlay is red-yellow (red exceeds blue by > 60 of 255, the
    upper ~40% of the normalised map; grey, white, black and the green box all fall short).
    """
    rgb = png[..., :3].astype(np.int64)
    width = rgb.shape[1] / n_panels
    out = []
    for k in range(1, n_panels):
        band = rgb[:, int(k * width):int((k + 1) * width)]
        green = np.all(np.abs(band - BOX_GREEN) <= 40, axis=-1)
        hot = (band[..., 0] - band[..., 2]) > 60
        ys, xs = np.nonzero(green)
        hy, hx = np.nonzero(hot)
        out.append({"box": np.array([ys.min(), xs.min(), ys.max(), xs.max()]) if len(ys) else None,
                    "hot": np.array([hy.mean(), hx.mean()]) if len(hy) else None, "n_hot": len(hy)})
    return out


def _inside(point, box) -> bool:
    return bool(box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3])


def test_oracle_heatmap_png_has_the_hot_region_inside_the_drawn_box(oracle_run, mask_oracle, tmp_path):
    """``write_heatmaps`` on 8x8 mask-oracle maps: in every phrase panel of the saved PNG the hot region's
    centroid lies inside the drawn box; for left-right flipped maps it lies outside. Set
    ``ORACLE_HEATMAPS_DIR`` to keep the PNGs (e.g. /tmp/oracle_heatmaps) and look at them."""
    import matplotlib.image
    from medvlp_jax import viz
    from medvlp_jax.evaluators import grounding
    split, make = mask_oracle
    queries = [q for q in grounding.phrase_queries(split) if len(q.boxes) == 1]
    per_example = {}
    for q in queries:
        per_example.setdefault(q.example, []).append(q)
    for how in ("none", "fliplr"):
        grids = make((8, 8), how)(oracle_run, split.images[[q.example for q in queries]], [q.phrase for q in queries])
        maps = np.stack([viz.upsample_bilinear(g, (CROP, CROP)) for g in grids])
        out_dir = os.path.join(os.environ.get("ORACLE_HEATMAPS_DIR", "") or str(tmp_path), how)
        paths = grounding.write_heatmaps(split, queries, maps, out_dir, n=4)
        assert len(paths) == 4
        for path, example in zip(paths, list(per_example)[:4]):
            n_phrases = len(per_example[example])
            panels = _panels(matplotlib.image.imread(path) * 255, n_phrases + 1)
            for p in panels:
                assert p["box"] is not None and p["hot"] is not None and p["n_hot"] > 20, (path, p)
                assert _inside(p["hot"], p["box"]) == (how == "none"), (path, how, p)
