"""MS-CXR converter on a fixture laid out as the release: its CSV next to a MIMIC-CXR-JPG tree."""
import csv
import os

import numpy as np
import pytest

from medvlp_jax.data import images
from medvlp_jax.data.sources import ms_cxr
import sources_testlib as tl

COLUMNS = ["dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h", "image_width",
           "image_height"]

# (dicom_id, subject, study, (height, width) of the original, [(category, phrase, x, y, w, h)], split)
IMAGES = [
    ("aaaa1111-2222", "15318012", "51197436", (300, 240),
     [("Pneumonia", "left lower lobe pneumonia", 120, 150, 80, 100),
      ("Pleural Effusion", "small right effusion", 20, 220, 60, 50),
      ("Pleural Effusion", "small right effusion", 30, 40, 20, 20)], "train"),
    ("bbbb3333-4444", "10000032", "50414267", (240, 300),
     [("Cardiomegaly", "enlarged heart", 90, 100, 120, 90)], "val"),
    ("cccc5555-6666", "19999987", "58971208", (256, 256),
     [("Pneumothorax", "apical pneumothorax", 10, 5, 60, 40)], "test"),
    ("dddd7777-8888", "15318012", "53000000", (280, 280),
     [("Edema", "mild edema", 0, 0, 280, 280)], "train"),
]


def write_fixture(root, *, with_split=True, scale=1.0):
    """``scale`` < 1 stores smaller JPEGs than the CSV's image_width/height (a resized MIMIC copy)."""
    root.mkdir(parents=True, exist_ok=True)
    name = "MS_CXR_Local_Alignment_v1.1.0.csv" if with_split else "MS_CXR_Local_Alignment_v1.0.0.csv"
    with open(root / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS + (["split"] if with_split else []))
        for k, (dic, sub, stu, (h, wd), finds, split) in enumerate(IMAGES):
            rel = f"files/p{sub[:2]}/p{sub}/s{stu}/{dic}.jpg"
            for cat, phrase, x, y, bw, bh in finds:
                w.writerow([dic, cat, phrase, rel, x, y, bw, bh, wd, h] + ([split] if with_split else []))
            px = tl.flat_image(int(h * scale), int(wd * scale), 50 + 40 * k)
            tl.write_jpeg(str(root / rel), px)


def _reference_boxes(h, wd, finds, size, file_shape=None):
    """Boxes normalised in the padded output, written out from the MGCA geometry."""
    fh, fw = file_shape or (h, wd)
    nh, nw, top, left = tl.mgca_geometry(fh, fw, size)
    out = []
    for _, _, x, y, bw, bh in finds:
        sy, sx = nh / h, nw / wd                           # CSV pixels → resized pixels
        out.append([(y * sy + top) / size, (x * sx + left) / size, ((y + bh) * sy + top) / size,
                    ((x + bw) * sx + left) / size])
    return np.array(out)


def test_prepare_ms_cxr_v11(tmp_path):
    root = tmp_path / "ms"
    write_fixture(root)
    out = str(tmp_path / "out")
    s = ms_cxr.prepare_ms_cxr(str(root), out, image_size=64, num_shards=2, progress=False)
    assert s["splits"] == {"train": 2, "validation": 1, "test": 1}
    assert s["counts"] == {"images": 4, "phrase_boxes": 6, "phrases": 5}
    got = tl.read_all(out)
    tl.assert_patient_disjoint(got)
    recs = {r["id"]: r for rs in got.values() for r in rs}
    for k, (dic, sub, stu, (h, wd), finds, split) in enumerate(IMAGES):
        r = recs[dic]
        assert (r["patient_id"], r["study_id"]) == (sub, stu)
        assert r["finding_names"] == [f[0] for f in finds]
        assert r["finding_phrases"] == [f[1] for f in finds]
        ref = _reference_boxes(h, wd, finds, 64)
        np.testing.assert_allclose(r["finding_boxes"], ref, atol=1e-6)
        assert len(r["masks"]) == len(finds)
        for m, b in zip(r["masks"], ref):
            np.testing.assert_array_equal(m, images.box_mask(b, 64))
            ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            assert abs(ys[0] - b[0] * 64) <= 1 and abs(ys[-1] + 1 - b[2] * 64) <= 1
            assert abs(xs[0] - b[1] * 64) <= 1 and abs(xs[-1] + 1 - b[3] * 64) <= 1
        labels = np.zeros(len(ms_cxr.CLASS_NAMES))
        for f in finds:
            labels[ms_cxr.CLASS_NAMES.index(f[0])] = 1
        np.testing.assert_array_equal(r["labels"], labels)
        nh, nw, top, left = tl.mgca_geometry(h, wd, 64)
        inner = r["pixels"][top + 1:top + nh - 1, left + 1:left + nw - 1]
        assert abs(int(np.median(inner)) - (50 + 40 * k)) <= 2
    assert recs["aaaa1111-2222"]["id"] in [r["id"] for r in got["train"]]
    assert [r["id"] for r in got["validation"]] == ["bbbb3333-4444"]


def test_v10_without_split_and_resized_images(tmp_path):
    root = tmp_path / "ms"
    write_fixture(root, with_split=False, scale=0.5)
    out = str(tmp_path / "out")
    s = ms_cxr.prepare_ms_cxr(str(root), out, image_size=32, num_shards=1, progress=False)
    assert s["splits"] == {"train": 0, "validation": 0, "test": 4}
    recs = {r["id"]: r for r in tl.read_split(out, "test")}
    for dic, _, _, (h, wd), finds, _ in IMAGES:
        # The boxes follow the JPEG actually on disk (half the CSV's size).
        ref = _reference_boxes(h, wd, finds, 32, file_shape=(int(h * 0.5), int(wd * 0.5)))
        np.testing.assert_allclose(recs[dic]["finding_boxes"], ref, atol=1e-6)
    # Images elsewhere: images_dir; a missing one is an error or a counted skip.
    imgs = tmp_path / "mimic"
    os.rename(root / "files", tmp_path / "files_tmp")
    imgs.mkdir()
    os.rename(tmp_path / "files_tmp", imgs / "files")
    s2 = ms_cxr.prepare_ms_cxr(str(root), str(tmp_path / "o2"), images_dir=str(imgs), image_size=16,
                               num_shards=1, progress=False)
    assert s2["splits"]["test"] == 4
    os.remove(imgs / "files" / "p19" / "p19999987" / "s58971208" / "cccc5555-6666.jpg")
    with pytest.raises(images.ImageReadError, match="cccc5555-6666.jpg"):
        ms_cxr.prepare_ms_cxr(str(root), str(tmp_path / "o3"), images_dir=str(imgs), progress=False)
    s3 = ms_cxr.prepare_ms_cxr(str(root), str(tmp_path / "o4"), images_dir=str(imgs), image_size=16,
                               num_shards=1, skip_bad=True, progress=False)
    assert s3["splits"]["test"] == 3 and s3["dropped"] == {"bad_image": 1}
    with open(root / "MS_CXR_Local_Alignment_v1.0.0.csv", "a") as f:
        f.write("eeee,Nodule,a nodule,files/p1/p1/s1/eeee.jpg,1,1,1,1,10,10\n")
    with pytest.raises(ValueError, match="Nodule"):
        ms_cxr.prepare_ms_cxr(str(root), str(tmp_path / "o5"), images_dir=str(imgs), progress=False)
