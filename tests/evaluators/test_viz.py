"""medvlp_jax.viz: bilinear upsampling against jax.image.resize, overlays, training curves, heatmap PNGs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest


def test_upsample_bilinear_matches_jax_resize():
    import jax
    from medvlp_jax.viz import upsample_bilinear
    m = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    for size in [(32, 48), (16, 6), (7, 13)]:
        want = np.asarray(jax.image.resize(m, size, "bilinear"))
        np.testing.assert_allclose(upsample_bilinear(m, size), want, atol=1e-5)
    np.testing.assert_array_equal(upsample_bilinear(m, (4, 6)), m)


def test_heatmap_overlay_draws_map_box_and_maximum(tmp_path):
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from medvlp_jax.viz import heatmap_overlay
    image = np.linspace(-1, 1, 32 * 32).reshape(32, 32, 1)
    sim = np.zeros((4, 4))
    sim[1, 2] = 1.0
    fig = heatmap_overlay(image, sim, box=[[0.25, 0.5, 0.5, 0.75], [0.0, 0.0, 0.1, 0.1]], title="a phrase")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.images) == 2                                  # the radiograph and the map
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(rects) == 2
    assert rects[0].get_width() == pytest.approx(8.0) and rects[0].get_height() == pytest.approx(8.0)
    overlay = ax.images[1].get_array()
    assert overlay.shape == (32, 32) and overlay.max() == pytest.approx(1.0) and overlay.min() == 0.0
    (line,) = ax.lines                                          # the argmax marker lies in the hot cell
    x, y = line.get_xdata()[0], line.get_ydata()[0]
    assert 8 <= y < 16 and 16 <= x < 24
    path = tmp_path / "o.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000


def test_plot_training_curves(tmp_path):
    from medvlp_jax.viz import plot_training_curves
    rows = [{"step": s, "time": 0.0, "train/loss": 3.0 - s / 10, "loss/itc": 3.0 - s / 10, "acc/i2t": s / 10,
             "train/lr": 1e-3, "train/grad_norm": 1.0} for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fig = plot_training_curves(str(tmp_path))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "accuracy (in-batch)", "learning rate", "gradient norm"]
    loss_lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    assert set(loss_lines) == {"train/loss", "loss/itc"}
    np.testing.assert_allclose(loss_lines["train/loss"].get_ydata(), [r["train/loss"] for r in rows])
    one = plot_training_curves(str(tmp_path), keys=["acc/i2t"])
    assert len(one.axes) == 1
    with pytest.raises(KeyError):
        plot_training_curves(str(tmp_path), keys=["nope"])
    with pytest.raises(FileNotFoundError):
        plot_training_curves(str(tmp_path / "missing"))


def test_save_heatmaps_writes_one_png_per_report(syn_run, tmp_path):
    import matplotlib.image
    from medvlp_jax.evaluators.grounding import save_heatmaps
    paths = save_heatmaps(syn_run, "test", str(tmp_path), n=3)
    assert len(paths) == 3 and all(os.path.dirname(p) == str(tmp_path) for p in paths)
    for p in paths:
        img = matplotlib.image.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300     # image + >= 1 phrase panel


def test_wrap_cuts_long_titles():
    from medvlp_jax.viz import wrap
    assert wrap("a  b\nc", 10, 2) == "a b c"
    out = wrap("word " * 40, 20, 2).split("\n")
    assert len(out) == 2 and out[-1].endswith("...") and all(len(line) <= 20 for line in out)


def test_upsample_bilinear_puts_cells_at_the_given_centres():
    """With cell centres (scale, offset), cell i's value is reached exactly at fraction scale * i + offset and the
    map is linear between centres; None is the half-pixel convention."""
    from medvlp_jax.viz import cell_centres, upsample_bilinear
    m = np.random.default_rng(1).normal(size=(4, 4)).astype(np.float32)
    np.testing.assert_allclose(upsample_bilinear(m, (32, 32), None), upsample_bilinear(m, (32, 32)))
    np.testing.assert_allclose(cell_centres(4), [0.125, 0.375, 0.625, 0.875])
    centres = ((8 / 32, 0.5 / 32), (8 / 32, 0.5 / 32))      # a stride-8 CNN grid: cell i on pixel 8i
    up = upsample_bilinear(m, (32, 32), centres)
    for i in range(4):
        np.testing.assert_allclose(up[8 * i, 8 * i], m[i, i], atol=1e-6)    # pixel 8i's centre is (8i + 0.5) / 32
    np.testing.assert_allclose(up[4, 0], 0.5 * (m[0, 0] + m[1, 0]), atol=1e-6)
    np.testing.assert_allclose(up[30, 31], m[3, 3], atol=1e-6)             # clamped beyond the last centre
