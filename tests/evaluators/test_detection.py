"""Detection evaluator: CenterNet decoding of hand-made outputs, targets <-> decode round trip, the loss
against a NumPy reference, and the evaluator end to end on the tiny synthetic run (``syn_run``)."""
from __future__ import annotations

import numpy as np
import pytest


def _outputs(H=8, W=8, C=1):
    return np.zeros((H, W, C), np.float32), np.zeros((H, W, 2), np.float32), np.zeros((H, W, 2), np.float32)


def test_decode_hand_made_heatmap():
    from medvlp_jax.evaluators.detection import decode_centernet
    heat, size, offset = _outputs()
    heat[2, 3, 0] = 0.9
    heat[2, 4, 0] = 0.6            # a neighbour of the peak: not a local maximum, never decoded
    heat[6, 1, 0] = 0.3            # a separate peak below the score threshold
    size[2, 3] = (2.0, 4.0)        # h, w in cells
    offset[2, 3] = (0.5, 0.5)
    boxes, scores, classes = decode_centernet(heat, size, offset, (32, 32), score_threshold=0.5)
    # centre (2.5, 3.5) cells * stride 4 = (10, 14) px; h 8 px, w 16 px -> x1 6, y1 6, x2 22, y2 14.
    np.testing.assert_allclose(boxes, [[6.0, 6.0, 22.0, 14.0]])
    np.testing.assert_allclose(scores, [0.9])
    np.testing.assert_array_equal(classes, [0])
    boxes, scores, _ = decode_centernet(heat, size, offset, (32, 32), score_threshold=0.1)
    np.testing.assert_allclose(scores, [0.9, 0.3])


def test_decode_applies_nms_per_class():
    from medvlp_jax.evaluators.detection import decode_centernet
    heat, size, offset = _outputs(C=2)
    heat[2, 2, 0], heat[2, 4, 0] = 0.9, 0.8        # two peaks, boxes 6x6 cells 2 cells apart: IoU 0.5 -> one
    heat[2, 4, 1] = 0.7                             # same box, other class: kept
    size[2, 2] = size[2, 4] = (6.0, 6.0)
    boxes, scores, classes = decode_centernet(heat, size, offset, (8, 8), score_threshold=0.5, nms_iou=0.5)
    np.testing.assert_allclose(scores, [0.9, 0.7])
    np.testing.assert_array_equal(classes, [0, 1])
    _, scores, _ = decode_centernet(heat, size, offset, (8, 8), score_threshold=0.5, nms_iou=0.6)
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.7])


def test_targets_decode_back_to_the_boxes():
    """Perfect predictions (the training targets themselves) decode to the ground truth: mAP 1."""
    from medvlp_jax.evaluators.detection import centernet_targets, decode_centernet, detection_metrics, to_xyxy
    boxes = [np.array([[0.1, 0.2, 0.4, 0.6], [0.55, 0.5, 0.95, 0.9]]), np.zeros((0, 4)),
             np.array([[0.3, 0.05, 0.7, 0.3]])]
    classes = [np.array([0, 1]), np.zeros(0, np.int64), np.array([1])]
    t = centernet_targets(boxes, classes, (16, 16), num_classes=2, max_objects=4)
    assert t["heat"].max() == 1.0 and t["obj"].sum() == 3
    assert t["heat"][1].max() == 0.0
    preds = []
    for i in range(3):
        size, offset = np.zeros((16, 16, 2), np.float32), np.zeros((16, 16, 2), np.float32)
        for k in range(int(t["obj"][i].sum())):
            r, c = divmod(int(t["ind"][i, k]), 16)
            size[r, c], offset[r, c] = t["size"][i, k], t["offset"][i, k]
        preds.append(decode_centernet(t["heat"][i], size, offset, (64, 64), score_threshold=0.99))
    for (pb, _, pc), gb, gc in zip(preds, boxes, classes):
        order = np.argsort(pc, kind="stable")
        np.testing.assert_allclose(pb[order], to_xyxy(gb, 64, 64)[np.argsort(gc, kind="stable")], atol=1e-4)
    res = detection_metrics(preds, [to_xyxy(b, 64, 64) for b in boxes], classes, ["a", "b"])
    assert res["map"] == 1.0 and res["map_mgca"] == 1.0 and res["ap50"] == 1.0 and res["map/b"] == 1.0


def _centernet_loss_reference(heat_logits, size_pred, off_pred, t, valid):
    p = 1 / (1 + np.exp(-heat_logits.astype(np.float64)))
    gt = t["heat"]
    v = valid[:, None, None, None].astype(np.float64)
    pos = (gt == 1.0) * v
    neg = (gt < 1.0) * v
    loss = -(np.sum(np.log(p) * (1 - p) ** 2 * pos) + np.sum(np.log(1 - p) * p ** 2 * (1 - gt) ** 4 * neg))
    loss /= max(pos.sum(), 1)
    b, H, W, _ = size_pred.shape
    l1_size = l1_off = 0.0
    n = 0
    for i in range(b):
        for k in range(t["ind"].shape[1]):
            if valid[i] and t["obj"][i, k]:
                r, c = divmod(int(t["ind"][i, k]), W)
                l1_size += np.abs(size_pred[i, r, c] - t["size"][i, k]).sum()
                l1_off += np.abs(off_pred[i, r, c] - t["offset"][i, k]).sum()
                n += 1
    return loss + 0.1 * l1_size / max(n, 1) + l1_off / max(n, 1)


def test_centernet_loss_matches_reference():
    import jax.numpy as jnp
    from medvlp_jax.evaluators.detection import centernet_loss, centernet_targets
    rng = np.random.default_rng(0)
    boxes = [np.array([[0.1, 0.1, 0.5, 0.4]]), np.array([[0.2, 0.5, 0.9, 0.95], [0.0, 0.0, 0.3, 0.3]]),
             np.array([[0.4, 0.4, 0.6, 0.6]])]
    t = centernet_targets(boxes, [np.zeros(len(b), np.int64) for b in boxes], (8, 8), 1, max_objects=3)
    heat = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
    size = rng.normal(size=(3, 8, 8, 2)).astype(np.float32) * 3
    off = rng.random((3, 8, 8, 2)).astype(np.float32)
    valid = np.array([True, True, False])
    want = _centernet_loss_reference(heat, size, off, t, valid)
    got = float(centernet_loss(jnp.asarray(heat), jnp.asarray(size), jnp.asarray(off),
                               {k: jnp.asarray(v) for k, v in t.items()}, jnp.asarray(valid)))
    assert got == pytest.approx(want, rel=1e-5)


def test_class_selection():
    import ml_collections
    from medvlp_jax.evaluators.detection import class_ids, class_names_of
    from medvlp_jax.evaluators.localized import LocalizedSplit
    split = LocalizedSplit(split="x", ids=["a", "b"], index=np.arange(2), images=np.zeros((2, 4, 4, 1)),
                           reports=["", ""], names=[["opacity", "effusion"], ["nodule"]], phrases=[[], []],
                           boxes=[np.zeros((2, 4)), np.zeros((1, 4))], masks=[np.zeros((2, 4, 4)), np.zeros((1, 4, 4))])
    cfg = ml_collections.ConfigDict
    assert class_names_of(cfg(dict(classes="single")), split) == ["finding"]
    assert class_names_of(cfg(dict(classes="per_name")), split) == ["effusion", "nodule", "opacity"]
    names = class_names_of(cfg(dict(classes="opacity, nodule")), split)
    assert names == ["opacity", "nodule"]
    assert [c.tolist() for c in class_ids(split, names)] == [[0, -1], [1]]
    assert [c.tolist() for c in class_ids(split, ["finding"])] == [[0, 0], [0]]


def test_evaluate_on_the_synthetic_run(syn_run):
    import ml_collections
    from medvlp_jax import evaluators
    from medvlp_jax.evaluators import detection
    assert evaluators.get("detection") is detection.evaluate
    cfg = ml_collections.ConfigDict(dict(data=evaluators.default_data(), seed=0, fractions=(0.5,),
                                         classes="per_name", trunk_widths=(8,), head_width=8, head_batch_size=16,
                                         epochs=2, patience=5, score_threshold=0.0))
    res = detection.evaluate(syn_run, cfg)
    for name in ("map", "map_mgca", "ap50", "map/opacity", "map/effusion", "map/cardiomegaly"):
        assert 0.0 <= res[f"50%/{name}"] <= 1.0, name
    assert res["50%/detections_per_image"] > 0
    assert res["protocol/50%/num_train_images"] == 32
    assert res["protocol/classes"] == "cardiomegaly, effusion, opacity"
    assert res["protocol/num_test_boxes"] > 0 and res["protocol/head"].startswith("centernet stride 4")


@pytest.mark.slow
def test_detector_learns_the_synthetic_boxes(syn_run):
    """Each synthetic finding always sits in the same box and brightens it: a trained head finds them."""
    import ml_collections
    from medvlp_jax import evaluators
    from medvlp_jax.evaluators import detection
    cfg = ml_collections.ConfigDict(dict(data=evaluators.default_data(), seed=0, fractions=(1.0,),
                                         classes="per_name", trunk_widths=(16, 16), head_width=16,
                                         head_batch_size=8, epochs=60, patience=60, score_threshold=0.3))
    res = detection.evaluate(syn_run, cfg)
    assert res["100%/map"] > 0.8


def test_object_cxr_preset_reads_what_prepare_data_writes(syn_run, tmp_path):
    """Object-CXR release layout -> launch/prepare_data.py object_cxr -> the detection evaluator on it."""
    import os
    import subprocess
    import sys
    import ml_collections
    from PIL import Image
    from medvlp_jax import evaluators
    from medvlp_jax.evaluators import detection
    from tests import helpers
    src = tmp_path / "object-CXR"
    rng = np.random.default_rng(0)
    for csv_name, folder, n in (("train.csv", "train", 20), ("dev.csv", "dev", 6)):
        (src / folder).mkdir(parents=True)
        rows = ["image_name,annotation"]
        for k in range(n):
            name = f"{folder}{k:03d}.jpg"
            px = rng.integers(0, 60, (96, 64)).astype(np.uint8)
            x0, y0 = int(rng.integers(0, 40)), int(rng.integers(0, 60))
            px[y0:y0 + 20, x0:x0 + 20] = 250                      # the foreign object: a bright square
            Image.fromarray(px).save(src / folder / name, format="JPEG")
            rows.append(f"{name},0 {x0} {y0} {x0 + 20} {y0 + 20}" if k % 4 else f"{name},")
            if k % 4 == 0:
                px[y0:y0 + 20, x0:x0 + 20] = 0
                Image.fromarray(px).save(src / folder / name, format="JPEG")
        (src / csv_name).write_text("\n".join(rows) + "\n")
    out = tmp_path / "object_cxr"
    proc = subprocess.run([sys.executable, os.path.join(helpers.ROOT, "launch", "prepare_data.py"), "object_cxr",
                           f"--source={src}", f"--out={out}", "--image_size=32", "--num_shards=2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import importlib.util
    spec = importlib.util.spec_from_file_location("detection_cfg", os.path.join(helpers.ROOT, "configs", "eval",
                                                                                 "detection.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config(f"object_cxr,root={out}").detection
    cfg.update(dict(fractions=(1.0,), trunk_widths=(8,), head_width=8, epochs=1, patience=1))
    res = detection.evaluate(syn_run, cfg)
    assert res["protocol/classes"] == "finding" and res["protocol/root"] == str(out)
    assert res["protocol/100%/num_train_images"] == 18 and res["protocol/num_test_images"] == 6   # 90/10; dev
    assert res["protocol/num_test_boxes"] == 4 and 0.0 <= res["100%/map"] <= 1.0
