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

import pytest

from tests.helpers import load_config


@pytest.fixture(scope="module")
def blobs_root(tmp_path_factory):
    from medvlp_jax import localization_study as study
    root = str(tmp_path_factory.mktemp("blobs"))
    study.prepare_world(root)
    return root


def blobs_config(method: str, root: str, steps: int, seed: int = 0, **method_fields):
    """``configs/<method>.py:test`` on the blob world (``localization_study.study_config``)."""
    from medvlp_jax import localization_study as study
    return study.study_config(load_config(method, "test"), root, steps=steps, seed=seed,
                              method_fields=tuple(method_fields.items()))


def train_and_ground(config, workdir: str) -> dict[str, float]:
    """Pretrains ``config`` in ``workdir`` and returns the grounding evaluator's results on the test split
    (the study's own path: ``localization_study.run_setting``)."""
    from medvlp_jax import localization_study as study
    study.run_setting(config, workdir, untrained=False)
    res = study.read_results(workdir)
    print(json.dumps({k: round(res[k], 3) for k in ("pointing_game", "cnr", "miou", "pointing_game_chance",
                                                    "signed_contrast", "cosine/pointing_game", "cosine/cnr")}))
    return res


def test_gloria_maps_point_into_the_blobs(blobs_root, tmp_path):
    res = train_and_ground(blobs_config("gloria", blobs_root, steps=600), str(tmp_path / "gloria"))
    chance = res["pointing_game_chance"]
    assert res["pointing_game"] > 4 * chance, res
    # Measured 2026-12-07 (blob world prepared with the deterministic WordPiece learner, 2-core machine):
    # seeds 0/1/2 give pointing game 0.590 / 0.612 / 0.638 (chance 0.047) and CNR 1.464 / 1.328 / 1.382; seed 0
    # repeated bit for bit in two runs with the machine otherwise idle, and gave 0.606 / 1.473 beside another
    # training job (XLA's CPU results are not bit-stable under load). Before the vocabulary was deterministic the
    # same seed gave CNR 1.219 and 0.895 on two days. The 0.5 bound keeps a margin for that and for other CPUs,
    # and still fails for maps with no contrast between blob and surround (CNR near 0). CNR is unsigned (MS-CXR's): maps that are cold
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
