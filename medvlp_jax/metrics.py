"""Evaluation metrics for every downstream protocol (methods.md §10), in plain NumPy.

This module owns the numbers that end up in results tables: classification (AUROC, F1, accuracy, the
MedKLIP/KAD best-F1 protocol), retrieval (Recall@K, GLoRIA Precision@K, ranks), segmentation (MGCA Dice),
phrase grounding (CNR, pointing game, mIoU) and detection (COCO-style AP as computed by torchmetrics'
``MeanAveragePrecision``, averaged over the MGCA IoU range). Everything is a pure function of host
arrays: evaluators gather embeddings/predictions with JAX, then call these functions, so they can be
unit-tested alone and need no accelerator.

Conventions:
    * Binary labels are ``{0, 1}`` (bool, int or float); anything else raises ``ValueError``.
    * Non-finite scores raise ``ValueError`` (a NaN score silently sorts to one end and changes a rank).
    * Ties in a *ranking* are resolved against the model (retrieval ranks, Precision@K, pointing game):
      a collapsed model that gives every candidate the same score gets no credit, instead of perfect
      recall. AUROC is the exception: ties count one half, as in the Mann-Whitney statistic (and sklearn).
    * Reference quirks that change reported numbers are documented where they apply and can be switched
      with a keyword: MedKLIP's strict ``>`` accuracy in :func:`best_f1` is part of how the published
      numbers are defined and is the default; MGCA's detection evaluation dropping images without
      predictions or ground truth (:func:`average_precision`) and its mean-of-batch-means Dice
      (:func:`mean_dice`) are off by default (the correct definitions) and reproduce the paper when on.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

# MGCA's detector (ssl_detector.py) passes these to torchmetrics' MeanAveragePrecision.
MGCA_IOU_THRESHOLDS: tuple[float, ...] = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
# Thresholds applied to the min-max normalised similarity map for phrase-grounding mIoU (MS-CXR).
GROUNDING_THRESHOLDS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
# COCO's 101 recall points (pycocotools `Params.recThrs`, which torchmetrics reuses).
_COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _vector(name: str, x, *, dtype=np.float64) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D [n], got shape {a.shape}")
    return a.astype(dtype, copy=False)


def _finite(name: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _binary(name: str, x) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == bool:
        return a
    if a.size and not np.all((a == 0) | (a == 1)):
        bad = np.unique(a[(a != 0) & (a != 1)])[:5]
        raise ValueError(f"{name} must be binary in {{0, 1}}, found values such as {bad.tolist()}")
    return a.astype(bool)


def _same_shape(**arrays: np.ndarray) -> None:
    shapes = {k: np.shape(v) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = _finite("scores", _vector("scores", scores))
    y = _binary("labels", _vector("labels", labels, dtype=np.asarray(labels).dtype))
    _same_shape(scores=s, labels=y)
    if s.size == 0:
        raise ValueError("scores and labels are empty")
    return s, y


def average_ranks(x) -> np.ndarray:
    """1-based ranks of ``x`` in ascending order, tied values sharing their average rank.

    Args:
        x: values [n].

    Returns:
        ranks [n] (float64), e.g. ``[10, 20, 20, 30] -> [1, 2.5, 2.5, 4]``.
    """
    a = _vector("x", x)
    n = a.size
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    starts = np.concatenate([[0], np.flatnonzero(sorted_a[1:] != sorted_a[:-1]) + 1])
    ends = np.concatenate([starts[1:], [n]])
    # Positions start..end-1 (0-based) hold ranks start+1..end; their mean is (start + 1 + end) / 2.
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(scores, labels) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count 1/2).

    Equals the probability that a random positive scores above a random negative; identical to
    sklearn's ``roc_auc_score`` (trapezoidal ROC), O(n log n).

    Args:
        scores: higher = more positive [n].
        labels: {0, 1} [n].

    Returns:
        AUROC in [0, 1]; NaN when only one class is present (undefined, not 0.5).
    """
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class MacroAUROC(NamedTuple):
    """Result of :func:`macro_auroc`."""

    macro: float              # mean over the evaluated columns (NaN when none could be evaluated)
    per_class: np.ndarray     # [c]; NaN for skipped columns
    skipped: tuple[int, ...]  # columns with a single class present


def macro_auroc(scores, labels) -> MacroAUROC:
    """Macro (unweighted mean over labels) AUROC for multi-label classification, e.g. CheXpert 5 labels.

    Columns where only one class occurs cannot be scored and are left out of the mean; they are
    reported in ``skipped`` so an evaluator can log them instead of hiding them.

    Args:
        scores: [n, c] scores (logits or probabilities).
        labels: [n, c] in {0, 1}.

    Returns:
        ``MacroAUROC(macro, per_class [c], skipped)``.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [n, c], got shape {s.shape}")
    _same_shape(scores=s, labels=y)
    per_class = np.array([auroc(s[:, j], y[:, j]) for j in range(s.shape[1])], dtype=np.float64)
    skipped = tuple(int(j) for j in np.flatnonzero(np.isnan(per_class)))
    valid = per_class[~np.isnan(per_class)]
    macro = float(valid.mean()) if valid.size else float("nan")
    return MacroAUROC(macro, per_class, skipped)


def accuracy(predictions, labels) -> float:
    """Fraction of exact matches between predicted and true labels (binary or multiclass).

    Args:
        predictions: predicted labels [n] (already thresholded / argmaxed).
        labels: true labels [n].
    """
    p = _vector("predictions", predictions, dtype=np.asarray(predictions).dtype)
    y = _vector("labels", labels, dtype=np.asarray(labels).dtype)
    _same_shape(predictions=p, labels=y)
    if p.size == 0:
        raise ValueError("predictions and labels are empty")
    return float(np.mean(p == y))


def _f1_from_counts(tp, fp, n_pos):
    # F1 = 2TP / (2TP + FP + FN) with FN = P - TP; 0 where undefined (no predicted and no true positive),
    # as sklearn's zero_division default. Integer numerator/denominator -> exact ties compare equal.
    denom = np.asarray(tp + fp + n_pos, dtype=np.float64)
    num = np.asarray(2 * tp, dtype=np.float64)
    return np.divide(num, denom, out=np.zeros_like(denom), where=denom > 0)


def f1_at_threshold(scores, labels, threshold: float = 0.5) -> float:
    """Binary F1 of the positive class, predicting positive where ``score >= threshold``.

    Args:
        scores: [n].
        labels: {0, 1} [n].
        threshold: decision threshold (inclusive, as sklearn's precision-recall curve).

    Returns:
        F1 in [0, 1]; 0 when there are neither predicted nor true positives.
    """
    s, y = _scores_labels(scores, labels)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    return float(_f1_from_counts(tp, fp, int(y.sum())))


def binary_accuracy(scores, labels, threshold: float = 0.5, *, strict: bool = False) -> float:
    """Accuracy of ``score >= threshold`` (or ``>`` when ``strict``) against binary labels.

    Args:
        scores: [n].
        labels: {0, 1} [n].
        threshold: decision threshold.
        strict: predict positive only where ``score > threshold``.
    """
    s, y = _scores_labels(scores, labels)
    pred = s > threshold if strict else s >= threshold
    return float(np.mean(pred == y))


class BestF1(NamedTuple):
    """Result of :func:`best_f1`."""

    threshold: float
    f1: float
    precision: float
    recall: float
    accuracy: float


def best_f1(scores, labels, *, strict_accuracy: bool = True) -> BestF1:
    """The MedKLIP/KAD zero-shot protocol: the threshold that maximises F1, and F1/accuracy there.

    Candidate thresholds are the distinct scores (sklearn ``precision_recall_curve``); a sample is
    positive for F1 when ``score >= threshold``. F1 is computed as MedKLIP does, ``2 r p / (r + p)`` from
    sklearn's float precision and recall, and the threshold is ``np.argmax`` of it over sklearn's increasing
    thresholds: the first maximum in floating point. F1 values that are equal as fractions can differ there in
    the last bit (2/3 from p=1/2, r=1 vs p=1, r=1/2); the larger float wins, and among bit-equal values the
    lowest threshold.

    MedKLIP quirk (``Classification_Test_Sample_on_CXR14/test.py``): accuracy is then computed with
    ``score > threshold`` (strict), so the sample(s) at the threshold count as negative for accuracy while
    they counted as positive for F1. ``strict_accuracy=True`` (default) reproduces that; ``False`` uses
    the same ``>=`` rule as F1.

    Args:
        scores: [n], e.g. softmax probability of the "{finding}" prompt vs "no {finding}".
        labels: {0, 1} [n].
        strict_accuracy: see above.

    Returns:
        ``BestF1(threshold, f1, precision, recall, accuracy)``. Without positives F1 is 0 at every
        threshold; then ``threshold = inf`` (predict all negative) and accuracy = 1.
    """
    s, y = _scores_labels(scores, labels)
    n_pos = int(y.sum())
    if n_pos == 0:
        return BestF1(float("inf"), 0.0, 0.0, 0.0, 1.0)
    order = np.argsort(-s, kind="mergesort")
    s_desc, y_desc = s[order], y[order]
    # Last index of each group of tied scores: thresholding at that score admits the whole group.
    group_end = np.concatenate([np.flatnonzero(s_desc[1:] != s_desc[:-1]), [s.size - 1]])
    tp = np.cumsum(y_desc)[group_end]
    fp = group_end + 1 - tp
    precision = tp / (tp + fp).astype(np.float64)
    recall = tp / np.float64(n_pos)
    num, den = 2 * recall * precision, recall + precision           # sklearn's arrays, MedKLIP's formula
    f1 = np.divide(num, den, out=np.zeros_like(den), where=den != 0)
    best = int(np.flatnonzero(f1 == f1.max())[-1])  # descending order: last max = first over increasing ones
    thr = float(s_desc[group_end[best]])
    acc = binary_accuracy(s, y, thr, strict=strict_accuracy)
    return BestF1(thr, float(f1[best]), float(precision[best]), float(recall[best]), acc)


class MacroBestF1(NamedTuple):
    """Result of :func:`macro_best_f1`."""

    f1: float                     # mean over columns of the best F1
    accuracy: float               # mean over columns of the accuracy at that threshold
    per_class: tuple[BestF1, ...]


def macro_best_f1(scores, labels, *, strict_accuracy: bool = True) -> MacroBestF1:
    """:func:`best_f1` per label column, macro-averaged (MedKLIP/KAD tables report these means).

    Args:
        scores: [n, c].
        labels: [n, c] in {0, 1}.
        strict_accuracy: see :func:`best_f1`.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [n, c], got shape {s.shape}")
    _same_shape(scores=s, labels=y)
    per = tuple(best_f1(s[:, j], y[:, j], strict_accuracy=strict_accuracy) for j in range(s.shape[1]))
    return MacroBestF1(float(np.mean([r.f1 for r in per])), float(np.mean([r.accuracy for r in per])), per)


def _class_predictions(name: str, x) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 2:
        return _finite(name, a.astype(np.float64)).argmax(axis=1)
    if a.ndim == 1:
        return a
    raise ValueError(f"{name} must be class ids [n] or scores [n, classes], got shape {a.shape}")


def multiclass_accuracy(predictions, labels) -> float:
    """Top-1 accuracy (COVIDx, zero-shot CheXpert 5x200).

    Args:
        predictions: class ids [n], or scores [n, classes] (argmax taken).
        labels: class ids [n].
    """
    return accuracy(_class_predictions("predictions", predictions), labels)


def macro_f1(predictions, labels, num_classes: Optional[int] = None) -> float:
    """Unweighted mean over classes of the one-vs-rest F1 (GLoRIA/MGCA zero-shot tables).

    Args:
        predictions: class ids [n], or scores [n, classes] (argmax taken).
        labels: class ids [n].
        num_classes: average over ``range(num_classes)`` (an absent, never-predicted class scores 0);
            default: over the classes present in labels or predictions, as sklearn's ``average="macro"``.
    """
    p = _class_predictions("predictions", predictions)
    y = _vector("labels", labels, dtype=np.asarray(labels).dtype)
    _same_shape(predictions=p, labels=y)
    if y.size == 0:
        raise ValueError("predictions and labels are empty")
    classes = np.arange(num_classes) if num_classes is not None else np.union1d(p, y)
    f1s = [_f1_from_counts(int(np.sum((p == c) & (y == c))), int(np.sum((p == c) & (y != c))),
                           int(np.sum(y == c))) for c in classes]
    return float(np.mean(f1s))


def _similarity_and_gt(sim, gt) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"sim must be 2-D [n_queries, n_candidates], got shape {s.shape}")
    _finite("sim", s)
    if gt is None:
        if s.shape[0] != s.shape[1]:
            raise ValueError(f"gt=None means the diagonal is correct, which needs a square sim; got {s.shape}")
        g = np.eye(s.shape[0], dtype=bool)
    else:
        g = _binary("gt", gt)
        _same_shape(sim=s, gt=g)
    missing = np.flatnonzero(~g.any(axis=1))
    if missing.size:
        raise ValueError(f"{missing.size} queries have no correct candidate (first: {missing[:5].tolist()})")
    return s, g


def group_matrix(keys: list) -> np.ndarray:
    """[n, n] bool: examples i and j have equal keys (hashable); a hit set (``gt``) for the retrieval metrics."""
    ids: dict[Any, int] = {}
    group = np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
    return group[:, None] == group[None, :]


def same_text_matrix(texts: list[str]) -> np.ndarray:
    """[n, n] bool: texts i and j are identical after whitespace normalisation (diagonal always True)."""
    return group_matrix([" ".join(t.lower().split()) for t in texts])


def retrieval_ranks(sim, gt=None) -> np.ndarray:
    """1-based rank of the best-ranked correct candidate for each query.

    Ties count against the query: rank = 1 + number of *incorrect* candidates scoring >= the best correct
    candidate.

    Args:
        sim: similarities [n_q, n_c] (higher = more similar).
        gt: correct pairs [n_q, n_c] bool (several per row allowed, e.g. duplicate reports); default the
            diagonal (pair i of a paired data set), which needs ``n_q == n_c``.

    Returns:
        ranks [n_q] (int64, 1 = top).
    """
    s, g = _similarity_and_gt(sim, gt)
    best_correct = np.where(g, s, -np.inf).max(axis=1)
    return 1 + np.sum((s >= best_correct[:, None]) & ~g, axis=1)


def recall_at_k(sim, k: int, gt=None) -> float:
    """Recall@K: fraction of queries with a correct candidate among the top ``k``.

    Args:
        sim: similarities [n_q, n_c].
        k: cut-off (>= 1; values above n_c give 1.0).
        gt: correct pairs [n_q, n_c] bool; default the diagonal.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(np.mean(retrieval_ranks(sim, gt) <= k))


def retrieval_metrics(sim_i2t, gt=None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@K, median and mean rank (MIMIC-CXR test, §10.4).

    Args:
        sim_i2t: similarities [n_images, n_texts]; text-to-image uses its transpose.
        gt: correct pairs [n_images, n_texts] bool; default the diagonal.
        ks: Recall@K cut-offs.

    Returns:
        ``{"i2t/R@1": ..., "i2t/R@5": ..., "i2t/R@10": ..., "i2t/median_rank": ..., "i2t/mean_rank": ...,``
        and the same keys for ``"t2i/"``}. Recalls in [0, 1]; ranks are 1-based.
    """
    s = np.asarray(sim_i2t)
    g = None if gt is None else np.asarray(gt)
    out: dict[str, float] = {}
    for name, (sim, gtm) in {"i2t": (s, g), "t2i": (s.T, None if g is None else g.T)}.items():
        ranks = retrieval_ranks(sim, gtm)
        for k in ks:
            if k < 1:
                raise ValueError(f"k must be >= 1, got {k}")
            out[f"{name}/R@{k}"] = float(np.mean(ranks <= k))
        out[f"{name}/median_rank"] = float(np.median(ranks))
        out[f"{name}/mean_rank"] = float(np.mean(ranks))
    return out


def precision_at_k_relevance(sim, relevant, k: int) -> float:
    """Precision@K with an arbitrary relevance matrix, mean over queries of (hits in top-k) / k.

    Ties at the cut-off count against the query (irrelevant candidates first). Use a relevance matrix
    for ConVIRT's CheXpert 8x200 protocol (a candidate is relevant if its label for the query's class is 1).

    Args:
        sim: similarities [n_q, n_c].
        relevant: [n_q, n_c] bool.
        k: 1 <= k <= n_c.
    """
    s = _finite("sim", np.asarray(sim, dtype=np.float64))
    if s.ndim != 2:
        raise ValueError(f"sim must be 2-D [n_queries, n_candidates], got shape {s.shape}")
    r = _binary("relevant", relevant)
    _same_shape(sim=s, relevant=r)
    if not 1 <= k <= s.shape[1]:
        raise ValueError(f"k must be in [1, n_candidates={s.shape[1]}], got {k}")
    # lexsort: last key is primary -> descending score, then irrelevant (False) before relevant on ties.
    order = np.lexsort((r, -s), axis=-1)[:, :k]
    return float(np.mean(np.take_along_axis(r, order, axis=1).sum(axis=1) / k))


def precision_at_k(sim, query_labels, candidate_labels, k: int) -> float:
    """GLoRIA CheXpert 5x200 Precision@K: a retrieved candidate is a hit if it has the query's class.

    Args:
        sim: similarities [n_q, n_c] (image->text, or its transpose for text->image).
        query_labels: class ids [n_q].
        candidate_labels: class ids [n_c].
        k: cut-off, e.g. 5, 10, 100.
    """
    q = np.asarray(query_labels)
    c = np.asarray(candidate_labels)
    if q.ndim != 1 or c.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shapes {q.shape} and {c.shape}")
    s = np.asarray(sim)
    if s.ndim != 2 or s.shape != (q.size, c.size):
        raise ValueError(f"sim must be [n_q={q.size}, n_c={c.size}], got shape {s.shape}")
    return precision_at_k_relevance(s, q[:, None] == c[None, :], k)


def _per_image_masks(probs, gt, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(gt, dtype=np.float64)
    if p.ndim < 2:
        raise ValueError(f"probs must be [n, ...spatial], got shape {p.shape}")
    _same_shape(probs=p, gt=t)
    _finite("probs", p)
    # MGCA get_dice: prediction `prob > threshold`, truth `truth > 0.5` (both strict).
    return (p > threshold).reshape(p.shape[0], -1), (t > 0.5).reshape(t.shape[0], -1)


def dice_per_image(probs, gt, threshold: float = 0.5) -> np.ndarray:
    """MGCA's per-image Dice (``ssl_segmenter.get_dice``).

    ``2|P∩T| / (|P| + |T|)`` when the ground truth is non-empty; for an empty ground truth, 1 if the
    prediction is empty too, else 0.

    Args:
        probs: predicted probabilities [n, ...] (e.g. [n, h, w]); positive where ``> threshold``.
        gt: ground-truth masks [n, ...]; positive where ``> 0.5``.
        threshold: probability threshold.

    Returns:
        dice [n].
    """
    p, t = _per_image_masks(probs, gt, threshold)
    inter = np.sum(p & t, axis=1)
    p_sum, t_sum = p.sum(axis=1), t.sum(axis=1)
    pos = 2.0 * inter / np.maximum(p_sum + t_sum, 1)
    return np.where(t_sum > 0, pos, (p_sum == 0).astype(np.float64))


def mean_dice(probs, gt, threshold: float = 0.5, *, batch_size: Optional[int] = None) -> float:
    """Mean Dice over images.

    Args:
        probs: [n, ...] probabilities.
        gt: [n, ...] masks.
        threshold: probability threshold.
        batch_size: if given, reproduce MGCA's reported number, the mean over consecutive batches of the
            per-batch mean (``shared_epoch_end``), which weights images of a short last batch more.

    Returns:
        mean Dice in [0, 1].
    """
    d = dice_per_image(probs, gt, threshold)
    if batch_size is None:
        return float(d.mean())
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return float(np.mean([d[i:i + batch_size].mean() for i in range(0, d.size, batch_size)]))


def mask_iou(pred_mask, gt_mask) -> float:
    """IoU (Jaccard) of two boolean masks of the same shape; 1.0 when both are empty."""
    p = _binary("pred_mask", pred_mask)
    t = _binary("gt_mask", gt_mask)
    _same_shape(pred_mask=p, gt_mask=t)
    union = int(np.sum(p | t))
    return 1.0 if union == 0 else float(np.sum(p & t) / union)


def iou_per_image(probs, gt, threshold: float = 0.5) -> np.ndarray:
    """Per-image IoU with the same thresholds and empty-mask rule as :func:`dice_per_image`.

    Args:
        probs: [n, ...] probabilities.
        gt: [n, ...] masks.

    Returns:
        iou [n]; 1 for an empty ground truth with an empty prediction, 0 for an empty ground truth
        with any predicted pixel.
    """
    p, t = _per_image_masks(probs, gt, threshold)
    inter = np.sum(p & t, axis=1)
    union = np.sum(p | t, axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def box_to_mask(box, h: int, w: int, *, keep_small: bool = True) -> np.ndarray:
    """Rasterises a normalised box ``(ymin, xmin, ymax, xmax)`` (fractions of height/width) to a mask.

    A pixel belongs to the box when its centre ``((i + 0.5) / h, (j + 0.5) / w)`` lies inside it (robust
    to float round-off on pixel edges); with ``keep_small`` a non-degenerate box smaller than a pixel still
    gets the pixel holding its centre, so no box is lost on a coarse grid.

    Args:
        box: (ymin, xmin, ymax, xmax) with 0 <= min <= max <= 1.
        h: mask height in pixels.
        w: mask width in pixels.
        keep_small: False: a box that holds no pixel centre stays empty (the mask answers "which pixel
            centres lie in the box", e.g. which patch centres of a [gh, gw] grid).

    Returns:
        bool mask [h, w].
    """
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,):
        raise ValueError(f"box must be (ymin, xmin, ymax, xmax), got shape {b.shape}")
    if h < 1 or w < 1:
        raise ValueError(f"h and w must be >= 1, got {h}, {w}")
    ymin, xmin, ymax, xmax = b
    if not (0.0 <= ymin <= ymax <= 1.0 and 0.0 <= xmin <= xmax <= 1.0):
        raise ValueError(f"box must satisfy 0 <= min <= max <= 1, got {b.tolist()}")
    yc = (np.arange(h) + 0.5) / h
    xc = (np.arange(w) + 0.5) / w
    rows = (yc >= ymin) & (yc <= ymax)
    cols = (xc >= xmin) & (xc <= xmax)
    if not keep_small:
        return rows[:, None] & cols[None, :]
    if not rows.any():
        rows[min(int((ymin + ymax) / 2 * h), h - 1)] = True
    if not cols.any():
        cols[min(int((xmin + xmax) / 2 * w), w - 1)] = True
    return rows[:, None] & cols[None, :]


def _map_and_mask(sim_map, mask) -> tuple[np.ndarray, np.ndarray]:
    m = _finite("sim_map", np.asarray(sim_map, dtype=np.float64))
    if m.ndim != 2:
        raise ValueError(f"sim_map must be 2-D [h, w], got shape {m.shape}")
    b = _binary("box_mask", mask)
    if b.shape[-2:] != m.shape or b.ndim not in (2, 3):
        raise ValueError(f"box_mask must be [h, w] or [boxes, h, w] with [h, w] = {m.shape}, got {b.shape}")
    return m, b


def cnr(sim_map, box_mask) -> float:
    """Contrast-to-noise ratio of a similarity map: ``|mu_in - mu_out| / sqrt(var_in + var_out)``.

    Follows ``vios-s/ldm-phrase-grounding/metrics/eval_metrics.py``: population variances (ddof 0),
    ``0/0`` (NaN, e.g. an empty inside or outside region, or a constant map) -> 0; one value per box with
    every other pixel (other boxes included) as "outside", averaged over the phrase's boxes. A noiseless
    map that separates a box perfectly gives ``inf`` (the reference returns float max instead).

    Args:
        sim_map: [h, w] similarity map (phrase embedding vs. upsampled patch embeddings).
        box_mask: bool [h, w] for one box, or [boxes, h, w] (CNR averaged over boxes).

    Returns:
        CNR (>= 0).
    """
    m, b = _map_and_mask(sim_map, box_mask)
    values = []
    for inside in b.reshape(-1, *m.shape):
        v_in, v_out = m[inside], m[~inside]
        if v_in.size == 0 or v_out.size == 0:
            values.append(0.0)
            continue
        diff = abs(v_in.mean() - v_out.mean())
        noise = np.sqrt(v_in.var() + v_out.var())
        if noise == 0:
            values.append(0.0 if diff == 0 else float("inf"))
        else:
            values.append(float(diff / noise))
    return float(np.mean(values))


def pointing_game(sim_map, box_mask) -> bool:
    """Pointing game: is the map's maximum inside the box(es)?

    If several pixels share the maximum, all of them must be inside (ties count against the model, so
    a constant map is a miss unless the boxes cover the whole image).

    Args:
        sim_map: [h, w].
        box_mask: bool [h, w] or [boxes, h, w] (union taken).
    """
    m, b = _map_and_mask(sim_map, box_mask)
    inside = b.reshape(-1, *m.shape).any(axis=0)
    return bool(np.all(inside[m == m.max()]))


def minmax_normalise(sim_map) -> np.ndarray:
    """Scales a map to [0, 1]; a constant map becomes all zeros (nothing stands out)."""
    m = _finite("sim_map", np.asarray(sim_map, dtype=np.float64))
    lo, hi = m.min(), m.max()
    return np.zeros_like(m) if hi == lo else (m - lo) / (hi - lo)


def miou_at_thresholds(sim_map, gt_mask, thresholds: Sequence[float] = GROUNDING_THRESHOLDS) -> float:
    """Phrase-grounding mIoU: min-max normalise the map, binarise at each threshold (``> t``, as the
    ldm-phrase-grounding reference), IoU with the union of the boxes, mean over thresholds.

    Args:
        sim_map: [h, w].
        gt_mask: bool [h, w] or [boxes, h, w] (union taken).
        thresholds: thresholds in [0, 1].

    Returns:
        mean IoU over thresholds.
    """
    m, b = _map_and_mask(sim_map, gt_mask)
    if len(thresholds) == 0:
        raise ValueError("thresholds is empty")
    target = b.reshape(-1, *m.shape).any(axis=0)
    norm = minmax_normalise(m)
    return float(np.mean([mask_iou(norm > t, target) for t in thresholds]))


def _boxes(name: str, x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        return a.reshape(0, 4)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"{name} must be [n, 4] (x1, y1, x2, y2), got shape {a.shape}")
    _finite(name, a)
    if np.any(a[:, 2] < a[:, 0]) or np.any(a[:, 3] < a[:, 1]):
        raise ValueError(f"{name} must satisfy x2 >= x1 and y2 >= y1 (xyxy format)")
    return a


def box_iou(boxes_a, boxes_b, *, plus_one: bool = False) -> np.ndarray:
    """Pairwise IoU of two sets of ``(x1, y1, x2, y2)`` boxes.

    Args:
        boxes_a: [n, 4].
        boxes_b: [m, 4].
        plus_one: legacy pixel convention (width = x2 - x1 + 1) used by MGCA's YOLO NMS (``bbox_iou``);
            COCO / torchmetrics use False.

    Returns:
        iou [n, m]; 0 where the union is empty (two degenerate boxes).
    """
    a, b = _boxes("boxes_a", boxes_a), _boxes("boxes_b", boxes_b)
    o = 1.0 if plus_one else 0.0
    area_a = (a[:, 2] - a[:, 0] + o) * (a[:, 3] - a[:, 1] + o)
    area_b = (b[:, 2] - b[:, 0] + o) * (b[:, 3] - b[:, 1] + o)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + o, 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + o, 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes, scores, iou_threshold: float = 0.5, *, score_threshold: Optional[float] = None,
        plus_one: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression (single class), as MGCA's ``non_max_suppression``.

    Keeps the highest-scoring box, drops every remaining box with ``IoU >= iou_threshold`` to it
    (MGCA keeps ``iou < nms_thres``; torchvision drops only ``IoU > threshold``), repeats.

    Args:
        boxes: [n, 4] xyxy.
        scores: [n].
        iou_threshold: suppression threshold (MGCA 0.5).
        score_threshold: if given, first drop boxes with ``score < score_threshold`` (MGCA confidence
            filter 0.5, ``>=`` kept).
        plus_one: see :func:`box_iou` (MGCA's NMS uses True).

    Returns:
        indices into ``boxes`` of the kept boxes [k], by decreasing score.
    """
    b = _boxes("boxes", boxes)
    s = _finite("scores", _vector("scores", scores))
    if s.size != b.shape[0]:
        raise ValueError(f"{b.shape[0]} boxes but {s.size} scores")
    candidates = np.argsort(-s, kind="mergesort")
    if score_threshold is not None:
        candidates = candidates[s[candidates] >= score_threshold]
    iou = box_iou(b, b, plus_one=plus_one)
    keep = []
    while candidates.size:
        i = candidates[0]
        keep.append(i)
        rest = candidates[1:]
        candidates = rest[iou[i, rest] < iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def _detection_inputs(pred_boxes, pred_scores, gt_boxes):
    if not (len(pred_boxes) == len(pred_scores) == len(gt_boxes)):
        raise ValueError(f"per-image lists differ in length: {len(pred_boxes)} pred_boxes, "
                         f"{len(pred_scores)} pred_scores, {len(gt_boxes)} gt_boxes")
    images = []
    for i, (pb, ps, gb) in enumerate(zip(pred_boxes, pred_scores, gt_boxes)):
        pb = _boxes(f"pred_boxes[{i}]", pb)
        ps = np.asarray(ps, dtype=np.float64).reshape(-1)
        _finite(f"pred_scores[{i}]", ps)
        if ps.size != pb.shape[0]:
            raise ValueError(f"image {i}: {pb.shape[0]} predicted boxes but {ps.size} scores")
        images.append((pb, ps, _boxes(f"gt_boxes[{i}]", gb)))
    return images


def _coco_match(ious: np.ndarray, threshold: float) -> np.ndarray:
    """pycocotools ``evaluateImg`` matching for detections already sorted by score.

    Each detection takes the unmatched ground truth with the highest IoU >= threshold (the last one
    among equal IoUs, as the reference loop does); returns is_true_positive [n_det].
    """
    n_det, n_gt = ious.shape
    matched = np.zeros(n_gt, dtype=bool)
    tp = np.zeros(n_det, dtype=bool)
    t = min(threshold, 1 - 1e-10)
    for d in range(n_det):
        cand = np.where(~matched & (ious[d] >= t), ious[d], -1.0)
        if n_gt == 0 or cand.max() < 0:
            continue
        g = n_gt - 1 - int(np.argmax(cand[::-1]))
        matched[g] = True
        tp[d] = True
    return tp


def _coco_ap(scores: np.ndarray, is_tp: np.ndarray, n_gt: int) -> float:
    """pycocotools ``accumulate`` for one class/threshold: 101-point interpolated precision."""
    if n_gt == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(is_tp[order], dtype=np.float64)
    fp = np.cumsum(~is_tp[order], dtype=np.float64)
    recall = tp / n_gt
    precision = tp / (tp + fp + np.spacing(1))
    # Precision envelope: the best precision at any recall >= this one.
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    if recall.size == 0:
        return 0.0
    idx = np.searchsorted(recall, _COCO_RECALL_POINTS, side="left")
    q = np.where(idx < recall.size, precision[np.minimum(idx, recall.size - 1)], 0.0)
    return float(np.mean(q))


def _average_precisions(pred_boxes, pred_scores, gt_boxes, iou_thresholds, max_detections: int,
                        skip_images_missing_preds_or_gt: bool) -> np.ndarray:
    images = _detection_inputs(pred_boxes, pred_scores, gt_boxes)
    thresholds = np.asarray(iou_thresholds, dtype=np.float64).reshape(-1)
    if thresholds.size == 0:
        raise ValueError("iou_thresholds is empty")
    n_gt = 0
    all_scores, all_tp = [], [[] for _ in thresholds]
    for pb, ps, gb in images:
        if skip_images_missing_preds_or_gt and (ps.size == 0 or gb.shape[0] == 0):
            continue
        n_gt += gb.shape[0]
        # COCO keeps each image's top `max_detections` by score (stable order on ties).
        order = np.argsort(-ps, kind="mergesort")[:max_detections]
        pb, ps = pb[order], ps[order]
        ious = box_iou(pb, gb)
        all_scores.append(ps)
        for j, t in enumerate(thresholds):
            all_tp[j].append(_coco_match(ious, float(t)))
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    return np.array([_coco_ap(scores, np.concatenate(tp) if tp else np.zeros(0, bool), n_gt) for tp in all_tp])


def average_precision(pred_boxes: Sequence, pred_scores: Sequence, gt_boxes: Sequence,
                      iou_threshold: float = 0.5, *, max_detections: int = 100,
                      skip_images_missing_preds_or_gt: bool = False) -> float:
    """COCO-style average precision of one class over a data set (pycocotools / torchmetrics).

    Per image, detections are sorted by score and cut to ``max_detections``; each matches the unmatched
    ground-truth box of highest IoU >= ``iou_threshold``. Over the data set, detections are ranked by
    score, and AP is the mean of the interpolated precision (best precision at recall >= r) at the 101
    recall points r = 0, 0.01, ..., 1 (0 beyond the highest recall reached). Images without ground truth
    contribute their detections as false positives; images without detections contribute their ground
    truth as misses; images with neither contribute nothing.

    MGCA quirk (``ssl_detector.shared_step``): images with no detection after the confidence filter, or
    with no ground-truth box, are not passed to torchmetrics at all, so their misses and false positives
    are not counted. ``skip_images_missing_preds_or_gt=True`` reproduces the published protocol.

    Args:
        pred_boxes: per image, predicted boxes [n_i, 4] (x1, y1, x2, y2).
        pred_scores: per image, confidence [n_i].
        gt_boxes: per image, ground-truth boxes [m_i, 4].
        iou_threshold: IoU needed for a match.
        max_detections: per-image cap (COCO ``maxDets`` 100).
        skip_images_missing_preds_or_gt: see above.

    Returns:
        AP in [0, 1]; NaN when the data set has no ground-truth box (torchmetrics reports -1).
    """
    return float(_average_precisions(pred_boxes, pred_scores, gt_boxes, [iou_threshold], max_detections,
                                     skip_images_missing_preds_or_gt)[0])


def mean_ap(pred_boxes: Sequence, pred_scores: Sequence, gt_boxes: Sequence,
            iou_thresholds: Sequence[float] = MGCA_IOU_THRESHOLDS, *, max_detections: int = 100,
            skip_images_missing_preds_or_gt: bool = False) -> float:
    """Mean over IoU thresholds of :func:`average_precision`: torchmetrics' ``map`` for one class.

    The MGCA protocol (§10.3) averages over IoU 0.40:0.05:0.75 (:data:`MGCA_IOU_THRESHOLDS`); pass
    ``np.linspace(0.5, 0.95, 10)`` for COCO mAP. Arguments as :func:`average_precision`.

    Returns:
        mAP in [0, 1]; NaN when there is no ground-truth box.
    """
    aps = _average_precisions(pred_boxes, pred_scores, gt_boxes, iou_thresholds, max_detections,
                              skip_images_missing_preds_or_gt)
    return float(np.mean(aps))
