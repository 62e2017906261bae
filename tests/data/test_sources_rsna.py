"""RSNA Pneumonia converter on a fixture laid out as the Kaggle download.

The first rows of the real stage_2_train_labels.csv (shipped in the torchxrayvision wheel; read at test
time, never committed) give the patient ids and boxes; the DICOMs are generated.
"""
import csv
import io
import os
import zipfile

import numpy as np
import pytest

from medvlp_jax.data import images
from medvlp_jax.data.sources import rsna
import sources_testlib as tl

HEADER = ["patientId", "x", "y", "width", "height", "Target"]


def write_fixture(root, rows, shapes=None, photometric="MONOCHROME2"):
    """rows: CSV rows (strings). Each patient's image is black with a white band at a patient-specific row."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / rsna.LABELS_FILE, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    patients = list(dict.fromkeys(r[0] for r in rows))
    for k, pid in enumerate(patients):
        h, w_ = (shapes or {}).get(pid, (1024, 1024))
        px = np.zeros((h, w_), np.uint8)
        band = (k % 8) * (h // 8)
        px[band:band + h // 8] = 255
        if photometric == "MONOCHROME1":
            px = 255 - px
        tl.write_dicom(str(root / rsna.IMAGES_DIR / f"{pid}.dcm"), px, patient_id=pid,
                       photometric=photometric)
    return patients


def _real_rows(n_patients=12):
    path = tl.txv_data_file("kaggle_stage_2_train_labels.csv.zip")
    if path is None:
        pytest.skip("torchxrayvision (with RSNA's stage_2_train_labels.csv) is not installed")
    with zipfile.ZipFile(path) as z:
        text = z.read("stage_2_train_labels.csv").decode()
    reader = csv.reader(io.StringIO(text))
    assert next(reader) == HEADER
    rows, seen = [], []
    for r in reader:
        if r[0] not in seen:
            if len(seen) == n_patients:
                break
            seen.append(r[0])
        rows.append(r)
    assert any(r[5] == "1" for r in rows) and any(r[5] == "0" for r in rows)
    return rows


def _box_mask_reference(box, size):
    yy, xx = np.mgrid[0:size, 0:size] + 0.5                    # pixel centres
    y0, x0, y1, x1 = np.asarray(box) * size
    return ((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)).astype(np.uint8) * 255


def test_real_label_rows(tmp_path):
    rows = _real_rows()
    root = tmp_path / "rsna"
    patients = write_fixture(root, rows)
    out = str(tmp_path / "out")
    summary = rsna.prepare_rsna(str(root), out, image_size=64, num_shards=2, progress=False)
    got = tl.read_all(out)
    assert summary["splits"] == {"train": 8, "validation": 2, "test": 2}      # 70/15/15 of 12 patients
    assert sorted(r["id"] for recs in got.values() for r in recs) == sorted(patients)
    tl.assert_patient_disjoint(got)
    for recs in got.values():
        for r in recs:
            mine = [x for x in rows if x[0] == r["id"]]
            positive = [x for x in mine if x[5] == "1"]
            assert r["labels"].tolist() == [float(bool(positive))]
            ref = np.array([[float(y) / 1024, float(x) / 1024, (float(y) + float(h)) / 1024,
                             (float(x) + float(w)) / 1024] for _, x, y, w, h, _ in positive]).reshape(-1, 4)
            np.testing.assert_allclose(r["finding_boxes"], ref, atol=1e-6)
            assert r["finding_names"] == ["pneumonia"] * len(positive)
            assert len(r["masks"]) == len(positive)
            for m, b in zip(r["masks"], ref):
                np.testing.assert_array_equal(m, _box_mask_reference(b, 64))
            k = patients.index(r["id"]) % 8                     # the white band is where it was drawn
            band = r["pixels"][k * 8:(k + 1) * 8]
            assert band.min() == 255 and np.delete(r["pixels"], np.s_[k * 8:(k + 1) * 8], 0).max() == 0
    # The split is a pure function of the patient set and the seed.
    again = rsna.prepare_rsna(str(root), str(tmp_path / "again"), image_size=16, num_shards=1, progress=False)
    assert again["splits"] == summary["splits"]
    assert [r["id"] for r in tl.read_split(str(tmp_path / "again"), "test")] == [r["id"] for r in got["test"]]
    other = rsna.prepare_rsna(str(root), str(tmp_path / "other"), image_size=16, num_shards=1, seed=5,
                              progress=False)
    assert other["splits"] == summary["splits"]


def test_non_square_monochrome1_and_missing_files(tmp_path):
    rows = [["p-a", "10", "20", "30", "40", "1"], ["p-a", "50", "100", "10", "20", "1"],
            ["p-b", "", "", "", "", "0"], ["p-c", "", "", "", "", "0"], ["p-d", "0", "0", "80", "160", "1"]]
    root = tmp_path / "rsna"
    write_fixture(root, rows, shapes={p: (160, 80) for p in ("p-a", "p-b", "p-c", "p-d")},
                  photometric="MONOCHROME1")
    out = str(tmp_path / "o")
    rsna.prepare_rsna(str(root), out, image_size=32, num_shards=1, split_fractions=(1.0, 0.0, 0.0),
                      progress=False)
    recs = {r["id"]: r for r in tl.read_split(out, "train")}
    assert sorted(recs) == ["p-a", "p-b", "p-c", "p-d"]
    nh, nw, top, left = tl.mgca_geometry(160, 80, 32)          # 32 x 16, left pad 8
    s = nh / 160
    ref = [[20 * s / 32, (10 * s + left) / 32, 60 * s / 32, (40 * s + left) / 32],
           [100 * s / 32, (50 * s + left) / 32, 120 * s / 32, (60 * s + left) / 32]]
    np.testing.assert_allclose(recs["p-a"]["finding_boxes"], ref, atol=1e-6)
    np.testing.assert_allclose(recs["p-d"]["finding_boxes"], [[0, left / 32, 1, (left + nw) / 32]], atol=1e-6)
    assert recs["p-b"]["labels"].tolist() == [0.0] and recs["p-b"]["finding_boxes"].shape == (0, 4)
    # MONOCHROME1: the stored band (drawn dark in the file) is bright, the rest dark, padding zero.
    px = recs["p-a"]["pixels"]
    assert px[0:4, left:left + nw].min() == 255 and px[8:, left:left + nw].max() == 0
    os.remove(root / rsna.IMAGES_DIR / "p-c.dcm")
    with pytest.raises(images.ImageReadError, match="p-c.dcm"):
        rsna.prepare_rsna(str(root), str(tmp_path / "x"), image_size=16, progress=False)
    s2 = rsna.prepare_rsna(str(root), str(tmp_path / "y"), image_size=16, num_shards=1, skip_bad=True,
                           progress=False)
    assert s2["dropped"] == {"bad_image": 1} and sum(s2["splits"].values()) == 3
    with open(root / rsna.LABELS_FILE, "a") as f:
        f.write("p-e,,,,,1\n")
    with pytest.raises(ValueError, match="p-e has Target 1 but no box"):
        rsna.prepare_rsna(str(root), str(tmp_path / "z"), progress=False)
