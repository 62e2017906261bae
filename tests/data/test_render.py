"""Synthetic radiograph renderer: determinism, where findings land, that they show, PNG encoding."""
import time

import numpy as np
import pytest

from medvlp_jax.data import render
from medvlp_jax.data.render import Finding


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return (ys.mean() + 0.5) / mask.shape[0], (xs.mean() + 0.5) / mask.shape[1]


def box_of(mask):
    """Independent reference for a mask's box: from the coordinates of its pixels."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array([ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w], np.float32)


def test_same_seed_same_image_different_seed_different_image():
    fs = [Finding("opacity", side="right", zone="upper"), Finding("cardiomegaly")]
    a = render.render(fs, seed=(0, 7))
    b = render.render(fs, seed=(0, 7))
    c = render.render(fs, seed=(0, 8))
    assert a.image.dtype == np.uint8 and a.image.shape == (128, 128)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 2


def test_outputs_are_consistent():
    r = render.render([Finding("nodule", side="left", zone="upper"),
                       Finding("atelectasis", side="bilateral", zone="base")], seed=3, size=(96, 80))
    assert r.image.shape == (96, 80)
    assert r.names == ["nodule", "atelectasis", "atelectasis"]
    assert r.masks.shape == (3, 96, 80) and r.masks.dtype == bool
    assert r.boxes.shape == (3, 4) and r.boxes.dtype == np.float32
    for m, b in zip(r.masks, r.boxes):
        np.testing.assert_allclose(b, box_of(m))
    assert [f.kind for f in r.sources] == ["nodule", "atelectasis", "atelectasis"]
    assert render.render([], seed=1).names == []


def test_image_looks_like_a_chest_film():
    r = render.render([], seed=5)
    img = r.image.astype(float)
    lungs = r.anatomy["lung_right"] | r.anatomy["lung_left"]
    # lungs dark, heart bright, the patient's right lung on the image's left
    assert img[lungs].mean() + 60 < img[r.anatomy["heart"]].mean()
    assert centroid(r.anatomy["lung_right"])[1] < 0.45 < 0.55 < centroid(r.anatomy["lung_left"])[1]
    assert centroid(r.anatomy["heart"])[1] > 0.5      # the heart sits left of the patient's midline
    assert 0.15 < lungs.mean() < 0.5


@pytest.mark.parametrize("seed", range(4))
def test_right_upper_lobe_opacity_is_upper_image_left_inside_the_right_lung(seed):
    r = render.render([Finding("opacity", side="right", zone="upper")], seed=seed)
    (mask,) = r.masks
    y, x = centroid(mask)
    assert x < 0.5 and y < 0.5
    assert (mask & ~r.anatomy["lung_right"]).sum() == 0
    # and it shows: brighter than the rest of the same lung
    rest = r.anatomy["lung_right"] & ~mask
    assert r.image[mask].mean() > r.image[rest].mean() + 8


@pytest.mark.parametrize("kind, side, zone, x_left, lower", [
    ("effusion", "left", None, False, True),
    ("consolidation", "right", "lower", True, True),
    ("atelectasis", "left", "base", False, True),
    ("pneumothorax", "right", "apex", True, False),
    ("nodule", "left", "upper", False, False),
    ("granuloma", "right", "base", True, True),
])
def test_findings_land_where_tagged(kind, side, zone, x_left, lower):
    for seed in range(3):
        r = render.render([Finding(kind, side=side, zone=zone)], seed=(1, seed))
        assert r.names == [kind]
        y, x = centroid(r.masks[0])
        assert (x < 0.5) == x_left, (kind, seed, x)
        assert (y > 0.45) == lower, (kind, seed, y)


@pytest.mark.parametrize("kind", ["opacity", "consolidation", "effusion", "nodule", "granuloma", "atelectasis"])
def test_dense_findings_are_brighter_than_their_lung(kind):
    diffs = []
    for seed in range(3):
        r = render.render([Finding(kind, side="right", zone="lower")], seed=(2, seed))
        m = r.masks[0]
        lung = r.anatomy["lung_right"] & ~m
        diffs.append(r.image[m].mean() - r.image[lung].mean())
    assert min(diffs) > 8, diffs


def test_pneumothorax_is_darker_than_the_lung_beside_it():
    for seed in range(3):
        r = render.render([Finding("pneumothorax", side="left", severity="large")], seed=seed)
        m = r.masks[0]
        lung = r.anatomy["lung_left"] & ~m
        assert r.image[m].mean() < r.image[lung].mean()


def ctr(r):
    """Cardiothoracic ratio measured on the masks: heart width / width of both lung fields."""
    heart = r.anatomy["heart"]
    lungs = r.anatomy["lung_right"] | r.anatomy["lung_left"]
    hb, lb = box_of(heart), box_of(lungs)
    return (hb[3] - hb[1]) / (lb[3] - lb[1])


def test_cardiomegaly_widens_the_heart():
    normal = [ctr(render.render([], seed=s)) for s in range(6)]
    big = [render.render([Finding("cardiomegaly", severity="severe")], seed=s) for s in range(6)]
    assert max(normal) < 0.5 < 0.58 < min(ctr(r) for r in big)
    for r in big:   # its box is the heart's
        assert r.names == ["cardiomegaly"]
        np.testing.assert_allclose(r.boxes[0], box_of(r.anatomy["heart"]))
    w_normal = np.mean([box_of(render.render([], seed=s).anatomy["heart"])[3]
                        - box_of(render.render([], seed=s).anatomy["heart"])[1] for s in range(6)])
    w_big = np.mean([r.boxes[0][3] - r.boxes[0][1] for r in big])
    assert w_big > 1.2 * w_normal


def lung_bottom(r):
    """Mean over image columns of the lowest lung pixel: follows the diaphragm domes."""
    lungs = r.anatomy["lung_right"] | r.anatomy["lung_left"]
    cols = lungs.any(axis=0)
    lowest = lungs.shape[0] - np.argmax(lungs[::-1, cols], axis=0)
    return lowest.mean() / lungs.shape[0]


def test_inflation_moves_the_diaphragm():
    hyper = [lung_bottom(render.render([Finding("hyperinflation")], seed=s)) for s in range(5)]
    normal = [lung_bottom(render.render([], seed=s)) for s in range(5)]
    hypo = [lung_bottom(render.render([Finding("hypoinflation")], seed=s)) for s in range(5)]
    assert np.mean(hypo) + 0.04 < np.mean(normal) < np.mean(hyper) - 0.04


def test_elevated_right_diaphragm_shortens_the_right_lung():
    for s in range(4):
        r = render.render([Finding("elevated_diaphragm", side="right")], seed=s)
        right, left = box_of(r.anatomy["lung_right"]), box_of(r.anatomy["lung_left"])
        assert right[2] < left[2] - 0.03
        assert centroid(r.masks[0])[1] < 0.5


def test_devices_are_bright_and_sided():
    r = render.render([Finding("device", device="pacemaker", side="left"),
                       Finding("device", device="catheter", side="right")], seed=4)
    pace, cath = r.masks
    assert centroid(pace)[1] > 0.5
    assert box_of(cath)[1] < 0.45        # the catheter enters from the patient's right
    for m in r.masks:
        assert r.image[m].mean() > 200


def test_bilateral_finding_gives_one_entry_per_side():
    r = render.render([Finding("effusion", side="bilateral", severity="moderate")], seed=9)
    assert r.names == ["effusion", "effusion"]
    xs = sorted(centroid(m)[1] for m in r.masks)
    assert xs[0] < 0.5 < xs[1]


def test_finding_validation():
    with pytest.raises(ValueError, match="unknown finding kind"):
        Finding("broken_heart")
    with pytest.raises(ValueError, match="side"):
        Finding("opacity", side="middle")
    with pytest.raises(ValueError, match="zone"):
        Finding("opacity", zone="elbow")


def test_mask_box_matches_reference():
    m = np.zeros((10, 20), bool)
    m[2:5, 7:12] = True
    np.testing.assert_allclose(render.mask_box(m), [0.2, 0.35, 0.5, 0.6])
    np.testing.assert_allclose(render.mask_box(np.zeros((4, 4), bool)), np.zeros(4))


def test_render_is_fast():
    fs = [Finding("opacity", side="left", zone="lower"), Finding("cardiomegaly"),
          Finding("device", device="catheter", side="right")]
    render.render(fs, seed=0)
    t = time.perf_counter()
    for s in range(40):
        render.render(fs, seed=s)
    per_image = (time.perf_counter() - t) / 40
    # 3,955 images must take well under a minute on one core (measured ~7 ms each on 128x128).
    assert per_image < 0.05, per_image
