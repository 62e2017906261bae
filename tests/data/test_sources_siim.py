"""SIIM-ACR Pneumothorax converter and RLE decoding.

The first rows of the real train-rle.csv (shipped in the torchxrayvision wheel; read at test time, never
committed) check the header quirk (" EncodedPixels") and the run-length format: decoding then re-encoding
them with an independent encoder must give the original strings back.
"""
import csv
import gzip
import os

import numpy as np
import pytest

from medvlp_jax.data import images
from medvlp_jax.data.sources import siim
import sources_testlib as tl


def _decode_reference(rle: str, h: int, w: int) -> np.ndarray:
    """Independent decoder: absolute positions by running sum, Fortran-order reshape."""
    flat = np.zeros(h * w, bool)
    if rle.strip() != "-1":
        pos = 0
        vals = [int(v) for v in rle.split()]
        for gap, length in zip(vals[0::2], vals[1::2]):
            pos += gap
            flat[pos:pos + length] = True
            pos += length
    return flat.reshape((h, w), order="F")


def _encode_reference(mask: np.ndarray) -> str:
    """SIIM's relative RLE of a mask (column-major), written independently of the decoder."""
    flat = np.concatenate([[0], mask.flatten(order="F").astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    out, prev_end = [], 0
    for s, e in zip(starts, ends):
        out += [str(s - prev_end), str(e - s)]
        prev_end = e
    return " ".join(out) if out else "-1"


def _real_rows(n_images=10):
    path = tl.txv_data_file("siim-pneumothorax-train-rle.csv.gz")
    if path is None:
        pytest.skip("torchxrayvision (with SIIM's train-rle.csv) is not installed")
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows, seen = [], []
        for r in reader:
            if r[0] not in seen:
                if len(seen) == n_images:
                    break
                seen.append(r[0])
            rows.append(r)
    return header, rows


def test_decode_matches_the_real_format():
    header, rows = _real_rows(40)
    assert header == ["ImageId", " EncodedPixels"]            # the real file's leading space
    positives = [r for r in rows if r[1].strip() != "-1"]
    assert positives
    for _, rle in rows:
        m = siim.decode_rle(rle, 1024, 1024)
        np.testing.assert_array_equal(m, _decode_reference(rle, 1024, 1024))
        assert _encode_reference(m) == rle.strip()
        if rle.strip() != "-1":
            assert m.sum() == sum(int(v) for v in rle.split()[1::2])


def test_decode_small_cases():
    # 3x4 image, column-major: pixel (row r, col c) has flat index c * 3 + r.
    m = siim.decode_rle("1 2 4 1", 3, 4)       # flat 1,2 then gap 4 from 3 → 7
    ref = np.zeros((3, 4), bool)
    ref[1, 0] = ref[2, 0] = ref[1, 2] = True
    np.testing.assert_array_equal(m, ref)
    np.testing.assert_array_equal(siim.decode_rle("2 2 8 1", 3, 4, relative=False), ref)   # 1-based absolute
    assert not siim.decode_rle(" -1", 3, 4).any() and not siim.decode_rle("", 3, 4).any()
    with pytest.raises(ValueError):
        siim.decode_rle("1 2 3", 3, 4)
    with pytest.raises(ValueError):
        siim.decode_rle("10 5", 3, 4)


def write_fixture(root, rows, header=("ImageId", " EncodedPixels"), size=1024):
    """rows: (ImageId, rle). DICOMs go under dicom-images-train/<study>/<series>/ (nested, as released)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / siim.RLE_FILE, "w", newline="") as f:
        f.write(",".join(header) + "\n")
        for image_id, rle in rows:
            f.write(f"{image_id},{rle}\n")
    ids = list(dict.fromkeys(i for i, _ in rows))
    for k, image_id in enumerate(ids):
        px = np.full((size, size), 20 + 10 * k, np.uint8)
        px[0, 0] = 0                                      # min-max then maps the flat value to 255
        d = root / "dicom-images-train" / f"1.2.276.0.7230010.3.1.2.{k}" / f"1.2.276.0.7230010.3.1.3.{k}"
        tl.write_dicom(str(d / f"{image_id}.dcm"), px, patient_id=f"pat-{k}")
    return ids


def test_prepare_siim_real_rows(tmp_path):
    _, rows = _real_rows(10)
    extra_id = "1.2.276.0.7230010.3.1.4.8323329.99999.1517875000.000001"
    a = np.zeros((1024, 1024), bool)
    a[100:300, 50:120] = True
    b = np.zeros((1024, 1024), bool)
    b[600:700, 900:1000] = True
    rows = rows + [[extra_id, " " + _encode_reference(a)], [extra_id, " " + _encode_reference(b)]]
    root = tmp_path / "siim"
    ids = write_fixture(root, [(r[0], r[1]) for r in rows])
    # A DICOM without annotation is ignored.
    tl.write_dicom(str(root / "dicom-images-train" / "x" / "y" / "unlabelled.dcm"),
                   np.zeros((8, 8), np.uint8))
    out = str(tmp_path / "out")
    summary = siim.prepare_siim(str(root), out, image_size=64, num_shards=2, progress=False)
    got = tl.read_all(out)
    assert summary["splits"] == {"train": 7, "validation": 2, "test": 2}       # 11 images, 70/15/15
    assert summary["counts"]["dicoms_without_annotation"] == 1
    assert summary["counts"]["images_with_several_rows"] >= 1
    assert sorted(r["id"] for recs in got.values() for r in recs) == sorted(ids)
    tl.assert_patient_disjoint(got)
    for recs in got.values():
        for r in recs:
            k = ids.index(r["id"])
            assert r["patient_id"] == f"pat-{k}"
            full = np.zeros((1024, 1024), bool)
            for image_id, rle in rows:
                if image_id == r["id"]:
                    full |= _decode_reference(rle, 1024, 1024)
            assert r["labels"].tolist() == [float(full.any())]
            if not full.any():
                assert r["finding_names"] == [] and r["masks"] == []
                continue
            assert r["finding_names"] == ["pneumothorax"]
            ref = (full.reshape(64, 16, 64, 16).mean((1, 3)) >= 0.5).astype(np.uint8) * 255
            np.testing.assert_array_equal(r["masks"][0], ref)
            ys, xs = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
            np.testing.assert_allclose(r["finding_boxes"][0],
                                       [ys[0] / 1024, xs[0] / 1024, (ys[-1] + 1) / 1024, (xs[-1] + 1) / 1024],
                                       atol=1e-6)
            assert r["pixels"][5:, 5:].min() == 255
    union = [r for recs in got.values() for r in recs if r["id"] == extra_id][0]
    assert union["masks"][0][6:18, 3:7].min() == 255 and union["masks"][0][38:43, 57:62].min() == 255


def test_split_is_over_images_and_header_variants(tmp_path):
    # Every image has three rows; MGCA's row split would scatter them, ours keeps each image whole.
    rows = []
    for k in range(20):
        for j in range(3):
            m = np.zeros((32, 32), bool)
            m[j * 8:j * 8 + 4, k:k + 3] = True
            rows.append((f"img{k:02d}", _encode_reference(m)))
    root = tmp_path / "siim"
    write_fixture(root, rows, header=("ImageId", "EncodedPixels"), size=32)
    out = str(tmp_path / "o")
    s = siim.prepare_siim(str(root), out, image_size=32, num_shards=1, seed=0, progress=False)
    assert s["splits"] == {"train": 14, "validation": 3, "test": 3}
    got = tl.read_all(out)
    ids = [r["id"] for recs in got.values() for r in recs]
    assert sorted(ids) == [f"img{k:02d}" for k in range(20)]
    for r in got["train"]:
        k = int(r["id"][3:])
        ref = np.zeros((32, 32), np.uint8)
        for j in range(3):
            ref[j * 8:j * 8 + 4, k:k + 3] = 255
        np.testing.assert_array_equal(r["masks"][0], ref)
    os.remove(siim.find_dicoms(str(root))["img03"])
    with pytest.raises(images.ImageReadError, match="img03"):
        siim.prepare_siim(str(root), str(tmp_path / "x"), image_size=16, progress=False)
    s2 = siim.prepare_siim(str(root), str(tmp_path / "y"), image_size=16, num_shards=1, skip_bad=True,
                           progress=False)
    assert s2["dropped"] == {"bad_image": 1} and sum(s2["splits"].values()) == 19
