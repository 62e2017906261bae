"""Segmentation evaluator: geometry of boxes/masks, the MGCA loss, label fractions, a decoder that can learn,
and the evaluator end to end on the tiny synthetic run (``syn_run`` from conftest.py)."""
from __future__ import annotations

import numpy as np
import pytest

from medvlp_jax import metrics


def test_crop_boxes_follows_the_pipeline_geometry():
    """A box drawn into a non-square image lands where ``decode.decode_image`` puts its pixels."""
    import tensorflow as tf
    from medvlp_jax.data import decode
    from medvlp_jax.evaluators.localized import crop_boxes
    h, w, resize, crop = 30, 50, 40, 32
    box = np.array([[0.2, 0.1, 0.8, 0.5]])             # ymin, xmin, ymax, xmax of the stored image
    img = np.zeros((h, w, 1), np.uint8)
    img[6:24, 5:25] = 255                                # rows 0.2*30..0.8*30, cols 0.1*50..0.5*50
    out = decode.decode_image(tf, tf.io.encode_png(img), resize=resize, crop=crop, channels=1, train=False,
                                seed=tf.constant([0, 0], tf.int64), random_flip=False).numpy()[..., 0] > 0
    rows, cols = np.flatnonzero(out.any(axis=1)), np.flatnonzero(out.any(axis=0))
    got = crop_boxes(box, h, w, resize, crop)[0] * crop
    np.testing.assert_allclose(got, [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1], atol=1.0)
    # Entirely outside the crop -> a zero-area box (dropped by the reader); partly outside -> clipped.
    edge = crop_boxes(np.array([[0.0, 0.0, 1.0, 0.02], [0.0, 0.0, 1.0, 1.0]]), h, w, resize, crop)
    assert edge[0, 3] - edge[0, 1] == 0
    # The whole 30x50 image: 24x40 after the resize, rows padded by 8 then cropped by 4, columns cropped by 4.
    np.testing.assert_allclose(edge[1], [4 / 32, 0.0, 28 / 32, 1.0])


def _mixed_loss_reference(logits, target, gamma=2.0, alpha=10.0):
    """MGCA's MixedLoss written out in NumPy (FocalLoss + dice_loss of the Kaggle kernel MGCA copies)."""
    x, t = logits.astype(np.float64).ravel(), target.astype(np.float64).ravel()
    p = 1 / (1 + np.exp(-x))
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_true = np.where(t > 0, p, 1 - p)
    focal = np.mean((1 - p_true) ** gamma * bce)
    dice = (2 * np.sum(p * t) + 1) / (np.sum(p) + np.sum(t) + 1)
    return alpha * focal - np.log(dice)


def test_segmentation_loss_matches_reference_and_ignores_padding():
    import jax.numpy as jnp
    from medvlp_jax.evaluators.segmentation import segmentation_loss
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 5)).astype(np.float32) * 2
    target = (rng.random((3, 6, 5)) > 0.6).astype(np.float32)
    want = _mixed_loss_reference(logits, target)
    got = float(segmentation_loss(jnp.asarray(logits), jnp.asarray(target), jnp.ones(3, bool)))
    assert got == pytest.approx(want, rel=1e-5)
    padded = float(segmentation_loss(jnp.asarray(np.concatenate([logits, rng.normal(size=(2, 6, 5)) * 5])),
                                     jnp.asarray(np.concatenate([target, np.ones((2, 6, 5))])),
                                     jnp.asarray([True] * 3 + [False] * 2)))
    assert padded == pytest.approx(want, rel=1e-5)


def test_fraction_subset_is_seeded_by_image_id():
    from medvlp_jax.evaluators.localized import balance_negatives, fraction_key, fraction_subset
    ids = [f"img{i // 2}" for i in range(200)]            # two rows per image id
    a = fraction_subset(ids, 0.1, seed=42)
    assert len(a) == 20 and len({ids[i] for i in a}) == 10           # 10% of the 100 ids, all their rows
    np.testing.assert_array_equal(a, fraction_subset(ids, 0.1, seed=42))
    assert not np.array_equal(a, fraction_subset(ids, 0.1, seed=0))
    assert len(fraction_subset(ids, 0.001, seed=42)) == 2             # at least one id
    np.testing.assert_array_equal(fraction_subset(ids, 1.0, seed=1), np.arange(200))
    with pytest.raises(ValueError):
        fraction_subset(ids, 0.0, seed=0)
    positive = np.zeros(200, bool)
    positive[:30] = True
    bal = balance_negatives(np.arange(200), positive, seed=0)
    assert positive[bal].sum() == 30 and (~positive[bal]).sum() == 30
    assert [fraction_key(f) for f in (0.01, 0.1, 1.0, 0.005)] == ["1%", "10%", "100%", "0.5%"]


def test_decoder_learns_a_mask_its_features_encode():
    """Features that say which grid cell is foreground are enough for the decoder to reach Dice ~1."""
    import jax
    from medvlp_jax import sharding as sharding_lib
    from medvlp_jax.evaluators import dense, segmentation as seg
    mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1}, jax.devices()[:2])
    rng = np.random.default_rng(0)
    n, g, size = 48, 4, 16
    cells = rng.random((n, g, g)) > 0.6
    masks = np.kron(cells, np.ones((size // g, size // g))).astype(np.float32)     # [n, 16, 16] blocky masks
    feat = np.concatenate([cells[..., None] * 2.0 - 1.0, rng.normal(size=(n, g, g, 3)) * 0.1], -1).astype(np.float32)
    head = seg.ProgressiveDecoder(out_size=(size, size), widths=(16, 8))
    params = dense.init_head(head, (g, g, feat.shape[-1]), seed=0)

    def loss_fn(p, frozen, b):
        return seg.segmentation_loss(head.apply({"params": p}, b["feat"])[..., 0], b["mask"], b["valid"])

    trainer = dense.HeadTrainer(loss_fn, mesh=mesh, learning_rate=1e-2, weight_decay=0.0)
    fit = trainer.fit(params, {"feat": feat[:32], "mask": masks[:32]}, {"feat": feat[32:], "mask": masks[32:]},
                      batch_size=16, epochs=20, patience=20, seed=0)
    probs = jax.jit(lambda p, x: jax.nn.sigmoid(head.apply({"params": p}, x)[..., 0]))(fit.params, feat[32:])
    assert metrics.mean_dice(np.asarray(probs), masks[32:]) > 0.9
    assert fit.val_loss[-1] < fit.val_loss[0]
    assert fit.best_epoch == int(np.argmin(fit.val_loss)) + 1


def test_localized_split_masks_match_boxes(syn_data):
    """Synthetic masks are their boxes: mask decoding and box geometry must agree pixel for pixel."""
    import ml_collections
    from medvlp_jax.data.sources import synthetic
    from medvlp_jax.evaluators.localized import read_localized_split
    config = ml_collections.ConfigDict(dict(data=dict(root=syn_data, resize=40, crop=32, channels=1)))
    split = read_localized_split(config, "test")
    assert len(split) == 32 and split.images.shape == (32, 32, 32, 1)
    np.testing.assert_array_equal(split.index, np.arange(32))
    assert split.masks_from_boxes == 0 and sum(len(n) for n in split.names) > 10
    for names, phrases, boxes, masks in zip(split.names, split.phrases, split.boxes, split.masks):
        for name, phrase, box, mask in zip(names, phrases, boxes, masks):
            assert phrase == synthetic._PHRASES[name][0]
            y0, x0, y1, x1 = synthetic._PHRASES[name][1]
            np.testing.assert_allclose(box, [(y0 * 40 - 4) / 32, (x0 * 40 - 4) / 32, (y1 * 40 - 4) / 32,
                                             (x1 * 40 - 4) / 32], atol=1e-6)
            np.testing.assert_array_equal(mask, metrics.box_to_mask(box, 32, 32))
    union = split.target_masks()
    only = split.target_masks("effusion")
    assert (union >= only).all() and only.sum() < union.sum()


def test_evaluate_on_the_synthetic_run(syn_run):
    import ml_collections
    from medvlp_jax import evaluators
    from medvlp_jax.evaluators import segmentation as seg
    assert evaluators.get("segmentation") is seg.evaluate
    cfg = ml_collections.ConfigDict(dict(data=evaluators.default_data(), seed=3, fractions=(0.25, 1.0),
                                         decoder_widths=(8,), decoder_stages=1, head_batch_size=16, epochs=2,
                                         patience=5, lr=5e-4, weight_decay=0.05))
    res = seg.evaluate(syn_run, cfg)
    for key in ("25%", "100%"):
        assert 0.0 <= res[f"{key}/dice"] <= 1.0 and 0.0 <= res[f"{key}/val_dice"] <= 1.0
        assert 0.0 <= res[f"{key}/mgca_dice"] <= 1.0
    assert res["protocol/25%/num_train_images"] == 16 and res["protocol/100%/num_train_images"] == 64
    assert res["protocol/num_test_images"] == 32 and res["protocol/num_val_images"] == 16
    assert 0 < res["protocol/test_positive_images"] < 32
    assert res["protocol/grid"] == "4x4" and "logits resized x4" in res["protocol/decoder"]


@pytest.mark.slow
def test_evaluate_with_finetuned_encoder(syn_run):
    import ml_collections
    from medvlp_jax import evaluators
    from medvlp_jax.evaluators import segmentation as seg
    cfg = ml_collections.ConfigDict(dict(data=evaluators.default_data(), seed=0, fractions=(1.0,),
                                         decoder_widths=(8,), decoder_stages=1, head_batch_size=16, epochs=2,
                                         patience=5, finetune_encoder=True, finding="effusion"))
    res = seg.evaluate(syn_run, cfg)
    assert 0.0 <= res["100%/dice"] <= 1.0 and res["protocol/finetune_encoder"] is True
    assert res["protocol/finding"] == "effusion"


def test_upsample2x_equals_bilinear_resize():
    import jax
    from medvlp_jax.evaluators.dense import upsample2x
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(upsample2x(x), jax.image.resize(x, (2, 10, 6, 4), "bilinear"), atol=1e-6)
