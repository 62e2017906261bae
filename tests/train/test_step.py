"""The train step: sharded == unsharded, no recompiles, finiteness guard, gradient accumulation."""
import jax
import numpy as np
import pytest

from tests import helpers


def _close_trees(a, b, rtol=2e-4, atol=2e-5):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_sharded_step_equals_single_device():
    """The same check, on the same ConVIRT :test config, batches and meshes, as
    tests/methods/test_all_methods_step.py::test_sharded_train_step_equals_single_device[convirt-test] (also
    slow; the default run checks the whole step on ConVIRT-ResNet and every objective alone): a slow
    duplicate."""
    config = helpers.load_config("convirt")
    batches = [helpers.random_batch(config, 8, seed=s) for s in range(2)]
    p1, h1, _, _ = helpers.run_steps(config, (1, 1), batches)
    p8, h8, state8, _ = helpers.run_steps(config, (4, 2), batches)
    for a, b in zip(h1, h8):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
    _close_trees(p1, p8)
    # The fsdp rule really sharded something over the fsdp axis.
    specs = [s.sharding.spec for s in jax.tree.leaves(state8.params)]
    assert any("fsdp" in str(s) for s in specs)


@pytest.fixture
def fewer_xla_optimisations():
    """For tests whose checks do not depend on how XLA optimised (cache size, exact skips): faster compiles."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def test_no_recompilation_after_first_step(fewer_xla_optimisations):
    config = helpers.load_config("convirt")
    batches = [helpers.random_batch(config, 8, seed=s) for s in range(3)]
    _, _, _, step = helpers.run_steps(config, (2, 1), batches)
    assert step._cache_size() == 1


def test_nonfinite_batch_is_skipped_and_counted(fewer_xla_optimisations):
    config = helpers.load_config("convirt")
    good = helpers.random_batch(config, 8, seed=0)
    bad = dict(good, image=np.full_like(good["image"], np.nan))
    params_before, _, _, _ = helpers.run_steps(config, (1, 1), [])
    params_after, hist, state, _ = helpers.run_steps(config, (1, 1), [bad])
    assert hist[0]["train/finite"] == 0.0
    assert int(state.nonfinite_steps) == 1
    _close_trees(params_before, params_after, rtol=0, atol=0)


def test_gradient_accumulation_matches_full_batch_for_per_example_loss():
    # ConVIRT's negatives span the (micro-)batch, so compare the *gradient path* on a batch whose two halves
    # are identical: each micro-batch then sees the same contrastive problem as the full batch's halves.
    config = helpers.load_config("convirt")
    config.optim.clip_norm = 0.0
    half = helpers.random_batch(config, 4, seed=3)
    full = {k: np.concatenate([v, v]) for k, v in half.items()}
    config_acc = config.copy_and_resolve_references()
    config_acc.optim.grad_accum_steps = 2
    p_half, h_half, _, _ = helpers.run_steps(config, (1, 1), [half])
    p_acc, h_acc, _, _ = helpers.run_steps(config_acc, (1, 1), [full])
    np.testing.assert_allclose(h_half[0]["train/loss"], h_acc[0]["train/loss"], rtol=1e-5)
    _close_trees(p_half, p_acc)


def test_map_diagnostic_metrics_are_valid_row_means_outside_the_gradient():
    """``attention/<name>`` = the mean of the objective's per-pair statistic over valid rows; no gradient."""
    import jax.numpy as jnp

    from medvlp_jax.methods import Objective
    from medvlp_jax.train.step import map_diagnostic_metrics
    from medvlp_jax.types import EncoderOutputs

    def stats(method_params, out):
        return {"row_sum": jnp.sum(out.img_emb, axis=-1) * method_params["scale"]}

    obj = Objective(name="stand_in", init=None, loss=None, map_diagnostics=stats)
    def outputs(img):
        none = dict.fromkeys(("patch_emb", "word_emb", "word_mask", "slot_mask", "word_attn", "patch_attn",
                              "img_feat", "txt_feat", "patch_feat", "word_feat"))
        return EncoderOutputs(img_emb=img, txt_emb=img, **none)

    img = jnp.arange(8.0).reshape(4, 2)                                   # row sums 1, 5, 9, 13
    out = outputs(img)
    valid = jnp.array([True, False, True, True])
    got = map_diagnostic_metrics(obj, {"scale": 2.0}, out, {"valid": valid})
    np.testing.assert_allclose(float(got["attention/row_sum"]), 2.0 * (1 + 9 + 13) / 3, rtol=1e-6)
    assert float(map_diagnostic_metrics(obj, {"scale": 1.0}, out, {})["attention/row_sum"]) == 7.0
    grad = jax.grad(lambda x: map_diagnostic_metrics(obj, {"scale": 1.0}, outputs(x), {})["attention/row_sum"])(img)
    assert not np.any(np.asarray(grad))
    assert map_diagnostic_metrics(obj._replace(map_diagnostics=None), {}, out, {}) == {}


def test_map_diagnostics_in_the_step_leave_training_unchanged(fewer_xla_optimisations):
    """GLoRIA's step with ``train.map_diagnostics`` logs its [CLS] share etc. and trains exactly as without."""
    config = helpers.load_config("gloria")
    batches = [helpers.random_batch(config, 8, seed=s) for s in range(2)]
    off = config.copy_and_resolve_references()
    off.train.map_diagnostics = False
    p_on, h_on, _, _ = helpers.run_steps(config, (1, 1), batches)
    p_off, h_off, _, _ = helpers.run_steps(off, (1, 1), batches)
    assert not any(k.startswith("attention/") for k in h_off[0])
    for h in h_on:
        assert 0.0 <= h["attention/first_softmax_cls_share"] <= 1.0
        assert 0.0 < h["attention/word_map_peak_mass"] <= 1.0
        assert h["attention/cls_word_norm_ratio"] > 0.0
    for a, b in zip(h_on, h_off):
        assert a["train/loss"] == b["train/loss"]
    _close_trees(p_on, p_off, rtol=1e-6, atol=1e-7)
