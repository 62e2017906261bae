"""Retrieval evaluator: report-text duplicates, R@K and class Precision@K against brute-force references on
the tiny synthetic run, and the prompt-text mode on a set without reports."""
import numpy as np
import pytest

from tests.evaluators.conftest import eval_cfg


def test_same_text_matrix():
    from medvlp_jax.metrics import same_text_matrix
    m = same_text_matrix(["a b", "A  b", "c", "a b."])
    np.testing.assert_array_equal(m, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])


def _recall(sim, gt, k):
    """Brute force: is any correct candidate among the k best (ties broken against the query)?"""
    hits = []
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda j: (-sim[i, j], gt[i, j]))
        hits.append(any(gt[i, j] for j in order[:k]))
    return float(np.mean(hits))


def _precision(sim, q, c, k):
    out = []
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda j: (-sim[i, j], q[i] == c[j]))
        out.append(np.mean([q[i] == c[j] for j in order[:k]]))
    return float(np.mean(out))


def test_evaluate_reports_matches_reference(syn_run, syn_data, monkeypatch):
    from medvlp_jax.evaluators import embed, get
    from medvlp_jax.evaluators.retrieval import read_reports
    captured = {}
    original = embed.embed_split

    def spy(*args, **kwargs):
        captured["emb"] = original(*args, **kwargs)
        return captured["emb"]
    monkeypatch.setattr(embed, "embed_split", spy)
    res = get("retrieval")(syn_run, eval_cfg(precision_ks=(5, 10, 100)))
    emb = captured["emb"]
    assert res["protocol/text"] == "reports" and res["protocol/num_images"] == 32
    img = emb["img_emb"] / np.linalg.norm(emb["img_emb"], axis=1, keepdims=True)
    txt = emb["txt_emb"] / np.linalg.norm(emb["txt_emb"], axis=1, keepdims=True)
    sim = img @ txt.T
    reports = read_reports(syn_data, "test")
    texts = [reports[int(i)] for i in emb["index"]]
    gt = np.array([[a == b for b in texts] for a in texts])
    assert res["protocol/duplicate_report_rows"] == int((gt.sum(1) > 1).sum()) > 0
    for k in (1, 5, 10):
        assert res[f"i2t/R@{k}"] == pytest.approx(_recall(sim, gt, k))
        assert res[f"t2i/R@{k}"] == pytest.approx(_recall(sim.T, gt.T, k))
    assert res["chance_R@1"] == pytest.approx(gt.sum() / 32 ** 2)
    y = (emb["labels"] > 0).astype(int)
    single = y.sum(1) == 1
    assert res["protocol/single_label_images"] == int(single.sum())
    cls = y.argmax(1)[single]
    s = sim[np.ix_(single, single)]
    for k in (5, 10):
        assert res[f"class_i2t/P@{k}"] == pytest.approx(_precision(s, cls, cls, k))
        assert res[f"class_t2i/P@{k}"] == pytest.approx(_precision(s.T, cls, cls, k))
    assert "class_i2t/P@100" not in res       # more than the candidates: left out
    without = get("retrieval")(syn_run, eval_cfg(duplicate_reports_are_hits=False, precision_ks=(5,)))
    assert without["i2t/R@1"] == pytest.approx(_recall(sim, np.eye(32, dtype=bool), 1))
    assert without["chance_R@1"] == pytest.approx(1 / 32)


def test_evaluate_prompt_mode_without_reports(syn_run, syn_single_data):
    from medvlp_jax.evaluators import get
    res = get("retrieval")(syn_run, eval_cfg(data=dict(root=syn_single_data), precision_ks=(1, 5, 10)))
    assert res["protocol/text"] == "prompts"
    assert res["protocol/num_prompts"] == 8                     # 2 synthetic-table prompts x 4 classes
    assert res["protocol/single_label_images"] == res["protocol/num_images"]
    for k in (1, 5):
        assert 0 <= res[f"prompt_i2t/P@{k}"] <= 1
    assert "prompt_i2t/P@10" not in res                         # only 8 prompts to retrieve
    assert 0 <= res["prompt_t2i/P@10"] <= 1
    with pytest.raises(ValueError, match="text"):
        get("retrieval")(syn_run, eval_cfg(data=dict(root=syn_single_data), text="captions"))
