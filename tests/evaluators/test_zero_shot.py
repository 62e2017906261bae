"""Zero-shot evaluator: scoring functions against NumPy references, prompt resolution, and the evaluator
on the tiny synthetic run (multi-label, MedKLIP pos/neg, GLoRIA scoring) and on a single-label set (multiclass)."""
import numpy as np
import pytest

from tests.evaluators.conftest import eval_cfg


def _auroc_pairs(s, y):
    """Independent AUROC: fraction of (positive, negative) pairs ranked correctly, ties 1/2."""
    pos, neg = s[y == 1], s[y == 0]
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


def test_cosine_and_pos_neg_scores():
    from medvlp_jax.evaluators import zero_shot as zs
    rng = np.random.default_rng(0)
    img, pos, neg = rng.normal(size=(5, 3)), rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    cos = zs.cosine_scores(img, pos)
    ref = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in pos] for a in img])
    np.testing.assert_allclose(cos, ref, atol=1e-12)
    p = zs.pos_neg_scores(img, pos, neg, temperature=0.5)
    cn = zs.cosine_scores(img, neg)
    two = np.stack([cos, cn], -1) / 0.5
    soft = np.exp(two) / np.exp(two).sum(-1, keepdims=True)
    np.testing.assert_allclose(p, soft[..., 0], atol=1e-12)


def test_zscore_columns_and_multiclass_metrics():
    from medvlp_jax.evaluators import zero_shot as zs
    s = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]])
    z = zs.zscore_columns(s)
    np.testing.assert_allclose(z[:, 0], (s[:, 0] - 2) / np.std(s[:, 0]))
    np.testing.assert_array_equal(z[:, 1], 0.0)          # constant column
    # A class with a large offset would win every argmax without the z-normalisation.
    scores = np.array([[0.9, 10.0], [0.1, 10.5], [0.8, 10.1], [0.2, 10.4]])
    y = np.array([[1, 0], [0, 1], [1, 0], [0, 1]])
    m = zs.multiclass_metrics(scores, y, ["a", "b"])
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0
    assert m["macro_auroc"] == 1.0


def test_multilabel_metrics_reference_and_skipped_class():
    from medvlp_jax import metrics
    from medvlp_jax.evaluators import zero_shot as zs
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (40, 3))
    y[:, 2] = 0                                           # no positives: left out of the means
    s = rng.normal(size=(40, 3)) + y
    m = zs.multilabel_metrics(s, y, ["a", "b", "c"])
    assert m["auroc/a"] == pytest.approx(_auroc_pairs(s[:, 0], y[:, 0]))
    assert "auroc/c" not in m and m["protocol/skipped_classes"] == "c"
    assert m["macro_auroc"] == pytest.approx((m["auroc/a"] + m["auroc/b"]) / 2)
    # F1 at the best threshold: brute force over every threshold.
    best = max(metrics.f1_at_threshold(s[:, 1], y[:, 1], t) for t in s[:, 1])
    assert m["f1/b"] == pytest.approx(best)


def test_grammar_prompts_deterministic():
    from medvlp_jax.evaluators import zero_shot as zs
    a, b = zs.grammar_prompts(per_class=5, seed=6), zs.grammar_prompts(per_class=5, seed=6)
    assert a == b and set(a) == set(zs.CHEXPERT_GRAMMAR)
    assert all(len(v) == 5 and len(set(v)) == 5 for v in a.values())
    assert zs.grammar_prompts(per_class=5, seed=7) != a
    g = {"x": (("", "mild"), ("opacity",), ("left",))}
    assert sorted(zs.grammar_prompts(g, per_class=10)["x"]) == ["mild opacity left", "opacity left"]


def test_class_prompt_priority():
    from medvlp_jax.evaluators import zero_shot as zs
    cfg = eval_cfg(prompts={"effusion": ["fluid"]}, templates=("a {}", "b {}"), builtin_prompts=True)
    p = zs.class_prompts(cfg, ["effusion", "opacity", "Odd_Name"], "synthetic")
    assert p["effusion"] == ["fluid"]                                  # explicit
    assert p["opacity"] == zs.SYNTHETIC_PROMPTS["opacity"]             # data set table
    assert p["Odd_Name"] == ["a odd name", "b odd name"]               # templates
    cfg.builtin_prompts = False
    assert zs.class_prompts(cfg, ["opacity"], "synthetic")["opacity"] == ["a opacity", "b opacity"]


def test_evaluate_multilabel_matches_reference(syn_run, monkeypatch):
    from medvlp_jax.evaluators import embed, eval_config, get
    captured = {}
    original = embed.embed_split

    def spy(*args, **kwargs):
        captured["emb"] = original(*args, **kwargs)
        return captured["emb"]
    monkeypatch.setattr(embed, "embed_split", spy)
    res = get("zero_shot")(syn_run, eval_cfg())
    classes = ["normal", "opacity", "effusion", "cardiomegaly"]
    assert res["protocol/task"] == "multilabel" and res["protocol/num_images"] == 32
    for c in classes:
        for k in ("auroc", "f1", "accuracy"):
            assert 0.0 <= res[f"{k}/{c}"] <= 1.0
    # Independent reference from the same image embeddings: per-prompt text embeddings averaged and
    # renormalised here, AUROC by pair counting.
    config = eval_config(syn_run, eval_cfg())
    emb = captured["emb"]
    assert len(emb["img_emb"]) == 32
    from medvlp_jax.evaluators.zero_shot import SYNTHETIC_PROMPTS
    aucs = []
    for j, c in enumerate(classes):
        t = embed.embed_texts(config, syn_run.model, syn_run.variables, syn_run.mesh, syn_run.tokenizer,
                              SYNTHETIC_PROMPTS[c])
        m = t.mean(0)
        s = emb["img_emb"] @ (m / np.linalg.norm(m))
        aucs.append(_auroc_pairs(s, (emb["labels"][:, j] > 0).astype(int)))
        assert res[f"auroc/{c}"] == pytest.approx(aucs[-1], abs=1e-6)
    assert res["macro_auroc"] == pytest.approx(np.mean(aucs), abs=1e-6)
    assert res["protocol/prompts/effusion"] == " | ".join(SYNTHETIC_PROMPTS["effusion"])


def test_evaluate_pos_neg_and_gloria_scoring(syn_run):
    from medvlp_jax.evaluators import get
    r = get("zero_shot")(syn_run, eval_cfg(mode="pos_neg", negative_templates=("no {}",),
                                           data=dict(class_names=("effusion", "opacity"))))
    assert r["protocol/mode"] == "pos_neg" and r["protocol/negative_prompts/effusion"] == "no effusion"
    assert set(k.split("/")[1] for k in r if k.startswith("auroc/")) == {"effusion", "opacity"}
    assert 0 <= r["macro_auroc"] <= 1
    g = get("zero_shot")(syn_run, eval_cfg(scoring="gloria"))
    assert g["protocol/scoring"] == "gloria" and 0 <= g["macro_auroc"] <= 1


def test_evaluate_multiclass_protocol(syn_run, syn_single_data):
    from medvlp_jax.evaluators import get
    r = get("zero_shot")(syn_run, eval_cfg(data=dict(root=syn_single_data)))
    assert r["protocol/task"] == "multiclass"
    assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
    n = sum(r[f"protocol/positives/{c}"] for c in ["normal", "opacity", "effusion", "cardiomegaly"])
    assert n == r["protocol/num_images"]
    with pytest.raises(ValueError, match="exactly one positive"):
        get("zero_shot")(syn_run, eval_cfg(task="multiclass"))
