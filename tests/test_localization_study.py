"""launch/localization_study.py and medvlp_jax/localization_study.py: method specs, the blob-world config, the tables
over seeds against hand-computed means and sample SDs, and one 4-step run with a grounding curve (the longer
training runs are what tests/test_localization.py drives)."""
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


def test_curve_steps_and_checkpoint_cadence():
    from medvlp_jax.localization_study import curve_steps, study_config
    assert curve_steps(600, 50) == list(range(0, 601, 50))
    assert curve_steps(100, 30) == [0, 30, 60, 90, 100] and curve_steps(8, 8) == [0, 8]
    base = load_config("convirt", "test")
    c = study_config(base, "/data/blobs", steps=100, every=30)
    assert (c.train.ckpt_every_steps, c.train.keep_ckpts) == (30, 5)
    assert study_config(base, "/data/blobs", steps=100).train.ckpt_every_steps == 100
    with pytest.raises(ValueError, match="every=101"):
        study_config(base, "/data/blobs", steps=100, every=101)


def test_curve_table_is_mean_and_sample_sd_per_step(tmp_path):
    out = str(tmp_path / "study")
    for seed, pgs in enumerate(((0.5, 0.2), (0.7, 0.4))):
        path = os.path.join(out, f"sista_s{seed}", "eval")
        os.makedirs(path)
        with open(os.path.join(path, "grounding_curve.jsonl"), "w") as f:   # written out of order on purpose
            f.write(json.dumps({"step": 50, "pointing_game": pgs[1], "signed_contrast": -1.0}) + "\n")
            f.write(json.dumps({"step": 0, "pointing_game": pgs[0], "signed_contrast": 2.0}) + "\n")
        _write(os.path.join(out, f"sista_s{seed}"), "grounding.json", {"pointing_game": pgs[1]})
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "localization_study.py"), f"--out={out}",
                        "--methods=sista", "--seeds=0,1", "--steps=50", "--every=50", "--table_only"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    curve = r.stdout.split("\n\n")[1].splitlines()
    head = curve[0].strip("| ").split(" | ")
    rows = [line.strip().strip("|").strip().split(" | ") for line in curve[2:]]
    assert [row[head.index("step")] for row in rows] == ["0", "50"]
    assert rows[0][head.index("own PG")] == f"0.600 ± {0.2 / 2 ** 0.5:.3f}"
    assert rows[1][head.index("own PG")] == f"0.300 ± {0.2 / 2 ** 0.5:.3f}"
    assert rows[1][head.index("own signed contrast")] == "-1.00 ± 0.000"
    assert rows[1][head.index("cosine PG")] == "-"


def test_four_step_run_with_a_curve_resumes_without_scoring_again(tmp_path):
    """Without the untrained baseline the curve scores step 0 itself: it must equal the suite's untrained
    evaluation written afterwards (same weights, same protocol); a second call trains nothing and adds nothing
    to the curve; a run trained without checkpoints on the way says so."""
    out = tmp_path / "study"
    cmd = [sys.executable, os.path.join(ROOT, "launch", "localization_study.py"), f"--out={out}", "--steps=4",
           "--every=2", "--methods=convirt", "--seeds=0"]
    r = subprocess.run(cmd + ["--no_untrained"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    workdir = str(out / "convirt_s0")
    from medvlp_jax import localization_study as study
    curve = study.read_curve(workdir)
    assert [row["step"] for row in curve] == [0, 2, 4] and study.read_results(workdir, untrained=True) is None
    before = open(os.path.join(workdir, "eval", "grounding_curve.jsonl")).read()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)      # writes the untrained baseline only
    assert r.returncode == 0, r.stderr
    assert open(os.path.join(workdir, "eval", "grounding_curve.jsonl")).read() == before
    assert "| convirt | 2 | 1 |" in r.stdout
    untrained = study.read_results(workdir, untrained=True)
    for key in ("pointing_game", "cnr", "signed_contrast", "cosine/pointing_game"):
        assert curve[0][key] == pytest.approx(untrained[key], abs=1e-6), key
    assert curve[1]["pointing_game"] != curve[0]["pointing_game"] or curve[1]["cnr"] != curve[0]["cnr"]
    os.remove(os.path.join(workdir, "eval", "grounding_curve.jsonl"))
    r = subprocess.run(cmd[:-3] + ["--every=1", "--methods=convirt", "--seeds=0", f"--data={out / 'data'}"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "trained without them" in r.stderr, r.stderr
