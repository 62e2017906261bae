"""Object-CXR converter on a fixture laid out as the challenge release (train.csv, dev.csv, train/, dev/).

No Object-CXR CSV ships offline; the rows follow the format of the challenge README (``TYPE x1 y1 x2 y2``
for rectangles (0) and ellipses (1), ``2 x1 y1 ... xn yn`` for polygons, ``;`` between shapes, empty for
images without objects). Images are generated JPEGs, non-square so that padding shows in the boxes.
"""
import os

import numpy as np
import pytest

from medvlp_jax.data import images
from medvlp_jax.data.sources import object_cxr
import sources_testlib as tl

H, W = 160, 80          # every fixture image: taller than wide, so the output is padded left and right
SIZE = 32

TRAIN = {f"{k:05d}.jpg": "" for k in range(1, 10)}
TRAIN.update({
    "00001.jpg": "0 10 20 40 60",                                   # rectangle
    "00002.jpg": "1 20 40 60 120;0 0 0 8 16",                       # ellipse + rectangle
    "00003.jpg": "2 10 100 70 100 10 150",                          # right triangle
})
DEV = {"08001.jpg": "", "08002.jpg": "0 40 80 80 160", "08003.jpg": "2 0 0 80 0 80 80 0 80"}


def write_fixture(root, train=TRAIN, dev=DEV, image_col="image_name"):
    for csv_name, folder, rows in (("train.csv", "train", train), ("dev.csv", "dev", dev)):
        os.makedirs(root / folder, exist_ok=True)
        with open(root / csv_name, "w") as f:
            f.write(f"{image_col},annotation\n")
            for k, (name, annotation) in enumerate(rows.items()):
                path = f"/some/where/{folder}/{name}" if image_col == "image_path" else name
                f.write(f"{path},{annotation}\n")
                tl.write_jpeg(str(root / folder / name), tl.flat_image(H, W, 10 + 20 * (k % 12)))


def _box(x0, y0, x1, y1):
    """Reference normalised (ymin, xmin, ymax, xmax) of an input-pixel box, from MGCA's resize geometry."""
    nh, nw, top, left = tl.mgca_geometry(H, W, SIZE)
    s = nh / H
    return [(y0 * s + top) / SIZE, (x0 * s + left) / SIZE, (y1 * s + top) / SIZE, (x1 * s + left) / SIZE]


def test_parse_annotation_shapes_and_errors():
    shapes = object_cxr.parse_annotation("0 1 2 3 4;1 5 6 7 8; 2 0 0 4 0 4 3 ;")
    assert [k for k, _ in shapes] == ["rectangle", "ellipse", "polygon"]
    np.testing.assert_array_equal(shapes[0][1], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(shapes[2][1], [[0, 0], [4, 0], [4, 3]])
    assert object_cxr.parse_annotation("") == [] and object_cxr.parse_annotation(float("nan")) == []
    for bad, why in [("3 1 2 3 4", "type 3"), ("0 1 2 3", "has 3 coordinates"), ("1 5 5 2 9", "x1 < x2"),
                     ("2 0 0 1 1", "polygon 0 has 4 coordinates"), ("0 a b c d", "is not 'TYPE")]:
        with pytest.raises(ValueError, match=why):
            object_cxr.parse_annotation(bad, "train.csv, line 7")


def test_converter_on_the_release_layout(tmp_path):
    root = tmp_path / "object-CXR"
    write_fixture(root)
    out = str(tmp_path / "out")
    summary = object_cxr.prepare_object_cxr(str(root), out, image_size=SIZE, num_shards=2, progress=False)
    got = tl.read_all(out)
    assert summary["splits"] == {"train": 8, "validation": 1, "test": 3}          # official train 90/10; dev
    assert sorted(r["id"] for r in got["test"]) == sorted(DEV)
    assert sorted(r["id"] for s in ("train", "validation") for r in got[s]) == sorted(TRAIN)
    tl.assert_patient_disjoint(got)
    recs = {r["id"]: r for s in got.values() for r in s}
    want_boxes = {"00001.jpg": [_box(10, 20, 40, 60)], "00002.jpg": [_box(20, 40, 60, 120), _box(0, 0, 8, 16)],
                  "00003.jpg": [_box(10, 100, 70, 150)], "08002.jpg": [_box(40, 80, 80, 160)],
                  "08003.jpg": [_box(0, 0, 80, 80)]}
    for name, r in recs.items():
        boxes = want_boxes.get(name, [])
        np.testing.assert_allclose(r["finding_boxes"], np.reshape(boxes, (-1, 4)), atol=1e-6)
        assert r["labels"].tolist() == [float(bool(boxes))]
        assert r["finding_names"] == ["foreign object"] * len(boxes) and len(r["masks"]) == len(boxes)
    # Masks are the shapes, not their boxes: a rectangle fills its box, an ellipse covers ~pi/4 of it, the
    # right triangle half of it; each mask stays inside its box.
    nh, _, _, _ = tl.mgca_geometry(H, W, SIZE)
    s = nh / H
    rect, ellipse = recs["00002.jpg"]["masks"][1], recs["00002.jpg"]["masks"][0]
    triangle = recs["00003.jpg"]["masks"][0]
    for mask, box, share in ((recs["00001.jpg"]["masks"][0], want_boxes["00001.jpg"][0], 1.0),
                             (ellipse, want_boxes["00002.jpg"][0], np.pi / 4),
                             (triangle, want_boxes["00003.jpg"][0], 0.5)):
        box_pixels = images.box_mask(box, SIZE) > 0
        assert (mask > 0).sum() <= box_pixels.sum() and not ((mask > 0) & ~box_pixels).any()
        area = (box[2] - box[0]) * (box[3] - box[1]) * SIZE * SIZE
        assert (mask > 0).sum() == pytest.approx(share * area, rel=0.2), (share, (mask > 0).sum(), area)
    assert (rect > 0).sum() == pytest.approx(8 * 16 * s * s, rel=0.35)
    # The ellipse's centre is inside, its box's corner is not.
    y0, x0, y1, x1 = (np.asarray(want_boxes["00002.jpg"][0]) * SIZE).tolist()
    assert ellipse[int((y0 + y1) / 2), int((x0 + x1) / 2)] == 255 and ellipse[int(y0), int(x0)] == 0
    # The image is the file's (flat grey survives JPEG and resizing), padded with zeros left and right.
    px = recs["00001.jpg"]["pixels"]
    assert px[:, 0].max() == 0 and abs(int(px[SIZE // 2, SIZE // 2]) - 10) <= 2
    assert summary["counts"] == {"images_with_objects": 5, "rectangles": 3, "ellipses": 1, "polygons": 2}
    # The split is a pure function of the image names and the seed.
    again = object_cxr.prepare_object_cxr(str(root), str(tmp_path / "again"), image_size=16, num_shards=1,
                                          progress=False)
    assert [r["id"] for r in tl.read_split(str(tmp_path / "again"), "validation")] == \
        [r["id"] for r in got["validation"]]


def test_image_path_column_and_bad_input(tmp_path):
    root = tmp_path / "o"
    write_fixture(root, image_col="image_path")
    s = object_cxr.prepare_object_cxr(str(root), str(tmp_path / "a"), image_size=16, num_shards=1, progress=False)
    assert sum(s["splits"].values()) == len(TRAIN) + len(DEV)
    os.remove(root / "dev" / "08002.jpg")
    with pytest.raises(images.ImageReadError, match="08002.jpg"):
        object_cxr.prepare_object_cxr(str(root), str(tmp_path / "b"), image_size=16, progress=False)
    s = object_cxr.prepare_object_cxr(str(root), str(tmp_path / "c"), image_size=16, num_shards=1, skip_bad=True,
                                      progress=False)
    assert s["dropped"] == {"bad_image": 1} and s["splits"]["test"] == 2
    with open(root / "train.csv", "a") as f:
        f.write("00042.jpg,0 5 5 1 9\n")
    with pytest.raises(ValueError, match=r"train.csv, line 11 \(00042.jpg\): rectangle 0 .* x1 < x2"):
        object_cxr.prepare_object_cxr(str(root), str(tmp_path / "d"), progress=False)
    os.remove(root / "dev.csv")
    with pytest.raises(FileNotFoundError, match="dev.csv"):
        object_cxr.prepare_object_cxr(str(root), str(tmp_path / "e"), progress=False)
