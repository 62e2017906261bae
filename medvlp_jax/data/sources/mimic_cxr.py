"""MIMIC-CXR-JPG 2.x + MIMIC-CXR reports → TFRecord shards (pretraining pairs), the MGCA recipe.

Layout read (``source_dir`` = the MIMIC-CXR-JPG root; ``reports_dir`` defaults to it, since the reports
come from the separate MIMIC-CXR download, ``mimic-cxr-reports.zip`` unpacked)::

    <source_dir>/mimic-cxr-2.0.0-split.csv.gz      dicom_id,study_id,subject_id,split (train/validate/test)
    <source_dir>/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id,subject_id,study_id,...,ViewPosition,...
    <source_dir>/mimic-cxr-2.0.0-chexpert.csv.gz   subject_id,study_id,<14 CheXpert names>: 1.0/0.0/-1.0/blank
    <source_dir>/files/p10/p10000032/s50414267/<dicom_id>.jpg
    <reports_dir>/files/p10/p10000032/s50414267.txt

What is kept (methods.md 1.6, with one deliberate change):

* frontal images only: ``ViewPosition`` PA or AP; each frontal image is one example paired with its
  study's report (a study with two frontal films gives two examples), id = dicom_id;
* the official split, **kept three-way**: train → "train", validate → "validation", test → "test"
  (MGCA merges validate and test into one "valid"; keeping them apart lets us report on the official test
  set, and the union is still available);
* text = IMPRESSION + " " + FINDINGS — **impression first, as MGCA does** — with newlines and runs of
  spaces collapsed, case and MIMIC's "___" anonymisation kept (tokenisation and cleaning belong to the
  text pipeline); studies with neither section, or with fewer than ``min_words`` ``\\w+`` tokens, are
  dropped (MGCA: < 3);
* labels = the 14 CheXpert observations (``common.CHEXPERT_CLASSES`` order): 1 positive, -1 uncertain,
  0 negative or blank; a study absent from the CheXpert file gets all zeros (counted);
* image: longer side resized to ``image_size`` (256 as MGCA; 512 for higher-resolution work), zero-padded
  to a square, stored as 8-bit PNG.

Sectioning: a section starts at an upper-case header at the start of a line followed by a colon
("FINDINGS:", "IMPRESSION:", ...), like the MIT-LCP ``section_text`` used by MGCA, with its mapping of
misspelled and merged headers ("IMPRESSON", "FINDINGS AND IMPRESSION", "CONCLUSION" → impression).
It is written here from that description, not copied; it does not reproduce LCP's per-study overrides
or its last-paragraph fallback (MGCA does not use that fallback either).

Dropped reasons (``summary["dropped"]``, counted per image): ``no_metadata``, ``not_frontal``,
``no_report_file``, ``no_findings_or_impression``, ``report_too_short``, ``bad_image`` (``skip_bad=True``).
"""
from __future__ import annotations

import collections
import functools
import os
import re
from typing import Any, Optional

import numpy as np

from medvlp_jax.data import images
from medvlp_jax.data.sources import common

NAME = "mimic_cxr"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_FILE = "mimic-cxr-2.0.0-chexpert.csv.gz"
SPLIT_MAP = {"train": "train", "validate": "validation", "test": "test"}
SPLITS = ("train", "validation", "test")
FRONTAL_VIEWS = ("PA", "AP")

_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 ()/,&\-]*[A-Z)])[ \t]*:", re.MULTILINE)
_IMPRESSION = {
    "impression", "impressions", "conclusion", "conclusions", "findings and impression",
    "impression and findings", "findings/impression", "findings/ impression", "findings / impression",
    "impresson", "imprression", "imoression", "impressoin", "imprssion", "impresion", "imperssion",
    "mpression", "impession",
}
_FINDINGS = {"findings", "finding", "findins", "findindgs", "findgings", "findngs", "findnings", "finidngs"}


def section_report(text: str) -> dict[str, str]:
    """Splits a MIMIC-CXR report into sections.

    Returns:
      normalised section name -> text (whitespace collapsed). "impression" and "findings" collect their
      synonyms; other headers keep their lower-cased name; text before the first header is "preamble".
      Repeated sections are joined with a space.
    """
    out: dict[str, list[str]] = collections.defaultdict(list)
    matches = list(_HEADER.finditer(text))
    bounds = [(m.start(), m.end(), m.group(1)) for m in matches]
    pre = text[:bounds[0][0]] if bounds else text
    if pre.strip():
        out["preamble"].append(pre)
    for i, (_, end, header) in enumerate(bounds):
        stop = bounds[i + 1][0] if i + 1 < len(bounds) else len(text)
        name = " ".join(header.lower().split())
        if name in _IMPRESSION:
            name = "impression"
        elif name in _FINDINGS:
            name = "findings"
        body = text[end:stop]
        if body.strip():
            out[name].append(body)
    return {k: " ".join(" ".join(v).split()) for k, v in out.items()}


def report_text(raw: str, *, min_words: int = 3) -> tuple[Optional[str], str]:
    """IMPRESSION + " " + FINDINGS of a report (impression first, as MGCA).

    Returns:
      (text, "") or (None, drop reason: "no_findings_or_impression" | "report_too_short").
    """
    sec = section_report(raw)
    parts = [sec.get("impression", ""), sec.get("findings", "")]
    text = " ".join(p for p in parts if p)
    if not text:
        return None, "no_findings_or_impression"
    if len(re.findall(r"\w+", text)) < min_words:
        return None, "report_too_short"
    return text, ""


def study_dir(root: str, subject_id: str, study_id: str) -> str:
    """<root>/files/pXX/pXXXXXXXX/sXXXXXXXX (XX = first two digits of the subject id)."""
    return os.path.join(root, "files", f"p{subject_id[:2]}", f"p{subject_id}", f"s{study_id}")


def _labels(row: dict[str, Any]) -> np.ndarray:
    out = np.zeros(len(common.CHEXPERT_CLASSES), np.float32)
    for i, c in enumerate(common.CHEXPERT_CLASSES):
        v = row.get(c)
        if v is not None and v == v:              # blank / NaN → 0
            out[i] = float(v)
    return out


def _load(payload: dict[str, Any], *, image_size: int) -> dict[str, Any]:
    pixels, _ = images.load_for_dataset(payload["path"], image_size)
    return dict(payload["fields"], image=images.encode_png(pixels))


def _read_csv(path: str, **kw):
    import pandas as pd
    if not os.path.exists(path):
        raise FileNotFoundError(f"MIMIC-CXR-JPG file {path!r} is missing; source_dir must be the "
                                f"MIMIC-CXR-JPG root holding {SPLIT_FILE}, {METADATA_FILE}, {CHEXPERT_FILE}")
    return pd.read_csv(path, **kw)


def prepare_mimic_cxr(source_dir: str, out_dir: str, *, image_size: int = 256, num_shards: int = 64,
                      seed: int = 0, skip_bad: bool = False, limit: Optional[int] = None,
                      reports_dir: Optional[str] = None, min_words: int = 3, num_workers: int = 0,
                      progress: bool = True) -> dict[str, Any]:
    """Converts MIMIC-CXR-JPG (+ reports) to train/validation/test shards. See the module docstring.

    Args:
      source_dir: the MIMIC-CXR-JPG root.
      out_dir: where the prepared data set goes.
      image_size: output side (longer side resized to it, then padded).
      num_shards: shards per split.
      seed: unused (the split is official); kept for the common signature.
      skip_bad: count unreadable/missing JPEGs as skips (listed in skipped_files.txt) instead of raising.
      limit: at most this many examples per split.
      reports_dir: root holding ``files/pXX/pXXXXXXXX/sXXXXXXXX.txt`` (default: source_dir).
      min_words: drop reports with fewer ``\\w+`` tokens.
      num_workers: image-loading processes.
      progress: tqdm bar.

    Returns:
      the summary dict of ``common.write_examples`` (counts include studies and images kept).
    """
    del seed
    reports_dir = reports_dir or source_dir
    if not os.path.isdir(os.path.join(reports_dir, "files")):
        raise FileNotFoundError(f"no report tree at {os.path.join(reports_dir, 'files')!r}; unpack "
                                "mimic-cxr-reports.zip there, or pass its directory (the one holding files/) as "
                                "--reports (reports_dir)")
    ids = {"dicom_id": str, "subject_id": str, "study_id": str}
    split = _read_csv(os.path.join(source_dir, SPLIT_FILE), dtype=ids)
    meta = _read_csv(os.path.join(source_dir, METADATA_FILE), dtype=ids)
    chex = _read_csv(os.path.join(source_dir, CHEXPERT_FILE), dtype={"subject_id": str, "study_id": str})
    unknown = set(split["split"]) - set(SPLIT_MAP)
    if unknown:
        raise ValueError(f"{SPLIT_FILE}: unknown split names {sorted(unknown)}")
    missing = [c for c in common.CHEXPERT_CLASSES if c not in chex.columns]
    if missing:
        raise ValueError(f"{CHEXPERT_FILE} lacks columns {missing}")
    view = dict(zip(meta["dicom_id"], meta["ViewPosition"]))
    labels = {(r["subject_id"], r["study_id"]): _labels(r) for r in chex.to_dict("records")}

    dropped: collections.Counter = collections.Counter()
    study_drops: collections.Counter = collections.Counter()
    texts: dict[tuple[str, str], tuple[Optional[str], str]] = {}
    no_labels: set[tuple[str, str]] = set()
    tasks: list[common.Task] = []      # train, then validation, then test; each sorted by ids
    rows = split.sort_values(["subject_id", "study_id", "dicom_id"]).to_dict("records")
    per_split: dict[str, list[common.Task]] = {s: [] for s in SPLITS}
    for r in rows:
        sub, stu, dic = r["subject_id"], r["study_id"], r["dicom_id"]
        if dic not in view:
            dropped["no_metadata"] += 1
            continue
        if view[dic] not in FRONTAL_VIEWS:
            dropped["not_frontal"] += 1
            continue
        key = (sub, stu)
        if key not in texts:
            path = study_dir(reports_dir, sub, stu) + ".txt"
            if not os.path.exists(path):
                texts[key] = (None, "no_report_file")
            else:
                with open(path, encoding="utf-8", errors="replace") as f:
                    texts[key] = report_text(f.read(), min_words=min_words)
            if texts[key][0] is None:
                study_drops[texts[key][1]] += 1
        text, reason = texts[key]
        if text is None:
            dropped[reason] += 1
            continue
        if key not in labels:
            no_labels.add(key)
        fields = {"id": dic, "patient_id": sub, "study_id": stu, "report": text,
                  "labels": labels.get(key, np.zeros(len(common.CHEXPERT_CLASSES), np.float32))}
        img = os.path.join(study_dir(source_dir, sub, stu), dic + ".jpg")
        per_split[SPLIT_MAP[r["split"]]].append(
            common.Task(SPLIT_MAP[r["split"]], img, {"path": img, "fields": fields}))
    for s in SPLITS:
        tasks.extend(per_split[s])
    kept_studies = {(t.payload["fields"]["patient_id"], t.payload["fields"]["study_id"]) for t in tasks}
    counts = {"images_in_split_file": len(rows), "frontal_images_with_text": len(tasks),
              "studies_with_text": len(kept_studies), "studies_dropped": dict(study_drops),
              "studies_without_chexpert_labels": len(no_labels)}
    return common.write_examples(
        out_dir, name=NAME, class_names=common.CHEXPERT_CLASSES, splits=SPLITS, tasks=tasks,
        load=functools.partial(_load, image_size=image_size), num_shards=num_shards, skip_bad=skip_bad,
        limit=limit, num_workers=num_workers, progress=progress, dropped=dropped, counts=counts,
        extra_info={"source": NAME, "image_size": image_size, "text": "impression + findings",
                    "label_values": "1 positive, -1 uncertain, 0 negative/blank"})
