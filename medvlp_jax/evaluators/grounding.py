"""Phrase grounding (methods.md 10.5): does the phrase's similarity map light up the finding's box?

For every test example and every distinct finding phrase in it (``finding_phrases``; findings sharing a
phrase are one query whose boxes are the union), the phrase is encoded by the text tower with its image,
and a map over the patch grid is formed:

* ``cfg.map="objective"``: the method's own word-to-patch maps (``Objective.similarity_maps`` [b, t, p]:
  MGCA/GLoRIA attention, SISTA/AGA/PLAN grouping weights), averaged over the phrase's words (``word_mask``);
* ``cfg.map="cosine"``: cosine between the phrase embedding ``txt_emb`` and each ``patch_emb`` (the MS-CXR
  protocol; the only choice for ConVIRT, whose objective has no local maps);
* ``cfg.map="auto"`` (default): ``objective`` when the method defines maps, else ``cosine``.

The [gh, gw] map is upsampled bilinearly to the evaluation crop, each cell at its receptive-field centre
(``cfg.grid_alignment``: ALIGNMENTS; half-pixel centres for ViT patches), and scored against
the boxes, in the crop's coordinates (same resize / pad / centre crop as the images):

* ``cnr``: contrast-to-noise ratio inside vs outside each box, averaged over the phrase's boxes
  (``metrics.cnr``); ``miou``: IoU of the min-max normalised map thresholded at 0.1..0.5 with the boxes'
  union, averaged (``metrics.miou_at_thresholds``);
* ``pointing_game``: the map points into a box (``metrics.pointing_game``). The point is the centre of the
  grid patch holding the maximum (ties: every tied patch's centre must be in a box), not the upsampled
  map's maximum pixel: the bilinear upsampling clamps at the edges, so a maximum on an edge patch becomes
  a plateau from the patch centre to the image border, and the strict tie rule then counted it a miss
  whatever the boxes (on the demo's 8x8 grid ~40% of untrained maps peak on an edge patch; noise maps
  scored 0.09 against a stated chance of 0.14).

``cfg.also_oracle`` (default True) adds ``oracle/pointing_game``, ``oracle/cnr``, ``oracle/miou`` (and per
finding): the same protocol on maps built from the finding masks at the encoder's grid (``oracle_grid_maps``),
the best a map of that grid can score, beside the chance level below.

``cfg.also_cosine`` (default True) adds the cosine maps' scores as ``cosine/cnr``, ``cosine/pointing_game``,
``cosine/miou`` (and per finding) whatever ``map`` is, so every method is also scored on the MS-CXR protocol
(a method's own maps can collapse onto one region while its embeddings still localise: GLoRIA's demo run).

Why maps fail, beside the protocol's scores (CNR is unsigned, so a map that is cold on the finding scores
as well as one that is hot on it):

* ``signed_contrast``: (mean of the map inside the boxes - mean outside) / the map's standard deviation,
  averaged over phrases (``score_map``); ``cold_fraction``: the share of phrases whose map is lower inside
  their boxes than outside (about 0.5 for maps unrelated to the boxes, near 1 for inverted maps);
* ``phrase_specificity``: 1 - the mean Pearson correlation of the grid maps of two different phrases on the
  same image (0: the map ignores the text; ``map_specificity``);
* ``image_specificity``: 1 - the mean correlation of the grid maps of the same phrase text on different
  images (0: the map ignores the image, e.g. words tied to fixed positions).
* ``pointing_game_multi`` / ``pointing_game_multi_other``: on images with several phrases, the pointing game
  of each phrase's map on its own boxes and on the other phrases' boxes (``phrase_discrimination``): a map
  that lights up whatever stands out, whatever the phrase, scores the two alike.

Collapsed maps, which the scores above only show as chance-level figures:

* ``flat_fraction``: the share of phrases whose grid map is constant to float32 precision (range within
  1e-5 of its largest magnitude); such a map has no maximum, and the pointing game takes its first cell;
* ``argmax_mode_share``: the share of phrases whose map peaks in the most common peak cell
  (``argmax_mode_cell``, row-major index): near 1 when every map points at one place whatever the image
  (1 / cells or so for maps that follow the findings);
* ``attention/<name>``: the method's own statistics of its maps, averaged over phrases, for methods that
  define ``Objective.map_diagnostics`` (GLoRIA: ``first_softmax_cls_share``, the weight that [CLS] takes in
  the authors' first softmax over words, and ``word_map_peak_mass``, 1 / cells for uniform word maps), with
  ``attention/uniform_peak_mass`` = 1 / cells beside them.

Results: means over phrases, per finding name (``cnr/<name>``, ...), ``pointing_game_chance`` (the share of
the grid's patch centres inside the boxes: the hit rate of a map whose maximum falls on a uniformly random
patch; about the boxes' share of the image), and protocol facts. A few figures
(image, one panel per phrase with its box) go to ``cfg.heatmaps_dir`` (default ``<workdir>/eval/heatmaps/``,
``eval/heatmaps_untrained/`` for the untrained baseline;
``cfg.num_heatmaps`` of them).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medvlp_jax import metrics, sharding as sharding_lib, viz
from medvlp_jax.data import tokenizer as tokenizer_lib
from medvlp_jax.evaluators import EVALUATORS
from medvlp_jax.evaluators.protocol import data_info, default_data, eval_config
from medvlp_jax.evaluators.dense import batched_apply
from medvlp_jax.evaluators.localized import LocalizedSplit, read_localized_split

MAP_MODES = ("auto", "objective", "cosine")
# How grid cells map onto the crop: "encoder" puts each cell at the image tower's receptive-field centre
# (``EncoderOutputs.grid_centres``: a torchvision ResNet's cells sit half a cell up-left of the half-pixel
# convention); "half_pixel" assumes (i + 0.5) / g for every encoder, as bilinear upsampling in the reference
# pipelines does. The two agree for ViT patches.
ALIGNMENTS = ("encoder", "half_pixel")


@dataclasses.dataclass
class PhraseQuery:
    """One grounding query: a phrase of an example and every box it names.

    Attributes:
        example: row of the split.
        phrase: the phrase text.
        name: finding name (of the phrase's first finding).
        boxes: [k, 4] (ymin, xmin, ymax, xmax) fractions of the crop.
    """
    example: int
    phrase: str
    name: str
    boxes: np.ndarray


def phrase_queries(split: LocalizedSplit, examples: Optional[Sequence[int]] = None) -> list[PhraseQuery]:
    """The grounding queries of a split: one per (example, distinct non-empty phrase), in order."""
    out = []
    for i in (range(len(split)) if examples is None else examples):
        by_phrase: dict[str, list[int]] = {}
        for j, phrase in enumerate(split.phrases[i]):
            if phrase.strip():
                by_phrase.setdefault(phrase, []).append(j)
        for phrase, js in by_phrase.items():
            out.append(PhraseQuery(int(i), phrase, split.names[i][js[0]], split.boxes[i][js].reshape(-1, 4)))
    return out


def resolve_mode(run, mode: str) -> str:
    """'objective' or 'cosine' for ``mode`` in MAP_MODES (see module docstring)."""
    if mode not in MAP_MODES:
        raise ValueError(f"grounding.map must be one of {MAP_MODES}, got {mode!r}")
    has_maps = getattr(run.objective, "similarity_maps", None) is not None
    if mode == "auto":
        return "objective" if has_maps else "cosine"
    if mode == "objective" and not has_maps:
        raise ValueError(f"method {run.objective.name!r} defines no similarity_maps; use grounding.map='cosine'")
    return mode


def phrase_map_fn(run, mode: str, with_diagnostics: bool = False):
    """jit((method_params, variables, batch) -> [b, gh, gw]) of the grid map for one (image, phrase) per row;
    with ``with_diagnostics`` (objective maps only), -> (maps, ``Objective.map_diagnostics`` {name: [b]}) from
    the same forward."""

    def fn(method_params, variables, batch):
        out = run.model.apply(variables, batch, train=False)
        gh, gw = out.grid
        if mode == "objective":
            maps = run.objective.similarity_maps(method_params, out).astype(jnp.float32)      # [b, t, p]
            words = out.word_mask.astype(jnp.float32)
            m = jnp.einsum("btp,bt->bp", maps, words) / jnp.maximum(words.sum(axis=1, keepdims=True), 1.0)
        else:
            txt = out.txt_emb / jnp.maximum(jnp.linalg.norm(out.txt_emb, axis=-1, keepdims=True), 1e-12)
            patch = out.patch_emb / jnp.maximum(jnp.linalg.norm(out.patch_emb, axis=-1, keepdims=True), 1e-12)
            m = jnp.einsum("bd,bpd->bp", txt, patch)
        grid = m.reshape(m.shape[0], gh, gw)
        if with_diagnostics:
            stats = run.objective.map_diagnostics(method_params, out)
            return grid, {k: v.astype(jnp.float32) for k, v in stats.items()}
        return grid

    return jax.jit(fn, out_shardings=sharding_lib.replicated(run.mesh))


def grid_centres_of(run, image: np.ndarray):
    """The model's ``EncoderOutputs.grid_centres`` for images shaped like ``image`` [h, w, c] (shapes only).

    None (the half-pixel convention) for ViT patches; a CNN's receptive-field centres otherwise.
    """
    tokens = tokenizer_lib.encode(run.tokenizer, ["x"], int(run.config.data.max_text_len))
    batch = {"image": jax.ShapeDtypeStruct((1, *np.shape(image)), jnp.float32),
             **{k: jax.ShapeDtypeStruct(np.shape(v), jnp.asarray(v).dtype) for k, v in tokens.items()}}
    found = []

    def trace(variables, b):       # the centres are static: read them while tracing, compute nothing
        found.append(getattr(run.model.apply(variables, b, train=False), "grid_centres", None))
        return 0

    jax.eval_shape(trace, run.variables, batch)
    return found[0]


def upsample_to_crop(run, grids: np.ndarray, size: int, alignment: str = "encoder") -> tuple[np.ndarray, Any]:
    """[m, size, size] maps from [m, gh, gw] grids and the cell centres used (``alignment`` in ALIGNMENTS)."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"grounding.grid_alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    centres = grid_centres_of(run, np.zeros((size, size, int(run.config.data.channels)), np.float32)) \
        if alignment == "encoder" and len(grids) else None
    return np.stack([viz.upsample_bilinear(g, (size, size), centres) for g in grids]), centres


def oracle_grid_maps(split: LocalizedSplit, queries: Sequence[PhraseQuery], grid: tuple[int, int],
                     centres=None) -> np.ndarray:
    """[m, gh, gw] the best maps a grid of this shape can hold: each cell's share of pixels inside the query's
    finding masks, each pixel of the crop going to the cell whose centre is nearest (``centres``:
    ``types.GridCentres``; None: half-pixel centres, where the cells are equal blocks)."""
    size = split.size
    cy, cx = (None, None) if centres is None else centres
    pixels = (np.arange(size) + 0.5) / size
    rows = np.abs(pixels[:, None] - viz.cell_centres(grid[0], cy)[None]).argmin(axis=1)
    cols = np.abs(pixels[:, None] - viz.cell_centres(grid[1], cx)[None]).argmin(axis=1)
    cell = (rows[:, None] * grid[1] + cols[None, :]).ravel()               # [size * size] cell of each pixel
    counts = np.bincount(cell, minlength=grid[0] * grid[1])
    out = []
    for q in queries:
        same = [j for j, phrase in enumerate(split.phrases[q.example]) if phrase == q.phrase]
        inside = split.masks[q.example][same].any(axis=0).ravel()
        share = np.bincount(cell, weights=inside, minlength=grid[0] * grid[1]) / np.maximum(counts, 1)
        out.append(share.reshape(grid))
    return np.stack(out).astype(np.float32) if out else np.zeros((0, *grid), np.float32)


def phrase_maps(run, images: np.ndarray, phrases: Sequence[str], *, mode: str = "auto", batch_size: int = 0,
                max_text_len: Optional[int] = None, with_diagnostics: bool = False):
    """Grid similarity maps of phrases over their images.

    Args:
        run: a loaded Run.
        images: [m, h, w, c] evaluation-preprocessed images, one per phrase.
        phrases: [m] texts.
        mode: see MAP_MODES.
        batch_size: rows per call (0: the run's training batch size).
        max_text_len: token length (default the run's).
        with_diagnostics: also return the method's ``map_diagnostics`` per row, from the same forward.

    Returns:
        [m, gh, gw] float32 maps (higher = more related); with ``with_diagnostics``, (maps, {name: [m]}), the
        dict empty for cosine maps or a method without diagnostics.
    """
    if len(phrases) != len(images):
        raise ValueError(f"{len(images)} images but {len(phrases)} phrases")
    mode = resolve_mode(run, mode)
    diagnose = with_diagnostics and mode == "objective" and getattr(run.objective, "map_diagnostics", None) is not None
    tokens = tokenizer_lib.encode(run.tokenizer, list(phrases), int(max_text_len or run.config.data.max_text_len))
    fn = phrase_map_fn(run, mode, diagnose)
    arrays = {"image": np.asarray(images, np.float32), **tokens}
    out = batched_apply(lambda b: fn(run.method_params, run.variables, b), arrays, mesh=run.mesh,
                        batch_size=int(batch_size or run.config.train.batch_size))
    grids, stats = out if diagnose else (out, {})
    grids = np.asarray(grids, np.float32)
    return (grids, stats) if with_diagnostics else grids


def box_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """[k, height, width] bool rasterised boxes (``metrics.box_to_mask``) of [k, 4] fractions."""
    return np.stack([metrics.box_to_mask(b, height, width) for b in np.asarray(boxes).reshape(-1, 4)])


def cells_in_box(box: np.ndarray, grid: tuple[int, int], centres=None) -> np.ndarray:
    """[gh, gw] bool: the grid cells whose centre lies in ``box`` (ymin, xmin, ymax, xmax fractions).

    ``centres``: ``types.GridCentres`` (None: half-pixel centres, where this equals
    ``metrics.box_to_mask(box, gh, gw, keep_small=False)``).
    """
    cy, cx = (None, None) if centres is None else centres
    ys, xs = viz.cell_centres(grid[0], cy), viz.cell_centres(grid[1], cx)
    ymin, xmin, ymax, xmax = np.asarray(box, np.float64)
    return ((ys >= ymin) & (ys <= ymax))[:, None] & ((xs >= xmin) & (xs <= xmax))[None, :]


def score_map(sim_map: np.ndarray, boxes: np.ndarray, grid_map: Optional[np.ndarray] = None,
              centres=None) -> dict[str, float]:
    """CNR, pointing game and mIoU of one image-sized map [h, w] against its boxes [k, 4] (fractions).

    Args:
        sim_map: [h, w] map over the evaluation crop (CNR, mIoU; the pointing game when ``grid_map`` is None).
        boxes: [k, 4] (ymin, xmin, ymax, xmax) fractions of the crop.
        grid_map: [gh, gw] patch map ``sim_map`` was upsampled from: the pointing game then tests the centres
            of the patches holding its maximum (see module docstring).
        centres: ``types.GridCentres`` of the grid's cells (None: half-pixel centres).

    Returns:
        cnr, pointing_game, miou, and ``pointing_game_chance``: the share of the points the pointing game can
        pick (patch centres, or pixels without ``grid_map``) that lie in a box, the hit rate of a maximum
        placed uniformly at random.
    """
    masks = box_masks(boxes, *sim_map.shape)
    if grid_map is None:
        points, point_map = masks, sim_map
    else:
        point_map = np.asarray(grid_map)
        points = np.stack([cells_in_box(b, point_map.shape, centres) for b in np.asarray(boxes).reshape(-1, 4)])
    union = masks.any(axis=0)
    return {"cnr": metrics.cnr(sim_map, masks), "pointing_game": float(metrics.pointing_game(point_map, points)),
            "miou": metrics.miou_at_thresholds(sim_map, masks),
            "pointing_game_chance": float(points.any(axis=0).mean()),
            **signed_contrast(sim_map, union)}


def signed_contrast(sim_map: np.ndarray, inside: np.ndarray) -> dict[str, float]:
    """``signed_contrast`` = (mean of ``sim_map`` [h, w] over ``inside`` [h, w] bool - mean outside) / its
    standard deviation (0 for a constant map or an empty side) and ``cold_fraction`` (1.0 when negative)."""
    m = np.asarray(sim_map, np.float64)
    sd = m.std()
    if sd == 0 or not inside.any() or inside.all():
        value = 0.0
    else:
        value = float((m[inside].mean() - m[~inside].mean()) / sd)
    return {"signed_contrast": value, "cold_fraction": float(value < 0)}


def _mean_correlation(pairs: list[tuple[np.ndarray, np.ndarray]]) -> Optional[float]:
    """Mean Pearson correlation over pairs of equally shaped maps (pairs with a constant map count as 1:
    a constant map carries no location of its own); None without pairs."""
    if not pairs:
        return None
    out = []
    for a, b in pairs:
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        out.append(1.0 if a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1]))
    return float(np.mean(out))


def map_specificity(queries: Sequence[PhraseQuery], grids: np.ndarray) -> dict[str, float]:
    """How much a method's maps depend on the phrase and on the image (see module docstring).

    Args:
        queries: the grounding queries, in order.
        grids: [m, gh, gw] their grid maps.

    Returns:
        ``phrase_specificity``: 1 - mean correlation between the maps of consecutive distinct phrases of one
        image (absent when no image has two phrases); ``image_specificity``: 1 - mean correlation between
        the maps of each phrase text on consecutive images that hold it (absent when no text repeats).
    """
    by_image: dict[int, list[int]] = {}
    by_text: dict[str, list[int]] = {}
    for k, q in enumerate(queries):
        by_image.setdefault(q.example, []).append(k)
        by_text.setdefault(q.phrase, []).append(k)
    consecutive = lambda groups: [(grids[ks[i]], grids[ks[i + 1]])  # noqa: E731
                                  for ks in groups.values() for i in range(len(ks) - 1)]
    out = {}
    for key, groups in (("phrase_specificity", by_image), ("image_specificity", by_text)):
        corr = _mean_correlation(consecutive(groups))
        if corr is not None:
            out[key] = 1.0 - corr
    return out


def map_collapse(grids: np.ndarray) -> dict[str, float]:
    """Are the maps flat, or all peaked on one cell? (see module docstring).

    Args:
        grids: [m, gh, gw] grid maps, m >= 1.

    Returns:
        ``flat_fraction``, ``argmax_mode_share`` and ``argmax_mode_cell`` (row-major index of the most
        common peak cell; the first such cell on ties).
    """
    flat = np.asarray(grids, np.float64).reshape(len(grids), -1)
    span = flat.max(axis=1) - flat.min(axis=1)
    scale = np.maximum(np.abs(flat).max(axis=1), 1e-30)
    peaks = flat.argmax(axis=1)
    counts = np.bincount(peaks, minlength=flat.shape[1])
    return {"flat_fraction": float(np.mean(span <= 1e-5 * scale)),
            "argmax_mode_share": float(counts.max() / len(peaks)),
            "argmax_mode_cell": int(counts.argmax())}


def aggregate(scores: list[dict[str, float]], names: list[str]) -> dict[str, Any]:
    """Means over queries and per finding name; counts under ``protocol/num_phrases[/<name>]``."""
    out: dict[str, Any] = {"protocol/num_phrases": len(scores)}
    if not scores:
        return out
    keys = list(scores[0])
    for k in keys:
        out[k] = float(np.mean([s[k] for s in scores]))
    for name in sorted(set(names)):
        sel = [s for s, n in zip(scores, names) if n == name]
        for k in keys:
            out[f"{k}/{name}"] = float(np.mean([s[k] for s in sel]))
        out[f"protocol/num_phrases/{name}"] = len(sel)
    return out


def phrase_discrimination(queries: Sequence[PhraseQuery], grids: np.ndarray, centres=None) -> dict[str, Any]:
    """Does the map follow the phrase or only what stands out? On images with two or more phrases.

    A map that points at whatever finding is most salient, whatever the phrase, hits the other phrases' boxes
    as often as its own (by symmetry, when findings of every kind sit anywhere); a map that reads the phrase
    hits its own far more often.

    Args:
        queries: the grounding queries, in order.
        grids: [m, gh, gw] their grid maps.
        centres: ``types.GridCentres`` of the cells (None: half-pixel centres).

    Returns:
        ``pointing_game_multi``: the pointing game of the queries on images with several phrases, on their own
        boxes; ``pointing_game_multi_other``: the same maps on the union of the other phrases' boxes of the
        image; ``protocol/num_phrases_multi``. Empty without such images.
    """
    by_image: dict[int, list[int]] = {}
    for k, q in enumerate(queries):
        by_image.setdefault(q.example, []).append(k)
    own, other = [], []
    for ks in by_image.values():
        if len(ks) < 2:
            continue
        for k in ks:
            g = np.asarray(grids[k])
            cells = lambda boxes: np.stack([cells_in_box(b, g.shape, centres) for b in boxes])  # noqa: E731
            others = np.concatenate([queries[j].boxes for j in ks if j != k]).reshape(-1, 4)
            own.append(float(metrics.pointing_game(g, cells(queries[k].boxes.reshape(-1, 4)))))
            other.append(float(metrics.pointing_game(g, cells(others))))
    if not own:
        return {}
    return {"pointing_game_multi": float(np.mean(own)), "pointing_game_multi_other": float(np.mean(other)),
            "protocol/num_phrases_multi": len(own)}


def ground_split(run, split: LocalizedSplit, *, mode: str = "auto", batch_size: int = 0,
                 alignment: str = "encoder"):
    """Maps and scores of every query of ``split`` (``alignment``: see ALIGNMENTS).

    Returns:
        (queries, image-sized maps [m, crop, crop], per-query scores, the grid maps [m, gh, gw] those were
        upsampled from, the method's ``map_diagnostics`` per query {name: [m]}: empty for cosine maps).
    """
    queries = phrase_queries(split)
    if not queries:
        return [], np.zeros((0, split.size, split.size), np.float32), [], np.zeros((0, 1, 1), np.float32), {}
    images = split.images[[q.example for q in queries]]
    grids, attention = phrase_maps(run, images, [q.phrase for q in queries], mode=mode, batch_size=batch_size,
                                   with_diagnostics=True)
    maps, centres = upsample_to_crop(run, grids, split.size, alignment)
    scores = [score_map(m, q.boxes, grid_map=g, centres=centres) for m, g, q in zip(maps, grids, queries)]
    return queries, maps, scores, grids, attention


def write_heatmaps(split: LocalizedSplit, queries: list[PhraseQuery], maps: np.ndarray, out_dir: str,
                   n: int) -> list[str]:
    """One PNG per example (its first ``n`` examples with queries): a panel per phrase, box drawn."""
    by_example: dict[int, list[int]] = {}
    for k, q in enumerate(queries):
        by_example.setdefault(q.example, []).append(k)
    paths = []
    os.makedirs(out_dir, exist_ok=True)
    for i, ks in list(by_example.items())[:n]:
        panels = [(queries[k].phrase, maps[k], queries[k].boxes) for k in ks]
        fig = viz.phrase_figure(split.images[i], panels, title=f"{split.ids[i]}: {split.reports[i]}")
        path = os.path.join(out_dir, f"{len(paths):03d}_{viz.safe_name(split.ids[i])}.png")
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


@EVALUATORS.register("grounding")
def evaluate(run, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Phrase grounding on ``cfg.data.test_split`` (see module docstring)."""
    config = eval_config(run, cfg)
    info = data_info(config)
    split = read_localized_split(config, cfg.data.test_split, limit=int(cfg.get("limit_examples", 0)) or None)
    mode = resolve_mode(run, cfg.get("map", "auto"))
    batch_size = int(cfg.get("batch_size", 0) or config.train.batch_size)
    alignment = cfg.get("grid_alignment", "encoder")
    queries, maps, scores, grids, attention = ground_split(run, split, mode=mode, batch_size=batch_size,
                                                           alignment=alignment)
    names = [q.name for q in queries]
    centres = upsample_to_crop(run, grids[:1], split.size, alignment)[1] if queries else None
    res: dict[str, Any] = {**aggregate(scores, names), **map_specificity(queries, grids),
                           **phrase_discrimination(queries, grids, centres)}
    if queries:
        res.update(map_collapse(grids))
    if attention:
        res.update({f"attention/{k}": float(np.mean(v)) for k, v in attention.items()})
        res["attention/uniform_peak_mass"] = 1.0 / (grids.shape[1] * grids.shape[2])
    if cfg.get("also_oracle", True) and queries:
        # The protocol's ceiling at this encoder's grid: maps built from the finding masks, scored the same way.
        oracle = oracle_grid_maps(split, queries, grids.shape[1:], centres)
        upsampled = upsample_to_crop(run, oracle, split.size, alignment)[0]
        oracle_scores = [score_map(m, q.boxes, grid_map=g, centres=centres)
                         for m, g, q in zip(upsampled, oracle, queries)]
        res.update({f"oracle/{k}": v for k, v in aggregate(oracle_scores, names).items()
                    if k.split("/")[0] in ("pointing_game", "cnr", "miou")})
    if cfg.get("also_cosine", True):
        # The phrase-patch cosine maps' scores beside the method's own maps (the same figures when the map is
        # already the cosine), so methods with and without local maps compare on one protocol.
        if mode == "cosine":
            cos_scores, cos_grids = scores, grids
        else:
            _, _, cos_scores, cos_grids, _ = ground_split(run, split, mode="cosine", batch_size=batch_size,
                                                          alignment=alignment)
        cosine = {**aggregate(cos_scores, names), **map_specificity(queries, cos_grids),
                  **phrase_discrimination(queries, cos_grids, centres),
                  **(map_collapse(cos_grids) if queries else {})}
        res.update({f"cosine/{k}": v for k, v in cosine.items()
                    if not k.startswith(("protocol/", "pointing_game_chance"))})
    res.update({
        "protocol/data": info.get("name", ""), "protocol/root": config.data.root,
        "protocol/split": split.split, "protocol/num_images": len(split),
        "protocol/images_with_phrases": len({q.example for q in queries}),
        "protocol/map": mode, "protocol/method": run.objective.name, "protocol/grid_alignment": alignment,
        "protocol/miou_thresholds": ", ".join(f"{t:g}" for t in metrics.GROUNDING_THRESHOLDS),
        "protocol/findings_outside_crop": split.findings_dropped,
    })
    n = int(cfg.get("num_heatmaps", 8))
    if n > 0 and queries and jax.process_index() == 0:
        # The untrained baseline's pictures go beside, not over, the checkpoint's.
        default_dir = "heatmaps_untrained" if getattr(run, "untrained", False) else "heatmaps"
        out_dir = cfg.get("heatmaps_dir", "") or os.path.join(run.workdir, "eval", default_dir)
        paths = write_heatmaps(split, queries, maps, out_dir, n)
        res["protocol/heatmaps"] = f"{len(paths)} PNG in {out_dir}"
    return res


def save_heatmaps(run, split: str = "test", out_dir: Optional[str] = None, n: int = 8, *, mode: str = "auto",
                  batch_size: int = 0) -> list[str]:
    """PNGs of word-to-region heatmaps for the first ``n`` reports of ``split`` that name localised findings.

    Each PNG shows the image and one panel per finding phrase (the phrase's map, its box drawn, the map's
    maximum marked); the report is the title. Maps as the grounding evaluator computes them (``mode``:
    'auto' = the method's word-to-patch maps when it has them, else phrase-patch cosine).

    Args:
        run: a loaded Run (``evaluators.common.load_run``); its own data and preprocessing are used.
        split: split name.
        out_dir: where the PNGs go (default ``<workdir>/eval/heatmaps``).
        n: number of reports.
        mode: 'auto', 'objective' or 'cosine'.
        batch_size: rows per forward call (0: the run's).

    Returns:
        the PNG paths.
    """
    config = eval_config(run, ml_collections.ConfigDict(dict(data=default_data(), batch_size=batch_size)))
    data = read_localized_split(config, split)
    examples = [i for i in range(len(data)) if any(p.strip() for p in data.phrases[i])][:n]
    queries = phrase_queries(data, examples)
    if not queries:
        return []
    grids = phrase_maps(run, data.images[[q.example for q in queries]], [q.phrase for q in queries],
                        mode=mode, batch_size=batch_size)
    maps, _ = upsample_to_crop(run, grids, data.size)
    return write_heatmaps(data, queries, maps, out_dir or os.path.join(run.workdir, "eval", "heatmaps"), n)
