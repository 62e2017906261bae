"""Do the local branches learn where findings are? Every local method trained on the blob world
(``data/sources/blobs.py``: bright blobs at random places, reports that name them) must point its own
word-to-patch maps into the blobs far above the pointing game's chance level; ConVIRT's phrase-patch cosine
maps are scored beside them.

The default run trains GLoRIA (its cross-sample word-region term); ``-m slow`` trains PLAN and MGCA. MGCA's CTA
compares words only with the patches of their own pair: from randomly initialised encoders any one-to-one
word-to-patch assignment satisfies it, so its faithful maps need not follow the image (measured in the blob
world: at chance); ``local_negatives="batch"``, which brings the other pairs' words in, is what is trained and
checked here. docs/demo_results.md has the figures of every method and switch.
"""
from __future__ import annotations

import json
import os

import pytest

from tests.helpers import load_config

IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def blobs_root(tmp_path_factory):
    from medvlp_jax.data.sources import blobs
    root = str(tmp_path_factory.mktemp("blobs"))
    blobs.prepare_blobs(root, num_train=1024, num_test=128, image_size=IMAGE_SIZE, num_shards=2)
    return root


def blobs_config(method: str, root: str, steps: int, seed: int = 0, **method_fields):
    """``configs/<method>.py:test`` on the blob world: a 1-layer ViT with 8x8 patches of 8 px, batch 32."""
    c = load_config(method, "test")
    c.seed = seed
    c.data.root, c.data.name = root, "blobs"
    c.data.tokenizer_dir = os.path.join(root, "tokenizer")
    c.data.max_text_len = 32
    c.data.resize = c.data.crop = c.model.image.image_size = IMAGE_SIZE
    c.model.text.vocab_size = 128
    c.train.batch_size, c.train.total_steps = 32, steps
    c.train.log_every_steps, c.train.ckpt_every_steps, c.train.eval_at_end = 50, steps, False
    c.optim.lr = 1e-3
    c.method.update(method_fields)
    return c


def train_and_ground(config, workdir: str) -> dict[str, float]:
    """Pretrains ``config`` in ``workdir`` and returns the grounding evaluator's results on the test split."""
    import importlib.util
    from medvlp_jax.evaluators import common, grounding
    from medvlp_jax.train import loop
    from tests.helpers import ROOT
    loop.run(config, workdir)
    spec = importlib.util.spec_from_file_location("eval_grounding", os.path.join(ROOT, "configs", "eval", "grounding.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.grounding_config("demo")                 # the checkpoint's own data (the blob world), test split
    cfg.num_heatmaps = 2
    res = grounding.evaluate(common.load_run(workdir), cfg)
    print(json.dumps({k: round(res[k], 3) for k in ("pointing_game", "cnr", "miou", "pointing_game_chance",
                                                    "cosine/pointing_game", "cosine/cnr", "cosine/miou")}))
    return res


def test_gloria_maps_point_into_the_blobs(blobs_root, tmp_path):
    res = train_and_ground(blobs_config("gloria", blobs_root, steps=600), str(tmp_path / "gloria"))
    chance = res["pointing_game_chance"]
    assert res["pointing_game"] > 4 * chance, res
    # Measured 2026-12-07 (blob world prepared with the deterministic WordPiece learner, 2-core machine):
    # seeds 0/1/2 give pointing game 0.590 / 0.612 / 0.638 (chance 0.047) and CNR 1.464 / 1.328 / 1.382; seed 0
    # repeated bit for bit in two runs. Before the vocabulary was deterministic the same seed gave CNR 1.219 and
    # 0.895 on two days. The 0.5 bound keeps that margin for other CPUs' float results and still fails for maps
    # with no contrast between blob and surround (CNR near 0). CNR is unsigned (MS-CXR's): maps that are cold
    # on the blob score positive too; the pointing game above is what catches those.
    assert res["cnr"] > 0.5, res


@pytest.mark.slow
@pytest.mark.parametrize("method,fields", [
    ("plan", {}),
    ("mgca", dict(local_negatives="batch")),
])
def test_local_methods_point_into_the_blobs(blobs_root, tmp_path, method, fields):
    res = train_and_ground(blobs_config(method, blobs_root, steps=1500, **fields), str(tmp_path / method))
    assert res["pointing_game"] > 4 * res["pointing_game_chance"], res
