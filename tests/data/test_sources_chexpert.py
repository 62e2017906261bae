"""CheXpert v1.0-small converter and CheXpert 5x200, on fixtures laid out as the download.

One test uses the first rows of CheXpert's real train.csv (shipped inside the torchxrayvision wheel; read
at test time, never committed) to check the reader against the real header, paths and label values.
"""
import csv
import gzip
import os
import zlib

import numpy as np
import pytest

from medvlp_jax.data.sources import chexpert, common
import sources_testlib as tl

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *common.CHEXPERT_CLASSES]
COMP = list(common.CHEXPERT_COMPETITION)


def _value(rel: str) -> int:
    return 30 + zlib.crc32(rel.encode()) % 200


def write_fixture(parent, train_rows, valid_rows, root_name="CheXpert-v1.0-small"):
    """CSV rows as lists of strings (HEADER order); writes images for the frontal rows."""
    root = parent / root_name
    root.mkdir(parents=True)
    for name, rows in (("train.csv", train_rows), ("valid.csv", valid_rows)):
        with open(root / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(HEADER)
            w.writerows(rows)
        for r in rows:
            if r[3] == "Frontal":
                rel = r[0].split("/", 1)[1]
                tl.write_jpeg(str(root / rel), tl.flat_image(26, 20, _value(r[0])))
    return root


def _row(patient, study, view, labels, frontal=True):
    """A CSV row; labels: {name: "1.0"/"0.0"/"-1.0"}, others blank."""
    path = f"CheXpert-v1.0-small/{'valid' if patient >= 64541 else 'train'}/patient{patient:05d}/" \
           f"study{study}/view{view}_{'frontal' if frontal else 'lateral'}.jpg"
    return [path, "Female", "60", "Frontal" if frontal else "Lateral", "AP" if frontal else "",
            *[labels.get(c, "") for c in common.CHEXPERT_CLASSES]]


def _mgca_reference(raw: dict[str, str]) -> list[float]:
    """Independent statement of the MGCA policy on the CSV strings."""
    out = []
    for c in COMP:
        v = raw[c]
        if v == "":
            out.append(0.0)
        elif float(v) == -1.0:
            out.append(1.0 if c in ("Atelectasis", "Edema", "Pleural Effusion") else 0.0)
        else:
            out.append(float(v))
    return out


def _valid_rows():
    rows = []
    for p in range(64541, 64547):
        labels = {"Edema": "1.0", "Cardiomegaly": "0.0"} if p % 2 else {"Atelectasis": "1.0"}
        rows.append(_row(p, 1, 1, labels))
        rows.append(_row(p, 1, 2, {}, frontal=False))
    return rows


def test_real_train_csv(tmp_path):
    path = tl.txv_data_file("chexpert_train.csv.gz")
    if path is None:
        pytest.skip("torchxrayvision (with CheXpert's train.csv) is not installed")
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [next(reader) for _ in range(400)]
    assert header == HEADER                                   # the layout our reader assumes
    root = write_fixture(tmp_path, rows, _valid_rows())
    out = str(tmp_path / "out")
    summary = chexpert.prepare_chexpert(str(root), out, image_size=32, num_shards=2, num_validation=40,
                                        per_class_5x200=1, progress=False)
    got = tl.read_all(out)
    raw = {r[0].split("/", 1)[1].rsplit(".", 1)[0]: dict(zip(HEADER, r)) for r in rows + _valid_rows()}
    frontal_train = {k for k, r in raw.items()
                     if r["Frontal/Lateral"] == "Frontal" and k.startswith("train/")}
    five = tmp_path / "five"
    s5 = chexpert.prepare_chexpert_5x200(str(root), str(five), image_size=32, num_shards=1, per_class=1,
                                         progress=False)
    five_recs = tl.read_split(str(five), "test")
    five_ids = [r["id"] for r in five_recs]
    assert s5["splits"] == {"test": 5} and len(set(five_ids)) == 5
    for k, r in enumerate(five_recs):                         # positive for exactly its class, others 0/blank
        vals = [raw[r["id"]][c] for c in COMP]
        assert vals[k] == "1.0" and all(v in ("", "0.0") for j, v in enumerate(vals) if j != k), vals
        np.testing.assert_array_equal(r["labels"], np.eye(5)[k])
    train_ids = {r["id"] for r in got["train"]}
    val_ids = {r["id"] for r in got["validation"]}
    assert train_ids | val_ids == frontal_train - set(five_ids) and not train_ids & val_ids
    assert summary["dropped"]["in_chexpert_5x200"] == 5
    assert summary["dropped"]["not_frontal"] == sum(r[3] != "Frontal" for r in rows) + 6
    assert len(val_ids) >= 40
    assert [r["id"] for r in got["test"]] == [f"valid/patient{p}/study1/view1_frontal"
                                              for p in range(64541, 64547)]
    tl.assert_patient_disjoint(got)
    for recs in got.values():
        for r in recs:
            np.testing.assert_array_equal(r["labels"], _mgca_reference(raw[r["id"]]))
            assert r["patient_id"] == r["id"].split("/")[1]
            assert r["study_id"].startswith(r["patient_id"] + "/")
            value = _value("CheXpert-v1.0-small/" + r["id"] + ".jpg")
            assert abs(int(np.median(r["pixels"][:, 10:22])) - value) <= 2
    assert tl.schema.read_info(out)["class_names"] == COMP


def _synthetic_train():
    rows, rng = [], np.random.default_rng(3)
    for p in range(1, 41):
        labels = {}
        k = p % 6                          # 0..4: exactly-one-positive candidate for class k; 5: mixed
        if k < 5:
            labels[COMP[k]] = "1.0"
            if p % 4 == 0:
                labels[COMP[(k + 1) % 5]] = "0.0"
            if p % 7 == 0:
                labels[COMP[(k + 2) % 5]] = "-1.0"         # uncertain → not a 5x200 candidate
        else:
            labels = {COMP[0]: "1.0", COMP[1]: "1.0", "Fracture": "-1.0"}
        rows.append(_row(p, 1, 1, labels))
        if rng.random() < 0.5:
            rows.append(_row(p, 1, 2, labels, frontal=False))
        if p % 3 == 0:
            rows.append(_row(p, 2, 1, labels))
    return rows


def test_5x200_selection_and_raw_policy(tmp_path):
    rows = _synthetic_train()
    root = write_fixture(tmp_path, rows, _valid_rows(), root_name="renamed-root")   # paths fall back
    import pandas as pd
    df = pd.read_csv(root / "train.csv")
    sel = chexpert.select_5x200(df, per_class=2, seed=0)
    assert sel == chexpert.select_5x200(df, per_class=2, seed=0)
    assert [c for _, c in sel] == [c for c in COMP for _ in range(2)]
    by_path = {r[0]: dict(zip(HEADER, r)) for r in rows}
    for p, c in sel:
        r = by_path[p]
        assert r["Frontal/Lateral"] == "Frontal" and r[c] == "1.0"
        assert all(r[o] in ("", "0.0") for o in COMP if o != c)
    with pytest.raises(ValueError, match="exactly"):
        chexpert.select_5x200(df, per_class=50)
    out = str(tmp_path / "raw")
    s = chexpert.prepare_chexpert(str(root), out, image_size=16, num_shards=1, label_policy="raw",
                                  num_validation=5, per_class_5x200=2, seed=1, progress=False)
    got = tl.read_all(out)
    assert tl.schema.read_info(out)["class_names"] == list(common.CHEXPERT_CLASSES)
    for r in got["train"] + got["validation"]:
        src = by_path[f"CheXpert-v1.0-small/{r['id']}.jpg"]
        ref = [0.0 if src[c] == "" else float(src[c]) for c in common.CHEXPERT_CLASSES]
        np.testing.assert_array_equal(r["labels"], ref)
    assert not {r["id"] for r in got["train"]} & {p.split("/", 1)[1][:-4] for p, _ in sel}
    tl.assert_patient_disjoint(got)
    assert s["counts"]["validation_patients"] >= 1 and len(got["validation"]) >= 5
    # Deterministic: the same call writes the same records.
    out2 = str(tmp_path / "raw2")
    chexpert.prepare_chexpert(str(root), out2, image_size=16, num_shards=1, label_policy="raw",
                              num_validation=5, per_class_5x200=2, seed=1, progress=False)
    assert [r["id"] for r in tl.read_split(out2, "validation")] == [r["id"] for r in got["validation"]]
    with pytest.raises(ValueError, match="label_policy"):
        chexpert.prepare_chexpert(str(root), out2, label_policy="u-ones")
    with pytest.raises(FileNotFoundError, match="train.csv"):
        chexpert.prepare_chexpert(str(tmp_path), out2)


def test_worker_processes_give_the_same_shards(tmp_path):
    root = write_fixture(tmp_path, _synthetic_train(), _valid_rows())
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    kw = dict(image_size=16, num_shards=2, num_validation=5, exclude_5x200=False, progress=False)
    chexpert.prepare_chexpert(str(root), a, **kw)
    chexpert.prepare_chexpert(str(root), b, num_workers=2, **kw)
    for split in ("train", "validation", "test"):
        ra, rb = tl.read_split(a, split), tl.read_split(b, split)
        assert [r["id"] for r in ra] == [r["id"] for r in rb]
        assert all(x["image"] == y["image"] for x, y in zip(ra, rb))
    assert os.path.exists(os.path.join(b, common.SUMMARY_FILE))
