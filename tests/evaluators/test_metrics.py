"""Tests for medvlp_jax.metrics: hand-computed cases and independent brute-force references."""
import math

import numpy as np
import pytest

from medvlp_jax import metrics as M


# Classification

def _pairwise_auroc(scores, labels):
    """O(n^2) reference: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def test_average_ranks_ties():
    np.testing.assert_array_equal(M.average_ranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(M.average_ranks([3, 1, 3, 3]), [3, 1, 3, 3])


@pytest.mark.parametrize("scores, labels, expected", [
    ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),      # perfect
    ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.0),      # reversed
    ([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0], 0.5),      # all tied
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),    # one swapped pair out of 4
    ([0.5, 0.5, 0.2, 0.7], [1, 0, 0, 1], 0.875),    # 3 wins + 1 tie out of 4 pairs
])
def test_auroc_hand_cases(scores, labels, expected):
    assert M.auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auroc_matches_pairwise_count_on_random_data():
    rng = np.random.default_rng(0)
    for n in (2, 7, 40, 101):
        # Rounded scores to force many ties; labels correlated with scores.
        scores = np.round(rng.normal(size=n), 1)
        labels = (scores + rng.normal(size=n) > 0).astype(int)
        labels[:2] = [0, 1]
        assert M.auroc(scores, labels) == pytest.approx(_pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_one_class_is_nan_and_bad_inputs_raise():
    assert math.isnan(M.auroc([0.1, 0.2], [1, 1]))
    with pytest.raises(ValueError, match="binary"):
        M.auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="mismatch"):
        M.auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        M.auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        M.auroc([[0.1, 0.2]], [[0, 1]])


def test_macro_auroc_skips_single_class_columns():
    scores = np.array([[0.1, 0.9, 0.1], [0.2, 0.8, 0.9], [0.8, 0.2, 0.3], [0.9, 0.1, 0.4]])
    labels = np.array([[0, 1, 0], [0, 1, 1], [1, 1, 0], [1, 1, 0]])  # column 1 all positive
    res = M.macro_auroc(scores, labels)
    assert res.skipped == (1,)
    np.testing.assert_allclose(res.per_class[[0, 2]], [1.0, 1.0])
    assert math.isnan(res.per_class[1])
    assert res.macro == pytest.approx(1.0)
    labels[:, 2] = [1, 0, 0, 0]   # column 2 now perfectly reversed
    assert M.macro_auroc(scores, labels).macro == pytest.approx(0.5)
    with pytest.raises(ValueError):
        M.macro_auroc(scores[:, 0], labels[:, 0])


def test_f1_accuracy_at_threshold():
    s, y = [0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0]
    assert M.f1_at_threshold(s, y, 0.7) == pytest.approx(0.8)          # tp 2, fp 1, fn 0
    assert M.f1_at_threshold(s, y, 0.95) == 0.0                        # nothing predicted
    assert M.binary_accuracy(s, y, 0.7) == pytest.approx(0.8)
    assert M.binary_accuracy(s, y, 0.7, strict=True) == pytest.approx(0.6)
    assert M.accuracy([1, 2, 3], [1, 2, 0]) == pytest.approx(2 / 3)


def test_best_f1_hand_case_and_medklip_strict_accuracy():
    s, y = [0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0]
    # F1 by threshold: .9 -> 2/3, .8 -> 1/2, .7 -> 4/5, .6 -> 2/3, .5 -> 4/7.
    r = M.best_f1(s, y)
    assert r.threshold == 0.7 and r.f1 == pytest.approx(0.8)
    assert r.precision == pytest.approx(2 / 3) and r.recall == 1.0
    assert r.accuracy == pytest.approx(0.6)          # MedKLIP: pred = score > 0.7
    assert M.best_f1(s, y, strict_accuracy=False).accuracy == pytest.approx(0.8)


def test_best_f1_tie_takes_lowest_threshold_and_matches_brute_force():
    # F1 = 2/3 at both 0.9 and 0.6: sklearn's argmax over increasing thresholds picks 0.6.
    r = M.best_f1([0.9, 0.8, 0.7, 0.6], [1, 0, 0, 1])
    assert r.threshold == 0.6 and r.f1 == pytest.approx(2 / 3)
    rng = np.random.default_rng(1)
    for _ in range(5):
        s = np.round(rng.uniform(size=30), 1)
        y = rng.uniform(size=30) < s
        brute = max(M.f1_at_threshold(s, y, t) for t in np.unique(s))
        assert M.best_f1(s, y).f1 == pytest.approx(brute)


def _medklip_reference(scores, labels):
    """MedKLIP's selection written out: sklearn-style float precision/recall per increasing threshold,
    f1 = 2 r p / (r + p), first maximum."""
    best_t, best_f1 = None, -1.0
    n_pos = sum(labels)
    for t in sorted(set(scores)):
        tp = sum(1 for s, y in zip(scores, labels) if s >= t and y)
        pp = sum(1 for s in scores if s >= t)
        p, r = tp / pp, tp / n_pos
        f1 = 2 * r * p / (r + p) if r + p else 0.0
        if f1 > best_f1:
            best_t, best_f1 = t, f1
    return best_t, best_f1


def test_best_f1_exact_fraction_ties_follow_sklearn_first_float_maximum():
    # F1 = 2/3 as a fraction at thresholds 0.0 (p=1/2, r=1), 0.4 (p=5/9, r=5/6) and 1.0 (p=1, r=1/2);
    # computed as MedKLIP does from float p and r, 0.4's value is the largest, so sklearn's argmax takes it.
    s = [0.6, 0.0, 0.0, 0.4, 1.0, 1.0, 0.0, 0.8, 0.6, 0.4, 0.4, 1.0]
    y = [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1]
    r = M.best_f1(s, y)
    assert r.threshold == 0.4 == _medklip_reference(s, y)[0]
    assert r.precision == pytest.approx(5 / 9) and r.recall == pytest.approx(5 / 6)
    assert r.accuracy == pytest.approx(6 / 12)       # strict (> 0.4): 3 TP + 3 TN of 12
    rng = np.random.default_rng(2)
    for _ in range(300):
        n = int(rng.integers(2, 40))
        s = list(rng.integers(0, 6, n) / 5.0)
        y = [int(v) for v in rng.integers(0, 2, n)]
        if sum(y):
            t, f1 = _medklip_reference(s, y)
            got = M.best_f1(s, y)
            assert (got.threshold, got.f1) == (t, f1)


def test_best_f1_without_positives_and_macro():
    assert M.best_f1([0.2, 0.4], [0, 0]) == M.BestF1(float("inf"), 0.0, 0.0, 0.0, 1.0)
    scores = np.array([[0.9, 0.9], [0.8, 0.8], [0.7, 0.7], [0.6, 0.6], [0.5, 0.5]])
    labels = np.array([[1, 1], [0, 1], [1, 1], [0, 1], [0, 1]])
    r = M.macro_best_f1(scores, labels)
    assert r.f1 == pytest.approx((0.8 + 1.0) / 2)
    assert r.accuracy == pytest.approx((0.6 + 0.8) / 2)  # column 2: strict > 0.5 misses the last one


def test_multiclass_accuracy_and_macro_f1():
    preds, labels = [0, 1, 2, 2], [0, 1, 1, 2]
    assert M.multiclass_accuracy(preds, labels) == pytest.approx(0.75)
    # Per class F1: 1, 2/3, 2/3.
    assert M.macro_f1(preds, labels) == pytest.approx(7 / 9)
    assert M.macro_f1(preds, labels, num_classes=4) == pytest.approx(7 / 12)
    scores = np.eye(3)[preds] + 0.1
    assert M.multiclass_accuracy(scores, labels) == pytest.approx(0.75)
    assert M.macro_f1(scores, labels) == pytest.approx(7 / 9)
    with pytest.raises(ValueError):
        M.multiclass_accuracy(np.zeros((2, 2, 2)), [0, 1])


# Retrieval

SIM_3X3 = np.array([[0.9, 0.1, 0.5],
                    [0.8, 0.3, 0.2],
                    [0.1, 0.7, 0.6]])


def test_recall_perfect_reversed_and_hand_case():
    n = 5
    perfect = np.eye(n) + np.arange(n) * 1e-3
    assert all(M.recall_at_k(perfect, k) == 1.0 for k in (1, 5))
    # Reversed: sim[i, j] = (j - i) mod n, so the correct candidate (0) is last for every query.
    reversed_ = (np.arange(n)[None, :] - np.arange(n)[:, None]) % n
    np.testing.assert_array_equal(M.retrieval_ranks(reversed_), [n] * n)
    assert M.recall_at_k(reversed_, n - 1) == 0.0 and M.recall_at_k(reversed_, n) == 1.0
    # Ranks by hand: query 0 -> 1, query 1 -> 2 (0.8 > 0.3), query 2 -> 2 (0.7 > 0.6).
    np.testing.assert_array_equal(M.retrieval_ranks(SIM_3X3), [1, 2, 2])
    assert M.recall_at_k(SIM_3X3, 1) == pytest.approx(1 / 3)
    assert M.recall_at_k(SIM_3X3, 2) == 1.0


def test_retrieval_ties_count_against_the_query():
    assert M.recall_at_k(np.ones((4, 4)), 1) == 0.0
    np.testing.assert_array_equal(M.retrieval_ranks(np.ones((4, 4))), [4] * 4)


def test_retrieval_metrics_both_directions():
    m = M.retrieval_metrics(SIM_3X3, ks=(1, 2))
    # Text->image, columns as queries: col 0 -> 1, col 1 -> 2 (0.7 > 0.3), col 2 -> 1.
    assert m == pytest.approx({
        "i2t/R@1": 1 / 3, "i2t/R@2": 1.0, "i2t/median_rank": 2.0, "i2t/mean_rank": 5 / 3,
        "t2i/R@1": 2 / 3, "t2i/R@2": 1.0, "t2i/median_rank": 1.0, "t2i/mean_rank": 4 / 3})
    assert set(M.retrieval_metrics(np.eye(12))) == {
        f"{d}/{k}" for d in ("i2t", "t2i") for k in ("R@1", "R@5", "R@10", "median_rank", "mean_rank")}


def test_recall_with_gt_matrix_of_duplicates():
    sim = np.array([[0.9, 0.5, 0.1],
                    [0.9, 0.2, 0.1],     # query 1 prefers text 0, a duplicate of its own text 1
                    [0.1, 0.2, 0.3]])
    gt = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    assert M.recall_at_k(sim, 1) == pytest.approx(2 / 3)
    assert M.recall_at_k(sim, 1, gt=gt) == 1.0
    m = M.retrieval_metrics(sim, gt=gt)
    assert m["i2t/R@1"] == 1.0 and m["t2i/R@1"] == 1.0
    with pytest.raises(ValueError, match="no correct candidate"):
        M.recall_at_k(sim, 1, gt=np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="square"):
        M.recall_at_k(np.ones((2, 3)), 1)
    with pytest.raises(ValueError):
        M.recall_at_k(sim, 0)


def test_precision_at_k_by_class():
    sim = np.array([[0.9, 0.1, 0.8, 0.2],
                    [0.1, 0.2, 0.9, 0.8]])
    q, c = [0, 1], [0, 0, 1, 1]
    assert M.precision_at_k(sim, q, c, 1) == 1.0
    assert M.precision_at_k(sim, q, c, 2) == pytest.approx((0.5 + 1.0) / 2)
    assert M.precision_at_k(sim, q, c, 4) == pytest.approx(0.5)
    assert M.precision_at_k(np.ones((2, 4)), q, c, 2) == 0.0   # ties: misses first
    rel = np.array([[1, 1, 1, 0], [0, 0, 0, 1]], bool)        # ConVIRT-style multi-label relevance
    assert M.precision_at_k_relevance(sim, rel, 2) == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError):
        M.precision_at_k(sim, q, c, 5)
    with pytest.raises(ValueError):
        M.precision_at_k(sim, [0, 1, 1], c, 1)


# Segmentation

def _known_masks():
    gt = np.zeros((4, 4))
    gt[1:3, 1:3] = 1                       # 4 pixels
    prob = np.zeros((4, 4))
    prob[1:3, 1:3] = 0.9
    prob[2, 2] = 0.5                        # exactly at threshold: negative (strict >)
    prob[0, 0] = 0.7                        # false positive
    return prob, gt


def test_dice_and_iou_known_mask():
    prob, gt = _known_masks()
    # |P| = 4, |T| = 4, |P∩T| = 3: dice 6/8, IoU 3/5.
    np.testing.assert_allclose(M.dice_per_image(prob[None], gt[None]), [0.75])
    np.testing.assert_allclose(M.iou_per_image(prob[None], gt[None]), [0.6])
    assert M.mask_iou(prob > 0.5, gt > 0.5) == pytest.approx(0.6)


def test_dice_empty_ground_truth_and_batch_mean():
    prob, gt = _known_masks()
    empty = np.zeros((4, 4))
    fp_only = np.zeros((4, 4))
    fp_only[3, 3] = 0.8
    probs = np.stack([empty, fp_only, prob])
    gts = np.stack([empty, empty, gt])
    np.testing.assert_allclose(M.dice_per_image(probs, gts), [1.0, 0.0, 0.75])
    np.testing.assert_allclose(M.iou_per_image(probs, gts), [1.0, 0.0, 0.6])
    assert M.mean_dice(probs, gts) == pytest.approx(1.75 / 3)
    assert M.mean_dice(probs, gts, batch_size=2) == pytest.approx((0.5 + 0.75) / 2)  # MGCA epoch mean
    with pytest.raises(ValueError):
        M.dice_per_image(probs, gts[:2])


# Grounding

def test_box_to_mask():
    m = M.box_to_mask((0.25, 0.5, 0.75, 1.0), 4, 4)
    expected = np.zeros((4, 4), bool)
    expected[1:3, 2:4] = True
    np.testing.assert_array_equal(m, expected)
    # Pixel box rows [29, 58) of 224, normalised: 58 / 224 * 224 = 58.00000000000001, which a ceil-based
    # rasteriser would round up to an extra row.
    rows = np.flatnonzero(M.box_to_mask((29 / 224, 0, 58 / 224, 1), 224, 2)[:, 0])
    np.testing.assert_array_equal(rows, np.arange(29, 58))
    tiny = M.box_to_mask((0.1, 0.1, 0.12, 0.12), 4, 4)
    assert tiny.sum() == 1 and tiny[0, 0]
    with pytest.raises(ValueError):
        M.box_to_mask((0.5, 0, 0.4, 1), 4, 4)


def _known_map():
    box = M.box_to_mask((0.25, 0.5, 0.75, 1.0), 4, 4)   # rows 1-2, cols 2-3
    sim = np.zeros((4, 4))
    sim[box] = [2, 4, 2, 4]                              # inside: mean 3, var 1
    outside = np.flatnonzero(~box.ravel())
    sim.ravel()[outside[:6]] = 2                         # outside: six 0s, six 2s -> mean 1, var 1
    return sim, box


def test_cnr_known_box():
    sim, box = _known_map()
    assert M.cnr(sim, box) == pytest.approx(2 / math.sqrt(2))
    assert M.cnr(-sim, box) == pytest.approx(math.sqrt(2))          # absolute difference
    assert M.cnr(np.ones((4, 4)), box) == 0.0                       # 0/0 -> 0
    assert M.cnr(sim, np.ones((4, 4), bool)) == 0.0                 # no outside region
    # Two boxes: per-box CNR, then mean.
    other = np.zeros((4, 4), bool)
    other[0, 0] = True
    in_o, out_o = sim[other], sim[~other]
    cnr_other = abs(in_o.mean() - out_o.mean()) / math.sqrt(in_o.var() + out_o.var())
    assert M.cnr(sim, np.stack([box, other])) == pytest.approx((math.sqrt(2) + cnr_other) / 2)


def test_pointing_game():
    sim, box = _known_map()
    assert M.pointing_game(sim, box) is True                        # max 4 lies inside
    sim2 = sim.copy()
    sim2[0, 0] = 5
    assert M.pointing_game(sim2, box) is False
    sim2[0, 0] = 0
    sim2[3, 0] = 4                       # ties the inside max (which np.argmax would pick): a miss
    assert M.pointing_game(sim2, box) is False
    assert M.pointing_game(sim2, np.stack([box, sim2 == 4])) is True


def test_miou_at_thresholds():
    box = M.box_to_mask((0.25, 0.5, 0.75, 1.0), 4, 4)
    sim = np.where(box, 1.0, 0.0)
    sim[0, 0] = sim[0, 1] = 0.35
    # t in {.1, .2, .3}: box + 2 pixels -> IoU 4/6; t in {.4, .5}: exactly the box -> 1.
    assert M.miou_at_thresholds(sim, box) == pytest.approx((3 * 4 / 6 + 2) / 5)
    assert M.miou_at_thresholds(5 * sim + 3, box) == pytest.approx(0.8)  # min-max normalised
    assert M.miou_at_thresholds(np.ones((4, 4)), box) == 0.0            # constant map selects nothing
    assert M.miou_at_thresholds(sim, box, thresholds=(0.5,)) == 1.0


# Detection

def test_box_iou():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]])
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    np.testing.assert_allclose(M.box_iou(a, b), [[1 / 7, 1, 0], [0, 0.25, 0]])
    # Legacy +1: [0,0,1,1] and [1,1,2,2] are 2x2 pixels sharing one -> 1/7.
    assert M.box_iou([[0, 0, 1, 1]], [[1, 1, 2, 2]], plus_one=True)[0, 0] == pytest.approx(1 / 7)
    assert M.box_iou(np.zeros((0, 4)), b).shape == (0, 3)
    with pytest.raises(ValueError, match="xyxy"):
        M.box_iou([[2, 0, 1, 1]], b)


def test_nms():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # Box 1 overlaps box 0 with IoU 0.81; box 3 with IoU exactly 0.5 (suppressed: MGCA keeps iou < thr).
    np.testing.assert_array_equal(M.nms(boxes, scores, 0.5), [0, 2])
    np.testing.assert_array_equal(M.nms(boxes, scores, 0.51), [0, 2, 3])
    np.testing.assert_array_equal(M.nms(boxes, scores, 0.9), [0, 1, 2, 3])
    np.testing.assert_array_equal(M.nms(boxes, scores, 0.5, score_threshold=0.75), [0])
    np.testing.assert_array_equal(M.nms(boxes[::-1], scores[::-1], 0.5), [3, 1])
    assert M.nms(np.zeros((0, 4)), np.zeros(0)).size == 0


GT = [np.array([[0, 0, 10, 10]], float), np.array([[20, 20, 40, 40], [50, 50, 60, 60]], float),
      np.zeros((0, 4))]


def test_perfect_detector_and_empty_image():
    scores = [np.array([0.9]), np.array([0.8, 0.7]), np.zeros(0)]
    assert M.mean_ap(GT, scores, GT) == pytest.approx(1.0, abs=1e-12)
    assert M.average_precision(GT, scores, GT, 0.75) == pytest.approx(1.0, abs=1e-12)


def test_false_positive_ranked_above_true_positive():
    gt = [np.array([[0, 0, 10, 10]], float)]
    preds = [np.array([[50, 50, 60, 60], [0, 0, 10, 10]], float)]
    # tp = [0, 1], fp = [1, 1]: precision [0, 1/2], recall [0, 1]; envelope 1/2 at all 101 recall points.
    assert M.average_precision(preds, [np.array([0.9, 0.8])], gt) == pytest.approx(0.5)
    assert M.average_precision(preds, [np.array([0.7, 0.8])], gt) == pytest.approx(1.0)


def test_duplicate_detection_is_false_positive():
    gt = [np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)]
    preds = [np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], float)]
    # Ranked TP, FP (duplicate), TP: recall [.5, .5, 1], precision [1, .5, 2/3] -> envelope [1, 2/3, 2/3].
    # Recall points 0..0.50 (51) get 1, 0.51..1 (50) get 2/3.
    ap = M.average_precision(preds, [np.array([0.9, 0.8, 0.7])], gt)
    assert ap == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_iou_thresholds_of_mgca_map():
    gt = [np.array([[0, 0, 10, 10]], float)]
    pred = [np.array([[0, 0, 10, 6.2]], float)]          # IoU 0.62
    score = [np.array([0.9])]
    aps = [M.average_precision(pred, score, gt, t) for t in M.MGCA_IOU_THRESHOLDS]
    np.testing.assert_allclose(aps, [1.0] * 5 + [0.0] * 3, atol=1e-12)   # COCO's tp/(tp+fp+eps)
    assert M.mean_ap(pred, score, gt) == pytest.approx(5 / 8)
    coco = np.linspace(0.5, 0.95, 10)
    assert M.mean_ap(pred, score, gt, iou_thresholds=coco) == pytest.approx(0.3)  # .5, .55, .6 of 10


def test_images_without_predictions_or_gt_and_mgca_quirk():
    box = np.array([[0, 0, 10, 10]], float)
    # Image 1 has a ground-truth box but no prediction: recall stops at 1/2.
    args = ([box, np.zeros((0, 4))], [np.array([0.5]), np.zeros(0)], [box, box])
    assert M.average_precision(*args) == pytest.approx(51 / 101)
    assert M.average_precision(*args, skip_images_missing_preds_or_gt=True) == pytest.approx(1.0)
    # Image 1 has no ground truth but a confident prediction: a false positive ranked first.
    args = ([box, box], [np.array([0.5]), np.array([0.9])], [box, np.zeros((0, 4))])
    assert M.average_precision(*args) == pytest.approx(0.5)
    assert M.average_precision(*args, skip_images_missing_preds_or_gt=True) == pytest.approx(1.0)
    # Neither predictions nor ground truth anywhere -> undefined.
    assert math.isnan(M.mean_ap([np.zeros((0, 4))], [np.zeros(0)], [np.zeros((0, 4))]))
    # Ground truth but no predictions at all -> 0.
    assert M.mean_ap([np.zeros((0, 4))], [np.zeros(0)], [box]) == 0.0


def test_max_detections_cuts_low_scores():
    gt = [np.array([[0, 0, 10, 10]], float)]
    preds = [np.array([[50, 50, 60, 60], [70, 70, 80, 80], [0, 0, 10, 10]], float)]
    scores = [np.array([0.9, 0.8, 0.7])]
    assert M.average_precision(preds, scores, gt) == pytest.approx(1 / 3)
    assert M.average_precision(preds, scores, gt, max_detections=2) == 0.0


def _reference_ap(pred_boxes, pred_scores, gt_boxes, thr):
    """Loop-based reference: greedy matching per image, then interpolated precision at 101 points."""
    dets, n_gt = [], 0
    for pb, ps, gb in zip(pred_boxes, pred_scores, gt_boxes):
        n_gt += len(gb)
        used = set()
        for d in sorted(range(len(ps)), key=lambda i: -ps[i]):
            best, best_iou = None, thr
            for g in range(len(gb)):
                x1, y1 = max(pb[d][0], gb[g][0]), max(pb[d][1], gb[g][1])
                x2, y2 = min(pb[d][2], gb[g][2]), min(pb[d][3], gb[g][3])
                inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
                area = lambda b: (b[2] - b[0]) * (b[3] - b[1])
                iou = inter / (area(pb[d]) + area(gb[g]) - inter)
                if g not in used and iou >= best_iou:
                    best, best_iou = g, iou
            if best is not None:
                used.add(best)
            dets.append((ps[d], best is not None))
    dets.sort(key=lambda t: -t[0])
    tp = fp = 0
    curve = []
    for _, hit in dets:
        tp, fp = tp + hit, fp + (not hit)
        curve.append((tp / n_gt, tp / (tp + fp)))
    total = 0.0
    for r in np.linspace(0, 1, 101):
        total += max([p for rc, p in curve if rc >= r], default=0.0)
    return total / 101


def test_average_precision_matches_loop_reference_on_random_boxes():
    rng = np.random.default_rng(3)
    for _ in range(3):
        pred_boxes, pred_scores, gt_boxes = [], [], []
        for _ in range(6):
            n_gt, n_pred = rng.integers(0, 3), rng.integers(0, 5)
            g = rng.uniform(0, 50, size=(n_gt, 2))
            gt_boxes.append(np.concatenate([g, g + rng.uniform(5, 20, size=(n_gt, 2))], 1))
            # Predictions: jittered copies of gt boxes plus random boxes.
            src = np.concatenate([gt_boxes[-1], rng.uniform(0, 60, size=(n_pred, 4))])[:n_pred]
            src[:, 2:] = np.maximum(src[:, 2:], src[:, :2] + 1)
            pred_boxes.append(src + rng.normal(0, 1.5, size=src.shape) * [1, 1, 0, 0])
            pred_boxes[-1][:, 2:] = np.maximum(pred_boxes[-1][:, 2:], pred_boxes[-1][:, :2] + 0.5)
            pred_scores.append(rng.uniform(size=len(src)))
        if sum(len(g) for g in gt_boxes) == 0:
            continue
        for thr in (0.4, 0.6):
            assert M.average_precision(pred_boxes, pred_scores, gt_boxes, thr) == pytest.approx(
                _reference_ap(pred_boxes, pred_scores, gt_boxes, thr), abs=1e-9)


def test_detection_input_errors():
    box = np.array([[0, 0, 10, 10]], float)
    with pytest.raises(ValueError, match="length"):
        M.mean_ap([box], [np.array([0.5])], [box, box])
    with pytest.raises(ValueError, match="scores"):
        M.mean_ap([box], [np.array([0.5, 0.4])], [box])
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        M.mean_ap([np.zeros((1, 3))], [np.array([0.5])], [box])
