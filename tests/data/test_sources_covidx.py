"""COVIDx converter on a fixture laid out as the release (split lists + train/ test/ folders)."""
import os

import numpy as np
import pytest

from medvlp_jax.data.sources import covidx
import sources_testlib as tl

SOURCES = ["cohen", "actmed", "sirm", "ricord", "rsna", "fig1"]
LABELS = ["normal", "pneumonia", "COVID-19"]


def _lines():
    """(patient_id, filename, label, source) lines: 30 patients, some with several images; patient ids
    clash across sources."""
    train, test = [], []
    for p in range(30):
        src = SOURCES[p % len(SOURCES)]
        pid = str(p % 12)                                   # the same id in different sources
        label = LABELS[p % 3]
        for j in range(1 + p % 3):
            ext = "png" if (p + j) % 2 else "jpg"
            train.append((pid, f"{src}-{p:03d}-{j}.{ext}", label, src))
    for p in range(6):
        test.append((f"t{p}", f"test-{p}.png", LABELS[p % 3], "rsna"))
    return train, test


def _value(fname: str) -> int:
    return 30 + (7 * sum(map(ord, fname))) % 200


def write_fixture(root, train_name="train.txt", test_name="test.txt"):
    train, test = _lines()
    root.mkdir(parents=True)
    for name, folder, lines in ((train_name, "train", train), (test_name, "test", test)):
        with open(root / name, "w") as f:
            f.write("".join(" ".join(line) + "\n" for line in lines))
        for k, (_, fname, _, _) in enumerate(lines):
            value = _value(fname)
            if fname.endswith(".png"):                       # RGB PNGs exist in the release
                tl.write_png(str(root / folder / fname), np.stack([tl.flat_image(20, 30, value)] * 3, -1))
            else:
                tl.write_jpeg(str(root / folder / fname), tl.flat_image(20, 30, value))
    return train, test


def test_prepare_covidx(tmp_path):
    root = tmp_path / "covidx"
    train, test = write_fixture(root)
    out = str(tmp_path / "out")
    summary = covidx.prepare_covidx(str(root), out, image_size=32, num_shards=2, progress=False)
    got = tl.read_all(out)
    groups = {f"{s}:{p}" for p, _, _, s in train}
    assert summary["splits"]["test"] == 6
    assert summary["splits"]["train"] + summary["splits"]["validation"] == len(train)
    val_groups = {r["patient_id"] for r in got["validation"]}
    assert len(val_groups) == round(0.2 * len(groups))          # 80/20 over patients
    tl.assert_patient_disjoint({k: got[k] for k in ("train", "validation")})
    by_name = {fname: (f"{s}:{p}", label) for p, fname, label, s in train + test}
    for split, recs in got.items():
        for r in recs:
            group, label = by_name[r["id"]]
            if split != "test":
                assert r["patient_id"] == group
            np.testing.assert_array_equal(r["labels"], np.eye(3)[LABELS.index(label)])
            assert r["pixels"].shape == (32, 32)                 # 20x30 → 21x32, rows 5..25
            assert abs(int(np.median(r["pixels"][6:25])) - _value(r["id"])) <= 2
            assert r["pixels"][:5].max() == 0
    assert [r["id"] for r in got["test"]] == [fname for _, fname, _, _ in test]
    again = covidx.prepare_covidx(str(root), str(tmp_path / "again"), image_size=8, num_shards=1,
                                  progress=False)
    assert again["splits"] == summary["splits"]
    assert {r["patient_id"] for r in tl.read_split(str(tmp_path / "again"), "validation")} == val_groups


def test_list_files_and_bad_labels(tmp_path):
    root = tmp_path / "c"
    write_fixture(root, train_name="train_COVIDx9A.txt", test_name="test_COVIDx9A.txt")
    s = covidx.prepare_covidx(str(root), str(tmp_path / "o"), image_size=8, num_shards=1, progress=False)
    assert s["splits"]["test"] == 6
    with open(root / "train_extra.txt", "w") as f:
        f.write("1 a.png normal cohen\n")
    with pytest.raises(FileNotFoundError, match="train_file"):
        covidx.prepare_covidx(str(root), str(tmp_path / "x"), progress=False)
    with open(root / "bad.txt", "w") as f:
        f.write("1 a.png positive rsna\n")
    with pytest.raises(ValueError, match="positive"):
        covidx.prepare_covidx(str(root), str(tmp_path / "x"), train_file="bad.txt", test_file="bad.txt")
    assert covidx.parse_list(str(root / "train_extra.txt")) == [
        {"patient_id": "1", "filename": "a.png", "label": "normal", "source": "cohen"}]
    with open(root / "spaced.txt", "w") as f:
        f.write("COVID 19 patient 7 b.jpg COVID-19 sirm\n\n")
    assert covidx.parse_list(str(root / "spaced.txt"))[0]["patient_id"] == "COVID 19 patient 7"
    os.remove(root / "train_extra.txt")
