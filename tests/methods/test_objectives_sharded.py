"""Every registered objective, sharded equals unsharded: loss, metrics and gradients (with respect to the encoder
outputs and the method's parameters) under jit on one device equal those with the batch sharded over a
4 x 2 (data x fsdp) mesh of 8 devices.

The encoder outputs come from the test config's model on a random batch (one forward, outside the comparison),
so masks, padding and grids are the real ones. The whole train step, encoders included, sharded against one
device: tests/methods/test_all_methods_step.py (ConVIRT in the default run, every method with ``-m slow``).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from medvlp_jax import sharding as sharding_lib
from medvlp_jax.methods import OBJECTIVES
from medvlp_jax.train.setup import build
from medvlp_jax.types import LossContext
from tests import helpers

BATCH = 8
STEP = 50          # with steps_per_epoch=1: past every method's warm-up and stage boundaries


def _case(name):
    config = helpers.load_config(name, "test")
    one = sharding_lib.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    setup = build(config, one, steps_per_epoch=1, total_steps=100, init_batch_size=BATCH)
    state = setup.init_state()
    batch = {k: jnp.asarray(v) for k, v in helpers.random_batch(config, BATCH, seed=3).items()}
    variables = {"params": state.params["encoders"], **state.model_state}
    out = jax.jit(lambda v, b: setup.model.apply(v, b, train=False))(variables, batch)
    teacher = jax.tree.map(lambda x: x * 0.9, out) if setup.objective.ema_decay else None
    return setup.objective, state.params["method"], out, teacher, batch


def _loss_and_grads(objective):
    """f(method params, outputs, teacher, batch) -> (loss, metrics, (d/d method params, d/d float outputs))."""
    def f(method_params, out, teacher, batch):
        floats = {k: v for k, v in vars(out).items()
                  if isinstance(v, jax.Array) and jnp.issubdtype(v.dtype, jnp.floating)}

        def loss(mp, fl):
            return objective.loss(objective.prepare_params(mp), out.replace(**fl), batch,
                                  LossContext(jnp.int32(STEP), jax.random.PRNGKey(7), teacher))
        (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(method_params, floats)
        return value, metrics, grads
    return f


def _on(mesh, tree, spec):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x))), tree)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_sharded_equals_one_device(name):
    objective, method_params, out, teacher, batch = _case(name)
    f = _loss_and_grads(objective)
    want = jax.jit(f)(method_params, out, teacher, batch)

    mesh = sharding_lib.make_mesh({"data": 4, "fsdp": 2}, jax.devices()[:8])
    rows = lambda x: P(("data", "fsdp")) if x.ndim and x.shape[0] == BATCH else P()    # batch axis split
    got = jax.jit(f)(_on(mesh, method_params, lambda x: P()), _on(mesh, out, rows),
                     _on(mesh, teacher, rows), _on(mesh, batch, rows))
    # The inputs really were split over all 8 devices.
    assert len(_on(mesh, out, rows).img_emb.sharding.device_set) == 8

    value, metrics, grads = jax.device_get(want)
    value8, metrics8, grads8 = jax.device_get(got)
    assert np.isfinite(value)
    np.testing.assert_allclose(value8, value, rtol=2e-5, atol=1e-6)
    assert metrics8.keys() == metrics.keys()
    for k in metrics:
        np.testing.assert_allclose(np.asarray(metrics8[k]), np.asarray(metrics[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    helpers.assert_trees_close(grads8, grads, rtol=1e-4, err_msg=f"{name} gradients")
    # Some gradient is non-zero (a loss that ignores its inputs would pass the comparison trivially).
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads[1]))
