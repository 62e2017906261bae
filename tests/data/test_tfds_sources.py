"""Each converter's TFDS builder writes exactly the records the converter writes, on the converter's own fixture.

The fixtures are the release-layout fixtures of tests/data/test_sources_*.py; the converter's output (itself
checked there against hand-computed values) is the reference, compared field by field and index by index
(ids, images byte for byte, labels, findings, boxes, masks, and the data set's info).
"""
import os

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from medvlp_jax.data import images, schema, tfds_builders  # noqa: E402
from medvlp_jax.data.sources import chexpert, covidx, mimic_cxr, ms_cxr, object_cxr, rsna, siim  # noqa: E402
import tfds_testlib  # noqa: E402
import test_sources_chexpert as chexpert_fx  # noqa: E402
import test_sources_covidx as covidx_fx  # noqa: E402
import test_sources_mimic_cxr as mimic_fx  # noqa: E402
import test_sources_ms_cxr as ms_cxr_fx  # noqa: E402
import test_sources_object_cxr as object_cxr_fx  # noqa: E402
import test_sources_rsna as rsna_fx  # noqa: E402
import test_sources_siim as siim_fx  # noqa: E402

SIZE = 32


def _chexpert(root):
    chexpert_fx.write_fixture(root.parent, chexpert_fx._synthetic_train(), chexpert_fx._valid_rows(),
                              root_name=root.name)


def _rsna(root):
    rows = [["p-a", "10", "20", "30", "40", "1"], ["p-a", "50", "100", "10", "20", "1"],
            ["p-d", "0", "0", "80", "60", "1"]]
    rows += [[f"p-{k}", "", "", "", "", "0"] for k in range(7)]
    rsna_fx.write_fixture(root, rows, shapes={r[0]: (120, 96) for r in rows})


def _siim(root):
    mask = np.zeros((64, 64), bool)
    mask[10:30, 5:20] = True
    rows = [(f"1.2.3.{k}", "-1") for k in range(7)] + [("1.2.3.9", siim_fx._encode_reference(mask))]
    siim_fx.write_fixture(root, rows, size=64)


# builder name -> (fixture writer(root), converter, converter options beyond image size and shards)
CASES = {
    "medvlp_chexpert": (_chexpert, chexpert.prepare_chexpert, {"num_validation": 5, "per_class_5x200": 2}),
    "medvlp_chexpert_5x200": (_chexpert, chexpert.prepare_chexpert_5x200, {"per_class": 2}),
    "medvlp_mimic_cxr": (mimic_fx.make_fixture, mimic_cxr.prepare_mimic_cxr, {}),
    "medvlp_rsna": (_rsna, rsna.prepare_rsna, {}),
    "medvlp_siim": (_siim, siim.prepare_siim, {}),
    "medvlp_covidx": (lambda root: covidx_fx.write_fixture(root), covidx.prepare_covidx, {}),
    "medvlp_ms_cxr": (ms_cxr_fx.write_fixture, ms_cxr.prepare_ms_cxr, {}),
    "medvlp_object_cxr": (object_cxr_fx.write_fixture, object_cxr.prepare_object_cxr, {}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_builder_writes_what_the_converter_writes(name, tmp_path):
    write_fixture, convert, options = CASES[name]
    source = tmp_path / "CheXpert-v1.0-small" if "chexpert" in name else tmp_path / "source"
    write_fixture(source)
    ours = str(tmp_path / "ours")
    convert(str(source), ours, image_size=SIZE, num_shards=2, progress=False, **options)
    summary = tfds_builders.prepare(name, str(tmp_path / "tfds"), manual_dir=str(source), num_shards=2,
                                    image_size=SIZE, **options)
    assert summary["root"].startswith(str(tmp_path / "tfds" / name))
    recs = tfds_testlib.assert_same_data(ours, summary["root"])
    assert sum(map(len, recs.values())) > 0
    assert summary["splits"] == {s: len(r) for s, r in recs.items()}


def test_chexpert_raw_config_and_image_size_are_their_own_data_sets(tmp_path):
    source = tmp_path / "CheXpert-v1.0-small"
    _chexpert(source)
    options = {"num_validation": 5, "per_class_5x200": 2}
    raw = tfds_builders.prepare("medvlp_chexpert", str(tmp_path / "tfds"), manual_dir=str(source), num_shards=1,
                                image_size=SIZE, label_policy="raw", **options)
    assert raw["config"] == f"image_size{SIZE}-label_policyraw-num_validation5-per_class_5x2002"
    assert schema.read_info(raw["root"])["class_names"] == list(chexpert.common.CHEXPERT_CLASSES)
    ours = str(tmp_path / "ours")
    chexpert.prepare_chexpert(str(source), ours, image_size=SIZE, num_shards=1, label_policy="raw",
                              progress=False, **options)
    tfds_testlib.assert_same_data(ours, raw["root"])


def test_unreadable_images_raise_or_are_skipped_like_the_converter(tmp_path):
    source = tmp_path / "covidx"
    train, _ = covidx_fx.write_fixture(source)
    missing = source / "train" / train[3][1]
    os.remove(missing)
    with pytest.raises(images.ImageReadError, match=str(missing)):
        tfds_builders.prepare("medvlp_covidx", str(tmp_path / "tfds"), manual_dir=str(source), image_size=SIZE)
    ours = str(tmp_path / "ours")
    covidx.prepare_covidx(str(source), ours, image_size=SIZE, num_shards=1, skip_bad=True, progress=False)
    summary = tfds_builders.prepare("medvlp_covidx", str(tmp_path / "tfds2"), manual_dir=str(source),
                                    num_shards=1, image_size=SIZE, skip_bad=True)
    assert summary["skipped_files"] == [str(missing)]
    assert summary["dropped"] == {"bad_image": 1}
    tfds_testlib.assert_same_data(ours, summary["root"])
