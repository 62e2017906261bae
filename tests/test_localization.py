"""Do the local branches learn where findings are? Methods are trained on the blob world
(``data/sources/blobs.py``: bright blobs at random places, reports that name them) and their own word-to-patch
maps scored by the grounding evaluator against its pointing game's chance level, beside the same encoders at
initialisation: randomly initialised encoders already point into these bright blobs (a saliency map that
ignores the phrase; measured own-map pointing game 0.44-0.62 at initialisation, chance 0.047), so what a
method learned is the difference from its untrained maps, not the distance from chance.

The default run trains GLoRIA, the one method measured to improve on its untrained maps on every seed.
``-m slow`` trains PLAN (its maps stay as hot as at initialisation and become phrase-specific) and records,
as strict expected failures, the methods whose training makes the maps worse than at initialisation
(MGCA, SISTA, AGA): each xfail says what was measured and where it is explained
(docs/demo_results.md, "Localization in the blob world"). A fix that makes one of them pass turns its xfail
into a failure, so the record cannot go stale.
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


KEYS = ("pointing_game", "pointing_game_chance", "cnr", "signed_contrast", "cold_fraction",
        "pointing_game_multi", "pointing_game_multi_other", "cosine/pointing_game")


def train_and_ground(config, workdir: str) -> tuple[dict[str, float], dict[str, float]]:
    """Pretrains ``config`` in ``workdir``; returns the grounding evaluator's results on the test split for the
    trained encoders and for the same architecture at initialisation (``localization_study.run_setting``)."""
    from medvlp_jax import localization_study as study
    study.run_setting(config, workdir, untrained=True)
    trained, untrained = study.read_results(workdir), study.read_results(workdir, untrained=True)
    for name, res in (("trained", trained), ("untrained", untrained)):
        print(name, json.dumps({k: round(res[k], 3) for k in KEYS}))
    return trained, untrained


def test_gloria_maps_point_into_the_blobs(blobs_root, tmp_path):
    res, init = train_and_ground(blobs_config("gloria", blobs_root, steps=600), str(tmp_path / "gloria"))
    # Measured 2026-12-07 (2-core machine), seeds 0/1/2/3/4: pointing game 0.590 / 0.612 / 0.638 / 0.585 / 0.553
    # (chance 0.047); untrained seeds 0/1/2: 0.441 / 0.452 / 0.484, so training adds 0.149 / 0.160 / 0.154.
    # Seed 0 repeated bit for bit in two runs on an idle machine and gave 0.606 beside another training job
    # (XLA's CPU results are not bit-stable under load): the 0.07 bound is half the smallest gain measured.
    assert res["pointing_game"] > 4 * res["pointing_game_chance"], res
    assert res["pointing_game"] > init["pointing_game"] + 0.07, (res, init)
    # CNR 1.464 / 1.328 / 1.382 / 1.288 / 1.382; it fails for maps with no blob-surround contrast (CNR near 0).
    assert res["cnr"] > 0.5, res
    # CNR is unsigned (MS-CXR's): maps cold on the blob score as well as hot ones. The signed contrast is not:
    # 2.79 / 2.49 / 2.74 / 2.27 / 2.62, phrases whose map is colder on the blob than around it 0.5-15%.
    assert res["signed_contrast"] > 1.0 and res["cold_fraction"] < 0.2, res


@pytest.mark.slow
def test_plan_maps_point_into_the_blobs_and_follow_the_phrase(blobs_root, tmp_path):
    res, init = train_and_ground(blobs_config("plan", blobs_root, steps=600), str(tmp_path / "plan"))
    # Measured 2026-12-07, seeds 0-4: pointing game 0.537 / 0.553 / 0.596 / 0.601 / 0.367 (untrained seeds
    # 0-2: 0.601 / 0.521 / 0.596, so no gain in pointing at the blobs); on images with two phrases, own
    # boxes minus the other phrase's boxes 0.075 / 0.192 / 0.208 / 0.217 / 0.008 (untrained 0.008 / -0.117 /
    # 0.025). Seed 0 is tested; the bar on the phrase gap is below its 0.075 and above its untrained 0.008.
    assert res["pointing_game"] > 4 * res["pointing_game_chance"], res
    assert res["signed_contrast"] > 1.0, res
    gap = res["pointing_game_multi"] - res["pointing_game_multi_other"]
    init_gap = init["pointing_game_multi"] - init["pointing_game_multi_other"]
    assert gap > 0.04 and gap > init_gap, (res, init)


FAILING = [
    pytest.param("mgca", {}, id="mgca",
                 marks=pytest.mark.xfail(strict=True, reason=(
                     "MGCA's CTA compares words with the patches of their own pair only; measured own-map PG "
                     "0.101 / 0.059 / 0.037 at 600 steps (untrained 0.037 / 0.223 / 0.197), maps the same for "
                     "every phrase of an image"))),
    pytest.param("mgca", dict(local_negatives="batch"), id="mgca-batch",
                 marks=pytest.mark.xfail(strict=True, reason=(
                     "cross-pair negatives do not rescue MGCA here: PG 0.048 / 0.074 / 0.117 at 600 steps, "
                     "0.108 +- 0.021 at 1500"))),
    pytest.param("sista", {}, id="sista",
                 marks=pytest.mark.xfail(strict=True, reason=(
                     "STA drives the maps cold on the blobs: PG 0.064 / 0.005 / 0.048 at 600 steps (untrained "
                     "0.606 / 0.436 / 0.537); with lambda_sta=0 PG stays at the untrained 0.53, with "
                     "lambda_sia=0 it falls to 0.01"))),
    pytest.param("aga", {}, id="aga",
                 marks=pytest.mark.xfail(strict=True, reason=(
                     "AGA's maps lose the initial saliency: PG 0.122 / 0.239 / 0.011 at 600 steps (untrained "
                     "0.622 / 0.537 / 0.559); IGA drives it: with lambda_iga=0 PG stays at 0.50"))),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,fields", FAILING)
def test_local_methods_that_lose_the_blobs(blobs_root, tmp_path, method, fields):
    """What every local method should do: point into the blobs far above chance and no worse than at
    initialisation (seed 0, 600 steps)."""
    res, init = train_and_ground(blobs_config(method, blobs_root, steps=600, **fields), str(tmp_path / method))
    assert res["pointing_game"] > 4 * res["pointing_game_chance"], res
    assert res["pointing_game"] >= init["pointing_game"] - 0.05, (res, init)
