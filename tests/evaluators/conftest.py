"""A tiny pretraining workdir on the synthetic data, shared by the evaluator tests (built once per session).

The checkpoint is the initialised state saved through the real Checkpointer (no train step is compiled, so
building it costs seconds); ``launch/evaluate.py`` restores it exactly as it would a trained run.
"""
from __future__ import annotations

import os

import pytest

from tests.helpers import load_config


@pytest.fixture(scope="session")
def syn_data(tmp_path_factory):
    """Synthetic prepared data: train 64 / validation 16 / test 32, 4 classes, tokenizer."""
    from medvlp_jax.data.sources import synthetic
    root = str(tmp_path_factory.mktemp("evalsyn"))
    synthetic.prepare_synthetic(root, num_train=64, num_test=32, num_shards=2)
    return root


def make_workdir(workdir: str, root: str, arg: str = "test"):
    """A pretraining workdir of the ConVIRT :test model at initialisation: config.json + a step-1 checkpoint.

    Returns the ``Run`` (``common.load_run(workdir, untrained=True)``, i.e. the state that was saved).
    """
    from medvlp_jax.evaluators import common
    from medvlp_jax.train import checkpoint as ckpt_lib
    config = load_config("convirt", arg)
    config.data.root = root
    config.data.tokenizer_dir = os.path.join(root, "tokenizer")
    config.train.eval_at_end = False
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))
    run = common.load_run(workdir, untrained=True)
    ckpt = ckpt_lib.Checkpointer(workdir, every_steps=1, keep=1)
    ckpt.save(1, run.state, {"step": 1, "seed": int(config.seed), "examples_seen": 0}, force=True)
    ckpt.wait()
    ckpt.close()
    return run


@pytest.fixture(scope="session")
def _syn_workdir_and_run(tmp_path_factory, syn_data):
    workdir = str(tmp_path_factory.mktemp("evalrun"))
    return workdir, make_workdir(workdir, syn_data)


@pytest.fixture(scope="session")
def syn_workdir(_syn_workdir_and_run):
    """The workdir (config.json + checkpoint at step 1) that the CLI tests restore."""
    return _syn_workdir_and_run[0]


@pytest.fixture(scope="session")
def syn_run(_syn_workdir_and_run):
    """The Run of ``syn_workdir`` (the saved state; ``step`` is None as it was never restored)."""
    return _syn_workdir_and_run[1]


@pytest.fixture(scope="session")
def syn_single_data(tmp_path_factory):
    """A 5x200-like set: synthetic images with exactly one positive class (one-hot labels), empty reports,
    split "test" only (CheXpert 5x200 as prepared here has no reports)."""
    import numpy as np
    from medvlp_jax.data.sources import synthetic
    from medvlp_jax.data.writer import ShardedWriter
    root = str(tmp_path_factory.mktemp("evalsingle"))
    with ShardedWriter(root, "test", num_shards=2, class_names=synthetic.CLASS_NAMES, name="synthetic") as w:
        for ex in synthetic.make_examples(60, 40, seed=7):
            if np.sum(ex["labels"]) == 1:
                w.write(dict(ex, report=""))
    return root


def eval_cfg(**fields):
    """An evaluator sub-config on the run's own data with ``fields`` set (data fields via data=dict(...))."""
    import ml_collections
    from medvlp_jax.evaluators import default_data
    data = fields.pop("data", {})
    c = ml_collections.ConfigDict({"batch_size": 0, "seed": 0, **fields})
    c.data = default_data(**data)
    return c
