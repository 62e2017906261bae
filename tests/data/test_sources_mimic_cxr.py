"""MIMIC-CXR-JPG converter on a fixture laid out as the PhysioNet download (CSV.gz files + files/ tree)."""
import csv
import gzip
import os

import numpy as np
import pytest

from medvlp_jax.data import images
from medvlp_jax.data.sources import common, mimic_cxr
import sources_testlib as tl

# MIMIC's -chexpert.csv.gz lists the observations alphabetically (not CheXpert's own order).
MIMIC_CHEXPERT_COLUMNS = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                          "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion", "Lung Opacity",
                          "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia", "Pneumothorax",
                          "Support Devices"]
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                    "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                    "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                    "PatientOrientationCodeSequence_CodeMeaning"]

REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
TEXT_FULL = ("No acute cardiopulmonary process. There is no focal consolidation, pleural effusion or "
             "pneumothorax. Bilateral nodular opacities that most likely represent nipple shadows.")

# (subject, study, split, [(dicom_id, view)], report or None (no file), chexpert row or None)
STUDIES = [
    ("10000032", "50414267", "train", [("d-a1", "PA"), ("d-a2", "LATERAL")], REPORT_FULL,
     {"Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": ""}),
    ("10000032", "53189527", "train", [("d-b1", "AP")],
     " FINDINGS: Heart size is mildly enlarged.\n IMPRESSON: Mild cardiomegaly, ___ noted.\n",
     {"Cardiomegaly": "1.0", "Pleural Effusion": "0.0"}),
    ("10000764", "57375967", "validate", [("d-c1", "PA"), ("d-c2", "AP")],
     " FINDINGS AND IMPRESSION: Left lower lobe opacity.\n", {"Lung Opacity": "1.0"}),
    ("10000898", "50771383", "test", [("d-d1", "AP")],
     " FINDINGS:\n Small right effusion.\n\n IMPRESSION:\n Small right pleural effusion.\n",
     {"Pleural Effusion": "1.0", "Support Devices": "-1.0"}),
    ("10001176", "53186264", "train", [("d-e1", "PA")],          # no findings / impression section
     " EXAMINATION: CHEST\n INDICATION: cough\n WET READ: no pneumonia\n", {}),
    ("10001176", "54684191", "train", [("d-f1", "PA")], " IMPRESSION: ok.\n", {}),   # too short
    ("10001401", "55350604", "train", [("d-g1", "AP")], None, {}),                     # no report file
    ("10001884", "56500000", "test", [("d-h1", "PA")], " IMPRESSION: No pneumothorax seen.\n", None),
    ("19999987", "58971208", "validate", [("d-i1", "LL")], " IMPRESSION: Normal chest.\n", {}),
]


def _value(dicom_id: str) -> int:
    """A distinct grey level per image so records can be traced to their source files."""
    return 40 + 20 * (sorted(d for s in STUDIES for d, _ in s[3]).index(dicom_id))


def _write_gz_csv(path, header, rows):
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_fixture(root, *, shape=(300, 240)):
    split_rows, meta_rows, chex_rows = [], [], []
    for sub, stu, split, dicoms, report, chex in STUDIES:
        sdir = mimic_cxr.study_dir(str(root), sub, stu)
        for dic, view in dicoms:
            split_rows.append([dic, stu, sub, split])
            meta_rows.append([dic, sub, stu, "CHEST (PA AND LAT)", view, shape[0], shape[1], "21800506",
                              "213014.531", "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
            tl.write_jpeg(os.path.join(sdir, dic + ".jpg"), tl.flat_image(*shape, _value(dic)))
        if report is not None:
            with open(sdir + ".txt", "w") as f:
                f.write(report)
        if chex is not None:
            chex_rows.append([sub, stu] + [chex.get(c, "") for c in MIMIC_CHEXPERT_COLUMNS[2:]])
    _write_gz_csv(root / mimic_cxr.SPLIT_FILE, ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_gz_csv(root / mimic_cxr.METADATA_FILE, METADATA_COLUMNS, meta_rows)
    _write_gz_csv(root / mimic_cxr.CHEXPERT_FILE, MIMIC_CHEXPERT_COLUMNS, chex_rows)
    return root


@pytest.fixture
def mimic_root(tmp_path):
    return make_fixture(tmp_path / "mimic-cxr-jpg")


def _labels(**kw):
    out = np.zeros(14, np.float32)
    for k, v in kw.items():
        out[common.CHEXPERT_CLASSES.index(k.replace("_", " "))] = v
    return out


def test_sectioning():
    sec = mimic_cxr.section_report(REPORT_FULL)
    assert sec["impression"] == "No acute cardiopulmonary process."
    assert sec["findings"].startswith("There is no focal consolidation") and "\n" not in sec["findings"]
    assert sec["indication"] == "___F with new onset ascites // eval for infection"
    assert "FINAL REPORT" in sec["preamble"]
    assert mimic_cxr.section_report(" CONCLUSION: a b c.\n IMPRESSION: d.")["impression"] == "a b c. d."
    assert mimic_cxr.report_text(REPORT_FULL) == (TEXT_FULL, "")
    assert mimic_cxr.report_text(" COMPARISON: none.") == (None, "no_findings_or_impression")
    assert mimic_cxr.report_text(" FINDINGS: clear.") == (None, "report_too_short")
    assert mimic_cxr.report_text(" FINDINGS: clear.", min_words=1) == ("clear.", "")


def test_prepare_mimic_cxr(mimic_root, tmp_path):
    out = str(tmp_path / "out")
    summary = mimic_cxr.prepare_mimic_cxr(str(mimic_root), out, image_size=64, num_shards=2, progress=False)
    got = tl.read_all(out)
    ids = {s: [r["id"] for r in recs] for s, recs in got.items()}
    assert ids == {"train": ["d-a1", "d-b1"], "validation": ["d-c1", "d-c2"], "test": ["d-d1", "d-h1"]}
    assert summary["splits"] == {"train": 2, "validation": 2, "test": 2}
    assert summary["dropped"] == {"not_frontal": 2, "no_findings_or_impression": 1, "report_too_short": 1,
                                  "no_report_file": 1}
    assert summary["counts"]["studies_without_chexpert_labels"] == 1
    assert summary["counts"]["studies_dropped"] == {"no_findings_or_impression": 1, "report_too_short": 1,
                                                    "no_report_file": 1}
    rec = {r["id"]: r for recs in got.values() for r in recs}
    assert rec["d-a1"]["report"] == TEXT_FULL
    assert rec["d-b1"]["report"] == "Mild cardiomegaly, ___ noted. Heart size is mildly enlarged."
    assert rec["d-c1"]["report"] == rec["d-c2"]["report"] == "Left lower lobe opacity."
    assert rec["d-d1"]["report"] == "Small right pleural effusion. Small right effusion."
    np.testing.assert_array_equal(rec["d-a1"]["labels"], _labels(Cardiomegaly=1, Edema=-1))
    np.testing.assert_array_equal(rec["d-d1"]["labels"], _labels(Pleural_Effusion=1, Support_Devices=-1))
    np.testing.assert_array_equal(rec["d-h1"]["labels"], np.zeros(14))          # no CheXpert row
    assert (rec["d-a1"]["patient_id"], rec["d-a1"]["study_id"]) == ("10000032", "50414267")
    tl.assert_patient_disjoint(got)
    # Images: 300x240 → 64 x 51, centred (left pad 6), flat grey = the source file's value.
    nh, nw, top, left = tl.mgca_geometry(300, 240, 64)
    for r in rec.values():
        px = r["pixels"]
        assert px.shape == (64, 64)
        assert abs(int(np.median(px[top:top + nh, left:left + nw])) - _value(r["id"])) <= 2
        assert px[:, :left].max() == 0 and px[:, left + nw:].max() == 0
    info = tl.schema.read_info(out)
    assert info["class_names"] == list(common.CHEXPERT_CLASSES) and info["image_size"] == 64


def test_bad_jpeg_raises_or_is_skipped(mimic_root, tmp_path):
    bad = os.path.join(mimic_cxr.study_dir(str(mimic_root), "10000764", "57375967"), "d-c2.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff garbage")
    with pytest.raises(images.ImageReadError, match="d-c2.jpg.*skip_bad=True"):
        mimic_cxr.prepare_mimic_cxr(str(mimic_root), str(tmp_path / "o1"), image_size=32, num_shards=1,
                                    progress=False)
    out = str(tmp_path / "o2")
    summary = mimic_cxr.prepare_mimic_cxr(str(mimic_root), out, image_size=32, num_shards=1,
                                          skip_bad=True, progress=False)
    assert summary["dropped"]["bad_image"] == 1 and summary["skipped_files"] == [bad]
    assert summary["splits"]["validation"] == 1
    assert [r["id"] for r in tl.read_split(out, "validation")] == ["d-c1"]
    with open(os.path.join(out, common.SKIPPED_FILE)) as f:
        assert f.read().startswith(bad + "\t")


def test_limit_and_missing_inputs(mimic_root, tmp_path):
    summary = mimic_cxr.prepare_mimic_cxr(str(mimic_root), str(tmp_path / "o"), image_size=32, num_shards=3,
                                          limit=1, progress=False)
    assert summary["splits"] == {"train": 1, "validation": 1, "test": 1}
    assert [r["id"] for r in tl.read_split(str(tmp_path / "o"), "train")] == ["d-a1"]
    with pytest.raises(FileNotFoundError, match="report tree"):
        mimic_cxr.prepare_mimic_cxr(str(mimic_root), str(tmp_path / "x"), reports_dir=str(tmp_path / "none"))
    os.remove(mimic_root / mimic_cxr.METADATA_FILE)
    with pytest.raises(FileNotFoundError, match="metadata"):
        mimic_cxr.prepare_mimic_cxr(str(mimic_root), str(tmp_path / "y"))
