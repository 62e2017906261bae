"""The end-of-run evaluation: the three hit definitions, their chance levels and the ceiling, by hand."""
from __future__ import annotations

import numpy as np
import pytest


def _emb(img, txt, labels):
    """Embedding dict of L2-normalised image [n, d] and text [n, d] rows with labels [n, classes]."""
    img = np.asarray(img, np.float64)
    txt = np.asarray(txt, np.float64)
    return {"img_emb": img / np.linalg.norm(img, axis=1, keepdims=True),
            "txt_emb": txt / np.linalg.norm(txt, axis=1, keepdims=True), "labels": np.asarray(labels)}


def test_group_matrix():
    from medvlp_jax.metrics import group_matrix
    m = group_matrix([("a",), (), ("a",), ("a", "b")])
    assert m.tolist() == [[True, False, True, False], [False, True, False, False],
                          [True, False, True, False], [False, False, False, True]]


def test_hits_chance_and_ceiling_by_hand():
    from medvlp_jax.evaluators.quick import evaluate_embeddings
    # Four pairs. Images 0 and 1 both rank report 1 first; images 2, 3 rank their own report first.
    img = [[1, 0.1, 0, 0], [0.2, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    txt = [[0.3, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    reports = ["No acute disease.", "no acute   disease.", "Effusion.", "Nodule."]
    findings = [[], [], ["effusion"], ["nodule"]]
    labels = [[1, 0], [1, 0], [0, 1], [0, 1]]
    res = evaluate_embeddings(_emb(img, txt, labels), np.eye(2, 4), ["normal", "finding"], reports, findings)
    # Strict: image 0 retrieves report 1 (miss), images 1-3 hit.
    assert res["retrieval/i2t/R@1"] == pytest.approx(3 / 4)
    assert res["retrieval/chance_R@1"] == pytest.approx(1 / 4)
    # Reports 0 and 1 have the same text: image 0's top report counts.
    assert res["retrieval_same_text/i2t/R@1"] == pytest.approx(1.0)
    assert res["retrieval_same_text/chance_R@1"] == pytest.approx((2 + 2 + 1 + 1) / 16)
    # Same findings: groups {0, 1}, {2}, {3}.
    assert res["retrieval_same_findings/i2t/R@1"] == pytest.approx(1.0)
    assert res["retrieval_same_findings/chance_R@1"] == pytest.approx(6 / 16)
    assert res["retrieval/ceiling_R@1"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    assert res["retrieval/num_pairs"] == 4


def test_without_reports_or_findings_only_strict():
    from medvlp_jax.evaluators.quick import evaluate_embeddings
    rng = np.random.default_rng(0)
    res = evaluate_embeddings(_emb(rng.normal(size=(5, 3)), rng.normal(size=(5, 3)), np.eye(5, 2)),
                              np.eye(2, 3), ["a", "b"])
    assert "retrieval/i2t/R@1" in res and "retrieval/ceiling_R@1" not in res
    assert not any(k.startswith(("retrieval_same_text", "retrieval_same_findings")) for k in res)


def test_evaluate_state_on_a_run_reads_reports_and_findings(syn_run):
    """On the synthetic split (stored finding names), every hit definition and the ceiling are reported,
    and their ordering holds: strict <= same-text, strict <= same-findings <= 1."""
    from medvlp_jax.evaluators import quick
    res = quick.evaluate_state(syn_run.config, syn_run, syn_run.state, syn_run.tokenizer)
    assert res["retrieval/num_pairs"] == 32
    strict = res["retrieval/i2t/R@1"]
    assert strict <= res["retrieval_same_text/i2t/R@1"] + 1e-12
    assert strict <= res["retrieval_same_findings/i2t/R@1"] + 1e-12 <= 1 + 1e-12
    assert 1 / 32 <= res["retrieval/ceiling_R@1"] <= 1
    assert np.isfinite(res["zero_shot/macro_auroc"])


def test_quick_evaluator_through_run_suite(syn_run, tmp_path):
    """configs/eval/quick.py through run_suite gives evaluate_state's numbers and writes eval/quick.json."""
    import importlib.util
    import json
    import os
    from medvlp_jax import evaluators
    from medvlp_jax.evaluators import quick
    from tests.helpers import ROOT
    spec = importlib.util.spec_from_file_location("evalcfg_quick", os.path.join(ROOT, "configs", "eval", "quick.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = evaluators.run_suite(mod.get_config("demo"), str(tmp_path), untrained=True, run=syn_run)["quick"]
    direct = quick.evaluate_state(syn_run.config, syn_run, syn_run.state, syn_run.tokenizer)
    for k, v in direct.items():
        assert out[k] == pytest.approx(v, abs=1e-6), k
    with open(os.path.join(tmp_path, "eval", "quick_untrained.json")) as f:
        assert json.load(f)["protocol/split"] == syn_run.config.data.eval_split
