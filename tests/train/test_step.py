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
