"""The whole evaluation suite on demo checkpoints of ConVIRT and MGCA, through the command lines (slow).

Real demo data (the IU reports + rendered radiographs, prepared into a temporary directory), each method's
``:demo`` config pretrained for a few steps by ``launch/pretrain.py``, then ``launch/evaluate.py`` with the
suite's ``fast`` preset (every evaluator, shortened protocols) on the checkpoint (the untrained column is
tested on the synthetic run in tests/evaluators/).
The full-length protocols are the ``demo`` preset; their figures are in docs/demo_results.md.

    python -m pytest -m slow tests/test_demo_suite.py
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

SUITE = ("zero_shot", "retrieval", "linear_probe", "finetune", "segmentation", "detection", "grounding")
HEADLINE = {"zero_shot": "macro_auroc", "retrieval": "i2t/R@1", "linear_probe": "100%/macro_auroc",
            "finetune": "100%/macro_auroc", "segmentation": "100%/dice", "detection": "100%/map",
            "grounding": "pointing_game"}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from medvlp_jax.data.sources import demo_iu
    root = str(tmp_path_factory.mktemp("demo_iu"))
    demo_iu.prepare_demo(root, seed=0)
    return root


def _run(*args, timeout=1500):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)            # one CPU device, as a user's run
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


@pytest.mark.parametrize("method", ["convirt", "mgca"])
def test_whole_suite_on_a_demo_checkpoint(tmp_path, demo_root, method):
    workdir = str(tmp_path / f"{method}_demo")
    _run("launch/pretrain.py", f"--config=configs/{method}.py:demo", f"--workdir={workdir}",
         f"--config.data.root={demo_root}", f"--config.data.tokenizer_dir={demo_root}/tokenizer",
         "--config.train.total_steps=20", "--config.train.log_every_steps=10")
    with open(os.path.join(workdir, "eval_results.json")) as f:
        quick = json.load(f)
    assert quick["retrieval/num_pairs"] > 300 and 0 <= quick["retrieval_same_findings/i2t/R@1"] <= 1
    r = _run("launch/evaluate.py", "--config=configs/eval/suite.py:fast", f"--checkpoint={workdir}")
    for name in SUITE:
        with open(os.path.join(workdir, "eval", f"{name}.json")) as f:
            res = json.load(f)
        assert res["protocol/untrained"] is False and res["protocol/checkpoint_step"] == 20
        value = res[HEADLINE[name]]
        assert isinstance(value, float) and math.isfinite(value), (name, value)
    with open(os.path.join(workdir, "eval", "results.md")) as f:
        md = f.read()
    assert all(f"### {name}" in md for name in SUITE) and all(f"### {name}" in r.stdout for name in SUITE)
    assert os.listdir(os.path.join(workdir, "eval", "heatmaps"))
