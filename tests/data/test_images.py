"""medvlp_jax.data.images: DICOM display pipeline, JPEG/PNG reading, MGCA resize-and-pad, PNG, geometry."""
import numpy as np
import pytest

from medvlp_jax.data import images
import sources_testlib as tl


def _rg1(name="RG1_UNCR.dcm"):
    """A real CR chest film from pydicom-data (never downloaded here: download=False)."""
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file(name, download=False)
    if path is None:
        pytest.skip("pydicom-data is not installed")
    return path


# ------------------------------------------------------------------------------------------------ DICOM

def test_real_cr_film_is_inverted_windowed_and_resized():
    import pydicom
    path = _rg1()
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float64)
    out = images.read_dicom(path)
    assert out.dtype == np.uint8 and out.shape == raw.shape

    # Independent reference: DICOM LINEAR window (C.11.2.1.2.1) then MONOCHROME1 inversion.
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    lin = np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    ref = np.rint((1 - lin) * 255)
    assert np.abs(out.astype(np.float64) - ref).max() <= 1

    # After inversion the lungs are dark and the mediastinum/spine bright.
    h, wd = out.shape
    x = out.astype(np.float64)
    centre_third, left_third, right_third = x[:, wd // 3:2 * wd // 3], x[:, :wd // 3], x[:, 2 * wd // 3:]
    assert centre_third.mean() > left_third.mean() and centre_third.mean() > right_third.mean()
    rows = slice(int(0.2 * h), int(0.55 * h))
    mediastinum = x[rows, int(0.45 * wd):int(0.55 * wd)].mean()
    lungs = [x[rows, int(0.2 * wd):int(0.35 * wd)].mean(), x[rows, int(0.65 * wd):int(0.8 * wd)].mean()]
    assert mediastinum > max(lungs) + 40, (mediastinum, lungs)

    # Resized: longer side 256, MGCA truncation of the shorter side, centred zero padding.
    sq, placement = images.load_for_dataset(path, 256)
    nh, nw, top, left = tl.mgca_geometry(*raw.shape, 256)
    assert (placement.height, placement.width, placement.top, placement.left) == (nh, nw, top, left)
    assert (nh, nw) == (256, 241)
    assert sq.shape == (256, 256) and sq.dtype == np.uint8
    assert (sq[:, :left] == 0).all() and (sq[:, left + nw:] == 0).all()
    # Content: an area-average of the full-resolution display image (compare smooth regions loosely).
    small_ref = images.resize_and_pad(out, 256)[0].astype(np.float64)
    assert np.abs(sq.astype(np.float64) - small_ref).mean() < 1.0
    sq16, _ = images.load_for_dataset(path, 256, bit_depth=16)
    assert sq16.dtype == np.uint16
    assert np.abs(sq16.astype(np.float64) / 257 - sq.astype(np.float64)).max() <= 1


def test_jpeg2000_decodes_to_the_same_film_or_fails_clearly(monkeypatch):
    path_j2k, path_raw = _rg1("RG1_J2KR.dcm"), _rg1("RG1_UNCR.dcm")
    try:
        out = images.read_dicom(path_j2k)
    except images.ImageReadError as e:      # no decoder installed here: the message must say so
        assert "JPEG 2000" in str(e) and "RG1_J2KR" in str(e)
    else:
        np.testing.assert_array_equal(out, images.read_dicom(path_raw))   # lossless (J2KR)
    # With every decoder plugin gone, the error names the file, the syntax and the packages to install.
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(images.ImageReadError) as err:
        images.read_dicom(path_j2k)
    msg = str(err.value)
    assert "RG1_J2KR.dcm" in msg and "JPEG 2000" in msg and "pylibjpeg" in msg


def test_rescale_window_monochrome1_and_minmax(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4096, (20, 30)).astype(np.uint16)
    # Rescale then window: values = 2 * raw - 100, window centred at 3000, width 2000.
    p = str(tmp_path / "a.dcm")
    tl.write_dicom(p, raw, bits_stored=12, rescale=(2.0, -100.0), window=(3000.0, 2000.0))
    v = raw.astype(np.float64) * 2 - 100
    ref = np.rint(np.clip((v - 2999.5) / 1999 + 0.5, 0, 1) * 255)
    np.testing.assert_allclose(images.read_dicom(p).astype(np.float64), ref, atol=1)
    # The same as MONOCHROME1 is the exact negative.
    p1 = str(tmp_path / "b.dcm")
    tl.write_dicom(p1, raw, bits_stored=12, rescale=(2.0, -100.0), window=(3000.0, 2000.0),
                   photometric="MONOCHROME1")
    np.testing.assert_allclose(images.read_dicom(p1).astype(np.float64), 255 - ref, atol=1)
    # No window: min-max over the image; float output in [0, 1].
    p2 = str(tmp_path / "c.dcm")
    tl.write_dicom(p2, raw, bits_stored=12)
    f = images.read_dicom(p2, out_dtype=np.float32)
    r = raw.astype(np.float64)
    np.testing.assert_allclose(f, (r - r.min()) / (r.max() - r.min()), atol=1e-6)
    u16 = images.read_dicom(p2, out_dtype=np.uint16)
    assert u16.dtype == np.uint16 and u16.max() == 65535 and u16.min() == 0
    # apply_voi=False ignores the window.
    np.testing.assert_allclose(images.read_dicom(p, out_dtype=np.float32, apply_voi=False),
                               (v - v.min()) / (v.max() - v.min()), atol=1e-6)


def test_voi_lut_sequence(tmp_path):
    raw = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4           # 0..252
    lut = (255 - np.arange(256)) // 2                                 # 8-bit output, decreasing
    p = str(tmp_path / "lut.dcm")
    tl.write_dicom(p, raw.astype(np.uint8), voi_lut=([256, 0, 8], lut), window=(10.0, 5.0))
    out = images.read_dicom(p, out_dtype=np.float32)
    np.testing.assert_allclose(out, lut[raw] / 255.0, atol=1e-6)       # the LUT wins over the window


def test_unreadable_dicom_names_the_file(tmp_path):
    p = tmp_path / "broken.dcm"
    p.write_bytes(b"not a dicom at all")
    with pytest.raises(images.ImageReadError, match="broken.dcm"):
        images.read_dicom(str(p))
    with pytest.raises(images.ImageReadError, match="file not found"):
        images.read_dicom(str(tmp_path / "missing.dcm"))


def test_window_functions():
    v = np.array([0.0, 50.0, 100.0, 150.0, 200.0])
    np.testing.assert_allclose(images.window(v, 100, 101, "LINEAR"), np.clip((v - 99.5) / 100 + 0.5, 0, 1))
    np.testing.assert_allclose(images.window(v, 100, 100, "LINEAR_EXACT"),
                               np.clip((v - 100) / 100 + 0.5, 0, 1))
    np.testing.assert_allclose(images.window(v, 100, 100, "SIGMOID"), 1 / (1 + np.exp(-4 * (v - 100) / 100)))
    with pytest.raises(ValueError):
        images.window(v, 100, 100, "CUBIC")


# ------------------------------------------------------------------------------------------- JPEG / PNG

def test_read_image_modes_and_corruption(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 1] = 200
    tl.write_png(str(tmp_path / "rgb.png"), rgb)
    g = images.read_image(str(tmp_path / "rgb.png"))
    assert g.shape == (10, 12) and g.dtype == np.uint8
    assert abs(int(g[0, 0]) - round(0.587 * 200)) <= 1                  # ITU-R 601 luma
    deep = (np.arange(120, dtype=np.uint16).reshape(10, 12) * 500)
    tl.write_png(str(tmp_path / "deep.png"), deep)
    np.testing.assert_array_equal(images.read_image(str(tmp_path / "deep.png")), deep)
    tl.write_jpeg(str(tmp_path / "ok.jpg"), tl.flat_image(40, 30, 77))
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    with pytest.raises(images.ImageReadError, match="cut.jpg"):
        images.read_image(str(tmp_path / "cut.jpg"))
    (tmp_path / "junk.jpg").write_bytes(b"\x00" * 100)
    with pytest.raises(images.ImageReadError, match="junk.jpg"):
        images.read_image(str(tmp_path / "junk.jpg"))


def test_jpeg_draft_keeps_the_full_geometry(tmp_path):
    # A large JPEG read with DCT downscaling still maps boxes through its full pixel grid.
    img = np.zeros((1000, 700), np.uint8)
    img[200:400, 100:300] = 255
    p = str(tmp_path / "big.jpg")
    tl.write_jpeg(p, img)
    out, placement = images.load_for_dataset(p, 64)
    nh, nw, top, left = tl.mgca_geometry(1000, 700, 64)
    assert (placement.in_height, placement.in_width) == (1000, 700)
    assert (placement.height, placement.width, placement.top, placement.left) == (nh, nw, top, left)
    box = placement.normalise_boxes([[200, 100, 400, 300]])[0]
    r0, c0, r1, c1 = (np.array(box) * 64).round().astype(int)
    inside = out[r0 + 1:r1 - 1, c0 + 1:c1 - 1]
    assert inside.min() > 200 and out[r1 + 2:, left + 1:left + nw - 1].max() < 40


# -------------------------------------------------------------------------------------- resize and pad

def test_fit_size_truncates_like_mgca():
    assert images.fit_size(1955, 1841, 256) == (256, 241)
    assert images.fit_size(2000, 3000, 512) == (341, 512)
    assert images.fit_size(10, 10, 7) == (7, 7)
    for h, w in [(1955, 1841), (2544, 3056), (300, 200), (200, 300), (1024, 1024), (5, 1000)]:
        nh, nw, _, _ = tl.mgca_geometry(h, w, 256)
        assert images.fit_size(h, w, 256) == (max(nh, 1), max(nw, 1))


def test_resize_and_pad_is_a_box_average_with_centred_padding():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (128, 64)).astype(np.uint8)         # 4x shrink to 32 x 16
    out, pl = images.resize_and_pad(img, 32)
    ref = img.astype(np.float64).reshape(32, 4, 16, 4).mean((1, 3))
    assert (pl.height, pl.width, pl.top, pl.left) == (32, 16, 0, 8)
    np.testing.assert_array_equal(out[:, 8:24], np.rint(ref).astype(np.uint8))
    assert (out[:, :8] == 0).all() and (out[:, 24:] == 0).all()
    # Wide image: padding above and below, floor before / ceil after.
    out2, pl2 = images.resize_and_pad(np.full((11, 40), 9, np.uint8), 20)
    assert (pl2.height, pl2.width, pl2.top) == (5, 20, 7)
    assert (out2[7:12] == 9).all() and (out2[:7] == 0).all() and (out2[12:] == 0).all()
    # 16-bit stays 16-bit; enlarging works (bilinear).
    out3, _ = images.resize_and_pad(np.full((4, 2), 60000, np.uint16), 8)
    assert out3.dtype == np.uint16 and out3[:, 2:6].min() == 60000 and out3[:, :2].max() == 0
    with pytest.raises(ValueError):
        images.resize_and_pad(np.zeros((4, 4, 3), np.uint8), 8)


def test_placement_boxes_and_masks():
    pl = images.Placement(in_height=200, in_width=100, height=64, width=32, top=0, left=16, size=64)
    b = pl.normalise_boxes([[20, 10, 120, 60]])[0]
    np.testing.assert_allclose(b, [20 * 0.32 / 64, (10 * 0.32 + 16) / 64, 120 * 0.32 / 64,
                                   (60 * 0.32 + 16) / 64], rtol=1e-6)
    m = np.zeros((200, 100), bool)
    m[50:150, 25:75] = True
    placed = pl.place_mask(m)
    assert placed.shape == (64, 64) and set(np.unique(placed)) <= {0, 255}
    rows, cols = np.flatnonzero(placed.any(1)), np.flatnonzero(placed.any(0))
    assert (rows[0], rows[-1] + 1) == (16, 48) and (cols[0], cols[-1] + 1) == (24, 40)
    with pytest.raises(ValueError):
        pl.place_mask(np.zeros((10, 10)))
    bm = images.box_mask([0.25, 0.5, 0.75, 1.0], 8)
    ref = np.zeros((8, 8), np.uint8)
    ref[2:6, 4:8] = 255
    np.testing.assert_array_equal(bm, ref)
    assert images.box_mask([0.5, 0.5, 0.51, 0.51], 8).sum() == 255     # tiny boxes keep one pixel


def test_png_round_trip_8_and_16_bit():
    import tensorflow as tf
    a8 = np.arange(48, dtype=np.uint8).reshape(6, 8)
    a16 = (np.arange(48, dtype=np.uint16) * 1300).reshape(6, 8)
    rgb = np.stack([a8, a8 // 2, 255 - a8], -1)
    for a in (a8, a16, rgb):
        np.testing.assert_array_equal(images.decode_png(images.encode_png(a)), a)
    tf_decoded = tf.io.decode_png(images.encode_png(a16), dtype=tf.uint16).numpy()[..., 0]
    np.testing.assert_array_equal(tf_decoded, a16)
    with pytest.raises(ValueError):
        images.encode_png(np.zeros((4, 4), np.float32))


def test_png_of_random_pixels_decodes_exactly_and_is_deterministic():
    """The zlib writer's Sub filter wraps mod 256 per byte: random pixels (every difference, both bytes of a
    16-bit sample, three RGB channels) decode exactly with TensorFlow and Pillow; masks store 0/255."""
    import tensorflow as tf
    rng = np.random.default_rng(0)
    cases = {"u8": rng.integers(0, 256, (37, 53), dtype=np.uint8),
             "u16": rng.integers(0, 65536, (19, 23), dtype=np.uint16),
             "rgb": rng.integers(0, 256, (11, 13, 3), dtype=np.uint8)}
    for name, a in cases.items():
        png = images.encode_png(a)
        assert png == images.encode_png(a.copy()), name
        np.testing.assert_array_equal(images.decode_png(png), a, err_msg=name)
        back = tf.io.decode_png(png, dtype=tf.uint16 if a.dtype == np.uint16 else tf.uint8).numpy()
        np.testing.assert_array_equal(back.reshape(a.shape), a, err_msg=name)
    mask = rng.random((20, 30)) > 0.5
    np.testing.assert_array_equal(tf.io.decode_png(images.encode_png(mask)).numpy()[..., 0], mask * 255)


def test_read_any_dispatches_on_suffix(tmp_path):
    tl.write_dicom(str(tmp_path / "x.dcm"), np.arange(16, dtype=np.uint8).reshape(4, 4))
    tl.write_png(str(tmp_path / "x.png"), np.arange(16, dtype=np.uint8).reshape(4, 4))
    assert images.read_any(str(tmp_path / "x.dcm")).max() == 255          # min-max stretched
    assert images.read_any(str(tmp_path / "x.png")).max() == 15
