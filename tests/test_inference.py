"""medvlp_jax.inference: a user's radiograph (PNG or DICOM) -> model input, zero-shot scores, phrase heatmaps.

References are computed independently: the preprocessing by hand (centre crop of the stored pixels, scaled
to [-1, 1]), scores and maps from single-device ``model.apply`` calls with NumPy cosines.
"""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from medvlp_jax import inference, viz
from medvlp_jax.data import images
from tests.data import sources_testlib as tl
from tests.workdir_testlib import make_tiny_workdir


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("inference")
    return make_tiny_workdir(str(base / "run"), str(base / "data"))       # the Run whose state was saved


def _reference_input(pixels: np.ndarray, data_cfg) -> np.ndarray:
    """Stored pixels [resize, resize] -> the eval crop by hand (the area resize to the same size is the identity)."""
    off = (data_cfg.resize - data_cfg.crop) // 2
    x = pixels[off:off + data_cfg.crop, off:off + data_cfg.crop].astype(np.float32) / np.iinfo(pixels.dtype).max
    return np.repeat(((x - 0.5) / 0.5)[..., None], data_cfg.channels, axis=-1)


def test_dicom_and_png_give_the_same_model_input(run, tmp_path):
    d = run.config.data
    rng = np.random.default_rng(0)
    film = (rng.random((90, 60)) * 255).astype(np.uint8)
    tl.write_dicom(str(tmp_path / "film.dcm"), 255 - film, photometric="MONOCHROME1")   # stored inverted
    tl.write_png(str(tmp_path / "film.png"), film)
    from_dicom = inference.load_image(run, str(tmp_path / "film.dcm"))
    from_png = inference.load_image(run, str(tmp_path / "film.png"))
    assert from_dicom.shape == (d.crop, d.crop, d.channels)
    np.testing.assert_allclose(from_dicom, from_png, atol=2.5 / 255)        # one grey level of rounding
    pixels = images.load_for_dataset(str(tmp_path / "film.png"), d.resize)[0]
    np.testing.assert_allclose(from_png, _reference_input(pixels, d), atol=1e-6)
    with pytest.raises(images.ImageReadError, match="nothing.png"):
        inference.load_image(run, str(tmp_path / "nothing.png"))


def test_real_dicom_film(run):
    pydicom_data = pytest.importorskip("pydicom.data")
    try:
        path = pydicom_data.get_testdata_file("RG1_UNCR.dcm")
    except Exception:
        path = None
    if not path:
        pytest.skip("pydicom-data (RG1_UNCR.dcm) is not installed")
    image = inference.load_image(run, path)
    assert image.shape == (run.config.data.crop, run.config.data.crop, run.config.data.channels)
    assert -1.0 <= image.min() < image.max() <= 1.0


def _single_device_outputs(run, image: np.ndarray, texts: list[str]):
    from medvlp_jax.data import tokenizer as tokenizer_lib
    variables = jax.device_get(run.variables)
    img = run.model.apply(variables, {"image": image[None]}, train=False, method="encode_image")
    toks = tokenizer_lib.encode(run.tokenizer, texts, run.config.data.max_text_len)
    txt = run.model.apply(variables, toks, train=False, method="encode_text")
    return img, txt


def _l2n(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_zero_shot_scores_are_prompt_ensemble_cosines(run, tmp_path):
    tl.write_png(str(tmp_path / "x.png"), (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8))
    image = inference.load_image(run, str(tmp_path / "x.png"))
    prompts = inference.default_prompts(run)
    assert list(prompts) == ["normal", "opacity", "effusion", "cardiomegaly"]     # the synthetic set's table
    scores = inference.zero_shot(run, image[None], prompts)
    texts = [p for ps in prompts.values() for p in ps]
    img, txt = _single_device_outputs(run, image, texts)
    t = _l2n(txt.txt_emb)
    classes, i = [], 0
    for ps in prompts.values():
        classes.append(_l2n(t[i:i + len(ps)].mean(0)))
        i += len(ps)
    want = _l2n(img.img_emb) @ np.stack(classes).T
    np.testing.assert_allclose(scores, want, atol=1e-5)
    table = inference.score_table(list(prompts), scores[0])
    assert [c for c, _ in table] == [list(prompts)[j] for j in np.argsort(-want[0])]


def test_phrase_heatmaps_are_phrase_patch_cosines_for_convirt(run, tmp_path):
    tl.write_png(str(tmp_path / "y.png"), (np.random.default_rng(2).random((50, 70)) * 255).astype(np.uint8))
    image = inference.load_image(run, str(tmp_path / "y.png"))
    phrases = ["small left pleural effusion", "the heart is enlarged"]
    maps = inference.phrase_heatmaps(run, image, phrases)
    assert maps.shape == (2, *image.shape[:2])
    img, txt = _single_device_outputs(run, image, phrases)
    gh, gw = img.grid
    patch = _l2n(img.patch_emb[0])                                   # [p, d]
    for k in range(2):
        grid = (patch @ _l2n(txt.txt_emb[k])).reshape(gh, gw)
        np.testing.assert_allclose(maps[k], viz.upsample_bilinear(grid, image.shape[:2], img.grid_centres), atol=1e-5)
    fig = inference.heatmap_figure(image, phrases, maps, title="test")
    assert len(fig.axes) == 3
    assert inference.describe(run)["method"] == "convirt"
    with pytest.raises(ValueError, match="at least one phrase"):
        inference.phrase_heatmaps(run, image, [])
