"""launch/evaluate.py and run_suite: JSON + Markdown written into <checkpoint>/eval, the untrained baseline
column, config presets and overrides, and one-line errors."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

TASKS = ("zero_shot", "retrieval", "linear_probe", "finetune")


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def _load_eval_config(task):
    path = os.path.join(ROOT, "configs", "eval", f"{task}.py")
    spec = importlib.util.spec_from_file_location(f"evalcfg_{task}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_writes_json_and_markdown(syn_workdir):
    r = _cli("--config=configs/eval/zero_shot.py", f"--checkpoint={syn_workdir}", "--config.zero_shot.mode=pos_neg")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(syn_workdir, "eval", "zero_shot.json")) as f:
        res = json.load(f)
    assert res["protocol/checkpoint_step"] == 1 and res["protocol/untrained"] is False   # restored checkpoint
    assert res["protocol/mode"] == "pos_neg" and 0 <= res["macro_auroc"] <= 1
    with open(os.path.join(syn_workdir, "eval", "results.md")) as f:
        md = f.read()
    assert "### zero_shot" in md and f"| macro_auroc | {res['macro_auroc']:.4f} |" in md
    assert "### zero_shot" in r.stdout                              # printed at the end


@pytest.mark.slow
def test_cli_untrained_baseline_column(syn_workdir):
    r = _cli("--config=configs/eval/retrieval.py", f"--checkpoint={syn_workdir}", "--untrained")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(syn_workdir, "eval", "retrieval_untrained.json")) as f:
        unt = json.load(f)
    assert unt["protocol/untrained"] is True and unt["protocol/checkpoint_step"] == -1
    md = open(os.path.join(syn_workdir, "eval", "results.md")).read()
    assert "### retrieval" in md and "| metric | untrained |" in md and f"| i2t/R@1 | {unt['i2t/R@1']:.4f} |" in md


def test_cli_errors_are_one_line(tmp_path):
    r = _cli("--config=configs/eval/zero_shot.py", f"--checkpoint={tmp_path}/nothing", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "config.json" in r.stderr


def test_run_suite_in_process(syn_run, tmp_path):
    import ml_collections
    from medvlp_jax import evaluators
    cfg = ml_collections.ConfigDict({"evaluators": ["retrieval"],
                                     "retrieval": _load_eval_config("retrieval").retrieval_config()})
    cfg.retrieval.precision_ks = (5,)
    out = evaluators.run_suite(cfg, str(tmp_path), run=syn_run)
    (tmp_path / "eval" / "other_untrained.json").write_text(json.dumps({"i2t/R@1": 0.125}))
    out_u = evaluators.run_suite(cfg, str(tmp_path), untrained=True, run=syn_run)
    saved = json.load(open(tmp_path / "eval" / "retrieval.json"))
    assert saved["i2t/R@1"] == out["retrieval"]["i2t/R@1"] and saved["protocol/untrained"] is False
    saved_u = json.load(open(tmp_path / "eval" / "retrieval_untrained.json"))
    assert saved_u["protocol/untrained"] is True and saved_u["i2t/R@1"] == out_u["retrieval"]["i2t/R@1"]
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "### retrieval" in md and "| metric | checkpoint | untrained |" in md
    assert "### other" in md and "| i2t/R@1 | 0.1250 |" in md      # every result file in eval/ is tabulated
    bad = ml_collections.ConfigDict({"evaluators": ["zero_shoot"], "zero_shoot": {}})
    with pytest.raises(KeyError, match="known"):
        evaluators.run_suite(bad, str(tmp_path), run=syn_run)
    missing = ml_collections.ConfigDict({"evaluators": ["zero_shot"]})
    with pytest.raises(KeyError, match="sub-config"):
        evaluators.run_suite(missing, str(tmp_path), run=syn_run)


def test_registry_and_markdown():
    from medvlp_jax import evaluators
    names = evaluators.load_evaluators().names()
    assert set(TASKS) <= set(names)
    # Every non-helper module of the package is an evaluator registered under its own name (file == name).
    assert evaluators.evaluator_modules() == names
    md = evaluators.results_markdown({"a": {"x": 0.5, "n": 3, "protocol/data": "d"}, "a_untrained": {"x": 0.25}})
    assert "_data=d_" in md and "| x | 0.5000 | 0.2500 |" in md and "| n | 3 |  |" in md


@pytest.mark.parametrize("task", TASKS)
def test_eval_configs_presets(task):
    from medvlp_jax import evaluators
    mod = _load_eval_config(task)
    for preset in mod.PRESETS:
        c = mod.get_config(preset)
        assert list(c.evaluators) == [task]
        sub = c[task]
        assert set(evaluators.default_data()) <= set(sub.data) and "seed" in sub and "batch_size" in sub
        assert sub.data.root == mod.ROOTS[preset]
    assert mod.get_config("root=/x/y")[task].data.root == "/x/y"
    with pytest.raises(ValueError, match="unknown eval"):
        mod.get_config("nonsense")
    with pytest.raises(ValueError, match="unknown eval config argument"):
        mod.get_config("rooot=/x")
