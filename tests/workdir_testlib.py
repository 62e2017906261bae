"""A pretraining workdir in seconds: synthetic data, the ConVIRT :test model at initialisation, one checkpoint."""
from __future__ import annotations

import os


def make_tiny_workdir(workdir: str, data_root: str, *, method: str = "convirt"):
    """Writes ``workdir`` (config.json + checkpoint at step 1 of the untrained :test model) over synthetic data
    prepared in ``data_root`` (made there when missing). Returns the ``Run`` that was saved."""
    from medvlp_jax.data import schema
    from medvlp_jax.data.sources import synthetic
    from medvlp_jax.evaluators import common
    from medvlp_jax.train import checkpoint as ckpt_lib
    from tests.helpers import load_config
    if not os.path.exists(os.path.join(data_root, schema.INFO_FILE)):
        synthetic.prepare_synthetic(data_root, num_train=16, num_test=8, num_shards=1)
    config = load_config(method, "test")
    config.data.root = data_root
    config.data.tokenizer_dir = os.path.join(data_root, "tokenizer")
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
