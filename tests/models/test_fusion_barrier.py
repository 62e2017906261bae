"""models/fusion_barrier.py: identity values and gradients, non-finite cotangents stay non-finite, and on XLA:CPU
the largest backward fusion of a ViT stops growing with the depth (the duplicated residual chain is gone)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax.models import fusion_barrier
from medvlp_jax.models.bert import Bert
from medvlp_jax.models.vit import ViT


def _vit(depth, barrier):
    return ViT(patch_size=8, width=32, depth=depth, num_heads=2, mlp_dim=64, image_size=16,
               fusion_barrier=barrier)


def _grad_fn(model):
    def loss(params, images):
        out = model.apply(params, images)
        return jnp.sum(out["patches"] ** 2) + jnp.sum(out["cls"])
    return jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 3)), jnp.float32)


def test_values_and_gradients_unchanged(images):
    params = _vit(3, False).init(jax.random.PRNGKey(0), images)
    (v0, g0), (v1, g1) = (_grad_fn(_vit(3, b))(params, images) for b in (False, True))
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    bert = Bert(vocab_size=50, width=32, depth=2, num_heads=2, mlp_dim=64, max_position=16, dropout=0.0)
    ids, mask = jnp.arange(16).reshape(2, 8) % 50, jnp.ones((2, 8), jnp.int32)
    p = bert.init(jax.random.PRNGKey(1), ids, mask)

    def bert_grad(barrier):
        m = bert.clone(fusion_barrier=barrier)
        return jax.grad(lambda q: jnp.sum(m.apply(q, ids, mask)["tokens"] ** 2))(p)

    for a, b in zip(jax.tree.leaves(bert_grad(False)), jax.tree.leaves(bert_grad(True))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_non_finite_cotangent_stays_non_finite():
    g = jax.grad(lambda x: jnp.sum(fusion_barrier.backward_fusion_barrier(x) * jnp.array([jnp.inf, 1.0, 2.0])))
    out = np.asarray(g(jnp.ones(3)))
    assert np.all(np.isnan(out))
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda x: jnp.sum(
        fusion_barrier.backward_fusion_barrier(x) * jnp.array([3.0, 1.0, 2.0])))(jnp.ones(3))), [3.0, 1.0, 2.0])


def _largest_fusion_operands(model, images):
    params = model.init(jax.random.PRNGKey(0), images)
    text = _grad_fn(model).lower(params, images).compile().as_text()
    counts = [len(re.findall(r"%[\w.\-]+", m.group(1)))
              for m in re.finditer(r"= [^=]*? fusion\((.*?)\), kind=", text)]
    return max(counts)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the duplication is XLA:CPU's")
def test_largest_backward_fusion_does_not_grow_with_depth(images):
    """Without the barrier the residual cotangent of block 0 is a fusion over every block above it (its operand
    count grows with the depth); with it, the largest fusion is the same at depth 3 and 6."""
    without = {d: _largest_fusion_operands(_vit(d, False), images) for d in (3, 6)}
    with_barrier = {d: _largest_fusion_operands(_vit(d, True), images) for d in (3, 6)}
    assert without[6] > without[3] + 20, without
    assert with_barrier[6] == with_barrier[3] and with_barrier[6] < without[6] / 2, (with_barrier, without)


def test_enabled_setting():
    assert fusion_barrier.enabled("auto") == (jax.default_backend() == "cpu")
    assert fusion_barrier.enabled(True) and not fusion_barrier.enabled(False)
    assert fusion_barrier.enabled("on") and not fusion_barrier.enabled("off") and not fusion_barrier.enabled("False")
    with pytest.raises(ValueError, match="fusion_barrier"):
        fusion_barrier.enabled("sometimes")
