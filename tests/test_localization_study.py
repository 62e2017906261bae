"""launch/localization_study.py and medvlp_jax/localization_study.py without training: method specs, the blob-world
config, and the table over seeds against hand-computed means and sample SDs (the training path itself is what
tests/test_localization.py drives)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, load_config


def test_parse_spec_and_label():
    from medvlp_jax.localization_study import MethodSpec, parse_spec
    assert parse_spec("gloria") == MethodSpec("gloria")
    spec = parse_spec("mgca:local_negatives=batch+local_chunk=8+bidirectional=False")
    assert spec.fields == (("local_negatives", "batch"), ("local_chunk", 8), ("bidirectional", False))
    assert spec.label == "mgca_local_negatives=batch_local_chunk=8_bidirectional=False"
    with pytest.raises(ValueError, match="expected name"):
        parse_spec("mgca:local_negatives")


def test_study_config_sets_the_world_and_refuses_unknown_method_fields():
    from medvlp_jax.localization_study import study_config
    base = load_config("sista", "test")
    c = study_config(base, "/data/blobs", steps=7, seed=3, method_fields=(("sta_negatives", "batch"),))
    assert (c.seed, c.train.total_steps, c.train.batch_size, c.data.crop, c.model.image.image_size) == (3, 7, 32, 64, 64)
    assert c.data.tokenizer_dir == os.path.join("/data/blobs", "tokenizer") and c.method.sta_negatives == "batch"
    assert "sta_negatives" not in base.method and base.train.total_steps != 7      # the base is not changed
    with pytest.raises(ValueError, match="unknown config keys \\['sta_negative'\\]"):
        study_config(base, "/data/blobs", steps=7, method_fields=(("sta_negative", "batch"),))


def _write(workdir: str, name: str, res: dict) -> None:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", name), "w") as f:
        json.dump(res, f)


def test_table_only_cli_tabulates_mean_and_sample_sd(tmp_path):
    """Three seeds of GLoRIA (one without its untrained result) and one of ConVIRT, written by hand."""
    out = str(tmp_path / "study")
    for seed, pg in enumerate((0.5, 0.6, 0.7)):
        _write(os.path.join(out, f"gloria_s{seed}"), "grounding.json",
               {"pointing_game": pg, "cnr": 1.0 + seed, "pointing_game_chance": 0.05, "signed_contrast": -0.5})
        if seed < 2:
            _write(os.path.join(out, f"gloria_s{seed}"), "grounding_untrained.json",
                   {"pointing_game": 0.1 * seed, "pointing_game_chance": 0.05})
    _write(os.path.join(out, "convirt_s0"), "grounding.json", {"pointing_game": 0.25, "pointing_game_chance": 0.04})
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "localization_study.py"), f"--out={out}",
                        "--methods=gloria,convirt", "--seeds=0,1,2", "--steps=600", "--table_only"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cells = [line.strip().strip("|").strip().split(" | ") for line in r.stdout.splitlines()[2:]]
    rows = {c[0]: c for c in cells}
    head = r.stdout.splitlines()[0].strip("| ").split(" | ")
    col = {name: head.index(name) for name in ("seeds", "own PG", "own CNR", "own signed contrast", "PG chance")}
    assert rows["gloria"][col["seeds"]] == "3"
    assert rows["gloria"][col["own PG"]] == "0.600 ± 0.100"          # mean 0.6, sample SD 0.1
    assert rows["gloria"][col["own CNR"]] == "2.00 ± 1.000"
    assert rows["gloria"][col["own signed contrast"]] == "-0.50 ± 0.000"
    assert rows["gloria"][col["PG chance"]] == "0.050"
    assert rows["convirt"][col["own PG"]] == "0.250" and rows["convirt"][col["own CNR"]] == "-"
    assert rows["gloria untrained"][col["seeds"]] == "2"
    assert rows["gloria untrained"][col["own PG"]] == f"0.050 ± {0.1 / 2 ** 0.5:.3f}"
    assert open(os.path.join(out, "results.md")).read().strip() == r.stdout.strip()


@pytest.mark.parametrize("methods,message", [
    ("mgca:local_negatives", "error: method spec 'mgca:local_negatives'"),
    ("mgca:local_negative=batch", "error: MgcaConfig: unknown config keys ['local_negative']"),
    ("mgcaa", "error: "),
])
def test_bad_method_spec_is_one_error_line_before_any_work(tmp_path, methods, message):
    out = tmp_path / "study"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "localization_study.py"), f"--out={out}",
                        f"--methods={methods}", "--seeds=0"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.startswith(message), r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2 and not out.exists()      # the error line and the --help hint
