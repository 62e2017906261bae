"""Demo data set from IU reports: tag mapping, phrases, splits, and prepare_demo read back with tf.data.

Fixture reports are invented text in the real Open-i XML layout; the real archive is used only when
torchxrayvision is installed, and nothing from it is written into the repository.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from typing import Optional, Sequence

import numpy as np
import pytest

from medvlp_jax.data import schema, text
from medvlp_jax.data.render import Finding
from medvlp_jax.data.sources import demo_iu


def iu_xml(report_id: int, findings: str, impression: str, major: Sequence[str],
           automatic: Sequence[str] = (), images: Optional[Sequence[str]] = None,
           indication: str = "Cough.", comparison: str = "None.") -> str:
    """An ``<eCitation>`` document shaped like ``ecgen-radiology/<id>.xml``."""
    images = images if images is not None else [f"CXR{report_id}_IM-0{report_id:03d}-1001",
                                                f"CXR{report_id}_IM-0{report_id:03d}-2001"]
    mesh = "\n".join(f"      <major>{t}</major>" for t in major)
    mesh += "".join(f"\n      <automatic>{t}</automatic>" for t in automatic)
    imgs = "\n".join(f"""   <parentImage id="{i}">
      <figureId>F{k + 1}</figureId>
      <caption>Xray Chest PA and Lateral</caption>
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/{i}.jpg</url>
         <imgModality>7</imgModality>
      </panel>
   </parentImage>""" for k, i in enumerate(images))
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{report_id}"/>
   <pmcId id="{report_id}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{report_id}"/>
   <licenseType>open-access</licenseType>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
            <AbstractText Label="COMPARISON">{comparison}</AbstractText>
            <AbstractText Label="INDICATION">{indication}</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
{mesh}
   </MeSH>
{imgs}
</eCitation>
"""


# (id, findings, impression, major tags): invented reports covering the classes the demo draws.
REPORTS = [
    (1, "Heart size normal. Lungs are clear. No XXXX of effusion.", "Unremarkable film x-XXXX.", ["normal"]),
    (2, "There is a focal opacity in the right upper lobe. Heart size is normal.",
     "Right upper lobe pneumonia versus XXXX.", ["Opacity/lung/upper lobe/right"]),
    (3, "The heart is mildly enlarged. Small left pleural effusion.", "Mild cardiomegaly, left effusion.",
     ["Cardiomegaly/mild", "Pleural Effusion/left/small"]),
    (4, "", "", ["No Indexing"]),     # no text: dropped
    (5, "Streaky bibasilar atelectasis. Degenerative changes of the thoracic spine.", "Bibasilar atelectasis.",
     ["Pulmonary Atelectasis/base/bilateral", "Thoracic Vertebrae/degenerative/mild"]),
    (6, "Lungs are hyperexpanded with flattened diaphragms. Scattered calcified granulomas.",
     "Emphysema. Prior granulomatous disease.", ["Lung/hyperdistention", "Granulomatous Disease"]),
    (7, "Left-sided pacemaker with leads in the right heart. A 1 cm nodule in the left lower lobe.",
     "Left lower lobe nodule.", ["Implanted Medical Device/left", "Nodule/lung/lower lobe/left"]),
    (8, "Low lung volumes. The right hemidiaphragm is elevated. Tortuous aorta.", "No acute disease.",
     ["Lung/hypoinflation", "Diaphragm/right/elevated", "Aorta/tortuous"]),
    (9, "Small right apical pneumothorax. Right-sided chest XXXX catheter.", "Right pneumothorax.",
     ["Pneumothorax/apex/right/small", "Catheters, Indwelling/right"]),
    (10, "Dense consolidation of the left lower lobe.", "Left lower lobe pneumonia.",
     ["Consolidation/lung/lower lobe/left"]),
    (11, "Heart size normal. No focal consolidation.", "No acute cardiopulmonary process.", ["normal"]),
    (12, "Calcified granuloma in the right lung base.", "No active disease.",
     ["Calcified Granuloma/lung/base/right"]),
]


def make_archive(path: str, reports=REPORTS) -> str:
    """Writes ``reports`` as ``ecgen-radiology/<id>.xml`` in a gzipped tar at ``path``; returns it."""
    with tarfile.open(path, "w:gz") as tar:
        for rid, findings, impression, major in reports:
            data = iu_xml(rid, findings, impression, major).encode("utf-8")
            info = tarfile.TarInfo(f"ecgen-radiology/{rid}.xml")
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------------------------------
# Tags -> findings and labels.

def test_parse_tag():
    assert demo_iu.parse_tag("Opacity/lung/upper lobe/right") == ("Opacity", ("lung", "upper lobe", "right"))
    assert demo_iu.parse_tag("normal") == ("normal", ())


@pytest.mark.parametrize("tag, expected", [
    ("Opacity/lung/upper lobe/right", [("opacity", Finding("opacity", side="right", zone="upper", name="opacity"))]),
    ("Pulmonary Atelectasis/base/left",
     [("atelectasis", Finding("atelectasis", side="left", zone="base", name="atelectasis"))]),
    ("Cardiomegaly/mild", [("cardiomegaly", Finding("cardiomegaly", severity="mild", name="cardiomegaly"))]),
    ("Costophrenic Angle/right/blunted",
     [("pleural effusion", Finding("effusion", side="right", severity="small", name="pleural effusion"))]),
    ("Pleural Effusion/bilateral/small",
     [("pleural effusion", Finding("effusion", side="bilateral", severity="small", name="pleural effusion"))]),
    ("Calcified Granuloma/lung/lingula",
     [("calcified granuloma", Finding("granuloma", zone="lingula", name="calcified granuloma"))]),
    ("Opacity/lung/bilateral/interstitial/diffuse",
     [("opacity", Finding("opacity", side="bilateral", diffuse=True, name="opacity"))]),
    ("Mass/lung/upper lobe/left", [("nodule", Finding("mass", side="left", zone="upper", name="nodule"))]),
    ("Catheters, Indwelling/right",
     [("medical device", Finding("device", side="right", device="catheter", name="medical device"))]),
    ("Surgical Instruments/abdomen/right",
     [("medical device", Finding("device", side="right", zone="abdomen", device="clips",
                                 name="medical device"))]),
    ("Lung/hyperdistention/mild", [("hyperinflation", Finding("hyperinflation", severity="mild",
                                                              name="hyperinflation"))]),
    ("Diaphragm/right/elevated",
     [("elevated diaphragm", Finding("elevated_diaphragm", side="right", name="elevated diaphragm"))]),
    ("Pneumothorax/apex/right/moderate",
     [("pneumothorax", Finding("pneumothorax", side="right", zone="apex", severity="moderate",
                               name="pneumothorax"))]),
    ("Calcinosis/aorta", []),
    ("Fractures, Bone/ribs/left/healed", []),
    ("normal", []),
])
def test_tag_findings(tag, expected):
    assert demo_iu.tag_findings(tag) == expected


def test_labels_for():
    idx = {c: i for i, c in enumerate(demo_iu.CLASS_NAMES)}
    y = demo_iu.labels_for(["normal"])
    assert y.tolist() == [1.0 if c == "normal" else 0.0 for c in demo_iu.CLASS_NAMES]
    y = demo_iu.labels_for(["Cardiomegaly/mild", "Opacity/lung/base/left", "Cardiac Shadow/enlarged",
                            "Pneumothorax/right", "Calcinosis/aorta"])
    assert set(np.flatnonzero(y)) == {idx["cardiomegaly"], idx["opacity"]}
    assert demo_iu.labels_for(["No Indexing"]).sum() == 0
    assert demo_iu.labels_for([]).sum() == 0
    assert len(demo_iu.CLASS_NAMES) == len(set(demo_iu.CLASS_NAMES)) == 14


def test_report_findings_drops_duplicates():
    got = demo_iu.report_findings(["Cardiomegaly/mild", "Cardiac Shadow/enlarged/severe",
                                   "Opacity/lung/base/left", "Opacity/lung/base/left/patchy",
                                   "Opacity/lung/base/right"])
    assert [(n, f.kind, f.side) for n, f in got] == [
        ("cardiomegaly", "cardiomegaly", None), ("opacity", "opacity", "left"), ("opacity", "opacity", "right")]


# ----------------------------------------------------------------------------------------------------
# Phrases.

def test_find_phrase_skips_denials_and_prefers_the_side():
    report = ("No pleural effusion on the right. Heart size is normal, there is a small left pleural "
              "effusion. Stable cardiomegaly.")
    assert demo_iu.find_phrase(report, "pleural effusion", "left") == "there is a small left pleural effusion."
    assert demo_iu.find_phrase(report, "pleural effusion") == "there is a small left pleural effusion."
    assert demo_iu.find_phrase(report, "cardiomegaly") == "Stable cardiomegaly."
    assert demo_iu.find_phrase(report, "pneumothorax") is None
    assert demo_iu.find_phrase("No change in cardiomegaly.", "cardiomegaly") == "No change in cardiomegaly."
    assert demo_iu.find_phrase("Opacity in the right base. Opacity in the left base.", "opacity",
                               "left") == "Opacity in the left base."
    assert demo_iu.find_phrase("Levoscoliosis.", "scoliosis") == "Levoscoliosis."


def test_example_findings_reads_a_missing_side_from_the_phrase():
    report = "Heart normal. Small left pleural effusion."
    ((f, phrase),) = demo_iu.example_findings(report, ["Pleural Effusion/small"])
    assert f.side == "left" and phrase == "Small left pleural effusion."
    ((f, phrase),) = demo_iu.example_findings("Heart normal.", ["Nodule"])
    assert f.side is None and phrase == "nodule"      # no phrase: the finding's name


# ----------------------------------------------------------------------------------------------------
# Splits.

def test_split_reports_is_a_seeded_partition():
    which, order = demo_iu.split_reports(1000, seed=3)
    assert np.bincount(which).tolist() == [800, 100, 100]
    assert sorted(order.tolist()) == list(range(1000))
    again, _ = demo_iu.split_reports(1000, seed=3)
    other, _ = demo_iu.split_reports(1000, seed=4)
    np.testing.assert_array_equal(which, again)
    assert (which != other).any()
    assert np.bincount(demo_iu.split_reports(10, 0, (0.5, 0.3, 0.2))[0]).tolist() == [5, 3, 2]
    with pytest.raises(ValueError):
        demo_iu.split_reports(10, 0, (0.5, 0.5, 0.5))


# ----------------------------------------------------------------------------------------------------
# prepare_demo, read back with tf.data + schema.feature_spec.

def read_split(root: str, split: str) -> list[dict]:
    import tensorflow as tf
    info = schema.read_info(root)
    spec = schema.feature_spec(len(info["class_names"]))
    files = [os.path.join(root, s["file"]) for s in info["splits"][split]["shards"]]

    def parse(r):
        ex = tf.io.parse_single_example(r, spec)
        return {k: (tf.sparse.to_dense(v) if isinstance(v, tf.SparseTensor) else v) for k, v in ex.items()}

    out = []
    for ex in tf.data.TFRecordDataset(files).map(parse).as_numpy_iterator():
        ex["pixels"] = tf.io.decode_png(ex["image"]).numpy()
        ex["masks"] = np.stack([tf.io.decode_png(m).numpy()[..., 0] for m in ex["finding_masks"]]) \
            if len(ex["finding_masks"]) else np.zeros((0,) + ex["pixels"].shape[:2], np.uint8)
        ex["finding_names"] = [b.decode() for b in ex["finding_names"]]
        ex["finding_phrases"] = [b.decode() for b in ex["finding_phrases"]]
        ex["finding_boxes"] = ex["finding_boxes"].reshape(-1, 4)
        out.append(ex)
    return sorted(out, key=lambda e: e["index"])


def check_records(root: str, tags_by_id: dict, texts_by_id: dict, image_size: int = 128) -> dict:
    """Checks every record against its source report; returns {split: records}."""
    info = schema.read_info(root)
    assert info["class_names"] == list(demo_iu.CLASS_NAMES)
    assert info["channels"] == 1 and info["image_size"] == image_size
    assert info["source"] == demo_iu.SOURCE
    recs = {s: read_split(root, s) for s in demo_iu.SPLITS}
    allowed = set(demo_iu.CLASS_NAMES) | set(demo_iu.EXTRA_FINDINGS)
    seen_patients = {}
    for split, rs in recs.items():
        assert [r["index"] for r in rs] == list(range(len(rs)))
        for r in rs:
            rid = r["id"].decode().removeprefix("iu-")
            assert r["patient_id"].decode() == f"iu-p{rid}"
            assert seen_patients.setdefault(r["patient_id"], split) == split    # patient-level split
            assert r["report"].decode() == texts_by_id[rid]
            assert "XXXX" not in r["report"].decode()
            tags = tags_by_id[rid]
            np.testing.assert_array_equal(r["labels"], demo_iu.labels_for(tags))
            # labels agree with the tags, checked here independently of labels_for for two classes
            assert r["labels"][demo_iu.CLASS_NAMES.index("normal")] == float(list(tags) == ["normal"])
            has_cardio = any(t.startswith("Cardiomegaly") for t in tags)
            assert r["labels"][demo_iu.CLASS_NAMES.index("cardiomegaly")] >= float(has_cardio)
            # every positive class except "normal" is drawn and localised
            names = r["finding_names"]
            for c, y in zip(demo_iu.CLASS_NAMES, r["labels"]):
                if c != "normal":
                    assert (c in names) == bool(y), (rid, c, names)
            assert set(names) <= allowed
            assert r["pixels"].shape == (image_size, image_size, 1) and r["pixels"].dtype == np.uint8
            assert len(names) == len(r["finding_phrases"]) == len(r["finding_boxes"]) == len(r["masks"])
            for phrase, name in zip(r["finding_phrases"], names):
                assert phrase == name or phrase in r["report"].decode()
            for box, mask in zip(r["finding_boxes"], r["masks"]):
                ys, xs = np.nonzero(mask)
                ref = [ys.min() / image_size, xs.min() / image_size, (ys.max() + 1) / image_size,
                       (xs.max() + 1) / image_size]
                np.testing.assert_allclose(box, ref, atol=1e-6)
    return recs


def digest(root: str) -> dict:
    return {os.path.basename(p): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in sorted(glob.glob(os.path.join(root, "*")))}


def test_prepare_demo_on_fixture_archive(tmp_path):
    archive = make_archive(str(tmp_path / "NLMCXR_reports.tgz"))
    out = demo_iu.prepare_demo(str(tmp_path / "a"), seed=1, archive=archive, num_shards=2,
                               splits=(0.6, 0.2, 0.2))
    assert out["dropped"] == {"no_findings_or_impression": 1}
    assert out["total_reports"] == len(REPORTS)
    assert out["splits"] == {"train": 7, "validation": 2, "test": 2}
    tags = {str(rid): major for rid, _, _, major in REPORTS}
    texts = {str(rid): text.report_text({"findings": f, "impression": i}) for rid, f, i, _ in REPORTS}
    recs = check_records(str(tmp_path / "a"), tags, texts)
    by_id = {r["id"].decode(): r for rs in recs.values() for r in rs}
    assert len(by_id) == 11 and "iu-4" not in by_id
    # report 2: right upper lobe opacity on the image's left, upper half, phrase from the report
    r = by_id["iu-2"]
    assert r["finding_names"] == ["opacity"]
    assert r["finding_phrases"] == ["There is a focal opacity in the right upper lobe."]
    ys, xs = np.nonzero(r["masks"][0])
    assert xs.mean() < 64 and ys.mean() < 64
    # report 3: cardiomegaly and a left effusion
    r = by_id["iu-3"]
    assert sorted(r["finding_names"]) == ["cardiomegaly", "pleural effusion"]
    eff = r["masks"][r["finding_names"].index("pleural effusion")]
    assert np.nonzero(eff)[1].mean() > 64
    # report 9: pneumothorax is localised but not a class
    assert "pneumothorax" in by_id["iu-9"]["finding_names"]
    info = json.load(open(tmp_path / "a" / "dataset_info.json"))
    assert info["seed"] == 1 and info["dropped"] == {"no_findings_or_impression": 1}
    assert sum(info["splits"][s]["num_examples"] for s in demo_iu.SPLITS) == 11
    # same arguments, same bytes; another seed, another data set
    demo_iu.prepare_demo(str(tmp_path / "b"), seed=1, archive=archive, num_shards=2, splits=(0.6, 0.2, 0.2))
    assert digest(str(tmp_path / "a")) == digest(str(tmp_path / "b"))
    demo_iu.prepare_demo(str(tmp_path / "c"), seed=2, archive=archive, num_shards=2, splits=(0.6, 0.2, 0.2))
    assert digest(str(tmp_path / "a")) != digest(str(tmp_path / "c"))


def test_prepare_demo_replaces_an_earlier_build(tmp_path):
    archive = make_archive(str(tmp_path / "r.tgz"))
    root = str(tmp_path / "d")
    demo_iu.prepare_demo(root, archive=archive, num_shards=4)
    demo_iu.prepare_demo(root, archive=archive, num_shards=1)
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "*.tfrecord")))
    assert files == ["test-00000-of-00001.tfrecord", "train-00000-of-00001.tfrecord",
                     "validation-00000-of-00001.tfrecord"]


def test_prepare_demo_real_archive_limit_40(tmp_path):
    try:
        archive = text.iu_archive_path()
    except FileNotFoundError:
        pytest.skip("torchxrayvision (offline assets) not installed")
    out = demo_iu.prepare_demo(str(tmp_path / "a"), seed=0, limit=40)
    assert out["splits"] == {"train": 32, "validation": 4, "test": 4}
    reports = [r for r in text.iter_iu_reports(archive) if r.text][:40]
    recs = check_records(str(tmp_path / "a"), {r.report_id: r.major for r in reports},
                         {r.report_id: r.text for r in reports})
    assert sum(len(v) for v in recs.values()) == 40
    n_findings = sum(len(r["finding_names"]) for rs in recs.values() for r in rs)
    n_phrases = sum(p != n for rs in recs.values() for r in rs
                    for p, n in zip(r["finding_phrases"], r["finding_names"]))
    assert n_findings > 10 and n_phrases >= 0.8 * n_findings
    demo_iu.prepare_demo(str(tmp_path / "b"), seed=0, limit=40)
    assert digest(str(tmp_path / "a")) == digest(str(tmp_path / "b"))
