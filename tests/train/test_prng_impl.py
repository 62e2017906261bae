"""config.train.prng_impl: the dropout bits' generator. What "equivalent" means for it, checked here:
threefry2x32 is the old path bit for bit; with dropout off every generator gives the same step bit for bit; the
masks of every generator are Bernoulli(1 - p), independent across steps and positions, and reproducible
from the state key (so a resumed run draws the same masks)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax.train import step as step_lib
from tests import helpers

FAST_IMPLS = ("philox4x32", "rbg")


def test_threefry_is_the_state_key_itself():
    key = jax.random.fold_in(jax.random.PRNGKey(3), 7)
    assert step_lib.dropout_key(key, "threefry2x32") is key
    with pytest.raises(ValueError, match="prng_impl"):
        step_lib.dropout_key(key, "mersenne")
    with pytest.raises(ValueError, match="prng_impl"):
        step_lib.make_train_step(None, None, None, None, prng_impl="mersenne")


@pytest.mark.parametrize("impl", ("threefry2x32",) + FAST_IMPLS)
def test_dropout_masks_are_iid_bernoulli_and_reproducible(impl):
    """Keep rate within 5 sigma of 0.9 over 2^20 positions; two steps' masks and neighbouring positions are
    uncorrelated (|r| < 0.01, ~10 sigma of the null); the same step key gives the same mask."""
    shape, rate = (256, 4096), 0.1
    drop = nn.Dropout(rate)

    def mask(step):
        key = step_lib.dropout_key(jax.random.fold_in(jax.random.PRNGKey(0), step), impl)
        y = drop.apply({}, jnp.ones(shape), deterministic=False, rngs={"dropout": key})
        return np.asarray(y != 0, np.float64)

    a, b = mask(1), mask(2)
    n = a.size
    sigma = np.sqrt(0.9 * 0.1 / n)
    assert abs(a.mean() - 0.9) < 5 * sigma and abs(b.mean() - 0.9) < 5 * sigma
    corr = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]
    assert abs(corr(a, b)) < 0.01                              # step to step
    assert abs(corr(a[:, :-1], a[:, 1:])) < 0.01               # neighbouring positions
    assert abs(corr(a[:-1], a[1:])) < 0.01                     # neighbouring rows
    np.testing.assert_array_equal(a, mask(1))                  # reproducible from the key


def _run(config, impl, batches):
    from medvlp_jax import sharding as sharding_lib
    from medvlp_jax.train.setup import build
    config = config.copy_and_resolve_references()
    config.seed, config.train.prng_impl = 0, impl
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
    setup = build(config, mesh, steps_per_epoch=10, total_steps=100, init_batch_size=8)
    state = setup.init_state()
    step = setup.jit_train_step()
    losses = []
    for b in batches:
        state, metrics = step(state, sharding_lib.to_global(b, mesh))
        losses.append(float(metrics["train/loss"]))
    return jax.device_get(state.params), losses


@pytest.mark.slow
def test_without_dropout_every_generator_gives_the_same_step():
    """The generator only feeds dropout: with text dropout 0 the step is bit-identical; with dropout 0.1 the masks
    (so the losses) differ, and the run stays finite."""
    config = helpers.load_config("convirt")
    config.model.text.dropout = 0.0
    batches = [helpers.random_batch(config, 8, seed=s) for s in range(2)]
    p_ref, l_ref = _run(config, "threefry2x32", batches)
    p_fast, l_fast = _run(config, "philox4x32", batches)
    assert l_ref == l_fast
    for x, y in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_fast)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    config.model.text.dropout = 0.1
    _, l_drop_ref = _run(config, "threefry2x32", batches)
    _, l_drop_fast = _run(config, "philox4x32", batches)
    assert l_drop_ref != l_drop_fast and np.all(np.isfinite(l_drop_fast))
