"""Report text: IU XML parsing, anonymisation cleaning, sections, sentences (hand-written fixtures only)."""
import importlib.util
import io
import os
import tarfile

import pytest

from medvlp_jax.data import text

# A hand-written report in the real Open-i/IU structure (invented text).
IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR42"/>
   <pmcId id="42"/>
   <docSource>CXR</docSource>
   <IUXRId id="42"/>
   <licenseType>open-access</licenseType>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">XXXX, XXXX.</AbstractText>
            <AbstractText Label="INDICATION">XXXX-year-old with cough</AbstractText>
            <AbstractText Label="FINDINGS">Heart size is normal.  There is a XXXX opacity in the
               right upper lobe. No XXXX of pleural effusion.</AbstractText>
            <AbstractText Label="IMPRESSION">Right upper lobe pneumonia. Chest x-XXXX.</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
      <major>Opacity/lung/upper lobe/right</major>
      <major>Pneumonia/upper lobe/right</major>
      <automatic>opacity</automatic>
   </MeSH>
   <parentImage id="CXR42_IM-0042-1001">
      <figureId>F1</figureId>
      <caption>Xray Chest PA and Lateral</caption>
      <panel type="single"><url>/hadoop/storage/radiology/extract/CXR42_IM-0042-1001.jpg</url></panel>
   </parentImage>
   <parentImage id="CXR42_IM-0042-2001">
      <figureId>F2</figureId>
   </parentImage>
</eCitation>
"""


def test_parse_iu_xml_reads_sections_tags_and_images():
    r = text.parse_iu_xml(IU_XML)
    assert r.report_id == "42"
    assert r.findings.startswith("Heart size is normal.")
    assert r.impression == "Right upper lobe pneumonia. Chest x-XXXX."
    assert r.indication == "XXXX-year-old with cough"
    assert r.comparison == "XXXX, XXXX."
    assert r.major == ("Opacity/lung/upper lobe/right", "Pneumonia/upper lobe/right")
    assert r.automatic == ("opacity",)
    assert r.image_ids == ("CXR42_IM-0042-1001", "CXR42_IM-0042-2001")
    # findings + impression, anonymisation removed, whitespace normalised
    assert r.text == ("Heart size is normal. There is a opacity in the right upper lobe. No of pleural "
                      "effusion. Right upper lobe pneumonia. Chest.")


def test_parse_iu_xml_bytes_and_missing_sections():
    xml = IU_XML.replace('<AbstractText Label="FINDINGS">', '<AbstractText Label="OTHER">')
    r = text.parse_iu_xml(xml.encode("utf-8"))
    assert r.findings == ""
    assert r.text == "Right upper lobe pneumonia. Chest."
    with pytest.raises(ValueError, match="uId"):
        text.parse_iu_xml("<eCitation><MeSH/></eCitation>")


@pytest.mark.parametrize("raw, clean", [
    ("Unremarkable frontal x-XXXX.", "Unremarkable frontal."),
    ("We see no XXXX of any fluid.", "We see no of any fluid."),
    ("Prior film XXXX, XXXX. Heart normal.", "Prior film. Heart normal."),
    ("Changes of XXXX/granulomas.", "Changes of granulomas."),
    ("Fluid/XXXX noted.", "Fluid noted."),
    ("XXXX-A-XXXX view. XXXX XXXX are intact.", "view. are intact."),
    ("Stable (XXXX) density.", "Stable density."),
    ("Lungs clear.  \n\t Heart normal .", "Lungs clear. Heart normal."),
    ("___F with ___ cough.  No effusion.", "with cough. No effusion."),    # MIMIC-CXR style
    ("XXXX. The lungs are clear.", "The lungs are clear."),
    ("", ""),
    (None, ""),
])
def test_clean_report(raw, clean):
    assert text.clean_report(raw) == clean


def test_clean_report_keeps_ordinary_x():
    s = "X-ray of the chest, 2 x 3 cm nodule, XR chest. Excluded."
    assert text.clean_report(s) == s


MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough  // eval for pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  None.

 FINDINGS:

 There is a small left pleural effusion.  No pneumothorax.
 Heart size is normal.

 IMPRESSION:  Small left effusion.
"""


def test_sections_of_free_text_report():
    s = text.sections(MIMIC_STYLE)
    assert s["preamble"] == "FINAL REPORT"
    assert s["examination"] == "CHEST (PA AND LAT)"
    assert s["indication"] == "___F with cough // eval for pneumonia"
    assert s["technique"] == "Chest PA and lateral"
    assert s["comparison"] == "None."
    assert s["findings"] == "There is a small left pleural effusion. No pneumothorax. Heart size is normal."
    assert s["impression"] == "Small left effusion."
    assert text.report_text(s) == ("There is a small left pleural effusion. No pneumothorax. Heart size is "
                                   "normal. Small left effusion.")


def test_sections_aliases_and_no_headers():
    s = text.sections("IMPRESSIONS: A.\nHISTORY: B.\nIMPRESSION: C.")
    assert s == {"impression": "A. C.", "indication": "B."}
    assert text.sections("Just text, no headers.") == {"preamble": "Just text, no headers."}
    assert text.report_text({"impression": "Only impression."}) == "Only impression."


def test_split_sentences():
    t = ("There is a 1.5 cm nodule in the right lung. Dr. Smith was notified. 1. Small effusion. "
         "2. No pneumothorax. Heart is normal")
    assert text.split_sentences(t) == [
        "There is a 1.5 cm nodule in the right lung.",
        "Dr. Smith was notified.",
        "1. Small effusion.",
        "2. No pneumothorax.",
        "Heart is normal",
    ]
    assert text.split_sentences("  ") == []


def test_split_clauses():
    assert text.split_clauses("Heart size is normal, there is a right lower lobe opacity; no effusion.") == [
        "Heart size is normal", "there is a right lower lobe opacity", "no effusion."]
    # a list comma is not a clause boundary
    assert text.split_clauses("Small, calcified granuloma.") == ["Small, calcified granuloma."]


def test_iter_iu_reports_orders_by_number(tmp_path):
    path = str(tmp_path / "reports.tgz")
    with tarfile.open(path, "w:gz") as tar:
        for rid in (10, 2, 1):
            data = IU_XML.replace("CXR42", f"CXR{rid}").replace('"42"', f'"{rid}"').encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{rid}.xml")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reports = list(text.iter_iu_reports(path))
    assert [r.report_id for r in reports] == ["1", "2", "10"]
    assert all(r.major[0] == "Opacity/lung/upper lobe/right" for r in reports)


def test_iu_archive_path_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps -r requirements/assets.txt"):
        text.iu_archive_path()


def _archive_or_skip():
    try:
        return text.iu_archive_path()
    except FileNotFoundError:
        pytest.skip("torchxrayvision (offline assets) not installed")


def test_real_archive_parses_and_cleans():
    path = _archive_or_skip()
    assert os.path.basename(path) == "NLMCXR_reports.tgz"
    reports = list(text.iter_iu_reports(path))
    assert len(reports) == 3955
    assert [int(r.report_id) for r in reports] == sorted(int(r.report_id) for r in reports)
    texts = [r.text for r in reports]
    assert sum(bool(t) for t in texts) == 3927
    assert not any("XXXX" in t or "  " in t for t in texts)
    assert sum(len(r.major) for r in reports) > 7000
