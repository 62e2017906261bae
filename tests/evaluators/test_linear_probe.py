"""Linear probe: label-fraction subsets, the jitted head trainer (first AdamW step against a hand-derived
reference, early stopping), perfect features -> AUROC / accuracy 1, and the evaluator on the synthetic run."""
import numpy as np
import pytest

from tests.evaluators.conftest import eval_cfg


def probe_cfg(**kw):
    base = dict(fractions=(0.1, 1.0), lr=5e-3, weight_decay=1e-6, head_batch_size=16, epochs=30, patience=5,
                task="auto")
    base.update(kw)
    return eval_cfg(**base)


def test_fraction_subsets_nested_deterministic_and_sized():
    from medvlp_jax.evaluators import linear_probe as lp
    subsets = lp.label_fraction_subsets(1000, (0.01, 0.1, 1.0), seed=42)
    assert [len(subsets[f]) for f in (0.01, 0.1, 1.0)] == [10, 100, 1000]
    assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[1.0]) == set(range(1000))
    again = lp.label_fraction_subsets(1000, (0.1, 0.01), seed=42)          # order of fractions irrelevant
    np.testing.assert_array_equal(again[0.01], subsets[0.01])
    np.testing.assert_array_equal(again[0.1], subsets[0.1])
    assert not np.array_equal(lp.label_fraction_subsets(1000, (0.1,), seed=0)[0.1], subsets[0.1])
    assert all(np.all(np.diff(v) > 0) for v in subsets.values())           # sorted, no repeats
    assert lp.fraction_size(64, 0.01) == 1 and lp.fraction_size(64, 0.1) == 6 and lp.fraction_size(5, 1.0) == 5
    assert lp.fraction_name(0.01) == "1%" and lp.fraction_name(1.0) == "100%"
    with pytest.raises(ValueError):
        lp.fraction_size(10, 0.0)


def test_first_full_batch_step_matches_adam_sign_rule():
    # Zero init, full batch: AdamW's first update is -lr * g / (|g| + eps) = -lr * sign(g) (decay of 0 is 0).
    from medvlp_jax.evaluators import linear_probe as lp
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    y = rng.integers(0, 2, (20, 2)).astype(np.float32)
    fit = lp.fit_linear_head(x, y, x, y, task="multilabel", lr=0.01, batch_size=0, max_epochs=1, progress=False)
    grad_w = x.T @ (0.5 - y) / y.size            # d mean BCE / dW at logits 0
    grad_b = (0.5 - y).sum(0) / y.size
    np.testing.assert_allclose(fit.params["kernel"], -0.01 * np.sign(grad_w), rtol=1e-4)
    np.testing.assert_allclose(fit.params["bias"], -0.01 * np.sign(grad_b), rtol=1e-4)
    # Softmax CE: d/dlogits at 0 = (1/c - onehot) / n.
    yc = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 20)]
    fit = lp.fit_linear_head(x, yc, x, yc, task="multiclass", lr=0.01, batch_size=0, max_epochs=1, progress=False)
    np.testing.assert_allclose(fit.params["kernel"], -0.01 * np.sign(x.T @ (1 / 3 - yc) / 20), rtol=1e-4)


def test_early_stopping_keeps_best_validation_epoch():
    from medvlp_jax.evaluators import linear_probe as lp
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 4)).astype(np.float32)
    y = (x[:, :1] > 0).astype(np.float32)
    # Validation labels are the opposite: every training epoch raises the validation loss.
    fit = lp.fit_linear_head(x, y, x, 1 - y, task="multilabel", lr=0.05, batch_size=8, max_epochs=50, patience=3,
                             progress=False)
    assert fit.best_epoch == 1 and fit.epochs_run == 4
    assert fit.best_val_loss == pytest.approx(fit.val_losses[0]) and fit.val_losses[-1] > fit.val_losses[0]
    # The returned head is the epoch-1 head: its validation loss reproduces best_val_loss.
    import jax.numpy as jnp
    logits = lp.linear_logits(fit.params, x)
    val = float(jnp.mean(lp.loss_per_example(logits, jnp.asarray(1 - y), "multilabel")))
    assert val == pytest.approx(fit.best_val_loss, rel=1e-5)


def _fake_extractor(multiclass: bool):
    """Features that encode the label perfectly (labels + small noise), per split, in the pipeline's format."""
    def extract(run, config, split):
        n = {"train": 64, "validation": 16, "test": 32}[split]
        rng = np.random.default_rng(len(split))
        if multiclass:
            labels = np.eye(3, dtype=np.float32)[np.arange(n) % 3]
        else:
            labels = rng.integers(0, 2, (n, 2)).astype(np.float32)
            labels[:2] = [[0, 1], [1, 0]]
        feats = np.concatenate([labels * 2 - 1, 0.05 * rng.normal(size=(n, 5))], 1).astype(np.float32)
        return {"features": feats, "labels": labels, "index": rng.permutation(n).astype(np.int32),
                "class_names": ["a", "b", "c"][:labels.shape[1]]}
    return extract


@pytest.mark.parametrize("multiclass", [False, True])
def test_perfect_features_give_perfect_scores(syn_run, monkeypatch, multiclass):
    from medvlp_jax.evaluators import get, linear_probe as lp
    monkeypatch.setattr(lp, "extract_features", _fake_extractor(multiclass))
    res = get("linear_probe")(syn_run, probe_cfg(fractions=(0.1, 1.0)))
    if multiclass:
        assert res["protocol/task"] == "multiclass"
        assert res["100%/accuracy"] == 1.0 and res["100%/macro_f1"] == 1.0
    else:
        assert res["protocol/task"] == "multilabel"
        assert res["100%/macro_auroc"] == 1.0 and res["100%/auroc/a"] == 1.0
        assert res["10%/macro_auroc"] == 1.0        # 6 examples suffice for a perfect feature
    assert res["protocol/10%/n_train"] == 6 and res["protocol/100%/n_train"] == 64
    assert res["protocol/n_val"] == 16 and res["protocol/n_test"] == 32


def test_evaluate_on_synthetic_run(syn_run):
    from medvlp_jax.data.fields import read_split_fields
    from medvlp_jax.evaluators import get, linear_probe as lp
    cfg = probe_cfg(fractions=(0.1, 0.5, 1.0), epochs=20, seed=3)
    res = get("linear_probe")(syn_run, cfg)
    assert res["protocol/task"] == "multilabel" and res["protocol/seed"] == 3
    assert res["protocol/feature_dim"] == syn_run.config.model.image.width
    for name, f in (("10%", 0.1), ("50%", 0.5), ("100%", 1.0)):
        assert res[f"protocol/{name}/n_train"] == lp.fraction_size(64, f)
        assert 0 <= res[f"{name}/macro_auroc"] <= 1
        assert 1 <= res[f"protocol/{name}/best_epoch"] <= res[f"protocol/{name}/epochs_run"] <= 20
        for c in ("normal", "opacity", "effusion", "cardiomegaly"):
            assert 0 <= res[f"{name}/auroc/{c}"] <= 1
    # The reported positives are those of the documented subset of example indices.
    stored = read_split_fields(syn_run.config.data.root, "train", ("index", "labels"))
    subset = lp.label_fraction_subsets(64, (0.1,), 3)[0.1]
    pos = (stored["labels"][subset] > 0).sum(0)
    assert res["protocol/10%/positives"] == ", ".join(str(int(v)) for v in pos)
