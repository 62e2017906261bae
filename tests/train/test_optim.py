"""The optimiser: frozen leaves (``optim.freeze_untrainable``) against an AdamW written here in NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medvlp_jax.train import optim

LR, B1, B2, EPS, WD = 0.1, 0.9, 0.999, 1e-8, 0.05


def _numpy_adamw(params, grads_per_step, trainable_per_step):
    """AdamW (optax's: bias-corrected moments, decoupled decay scaled by the learning rate) where a frozen leaf
    gets no step and no decay and keeps its moments; the step count advances for every leaf."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (g, keep) in enumerate(zip(grads_per_step, trainable_per_step), start=1):
        for k in p:
            if not keep[k]:
                continue
            mu[k] = B1 * mu[k] + (1 - B1) * g[k]
            nu[k] = B2 * nu[k] + (1 - B2) * g[k] ** 2
            m_hat, v_hat = mu[k] / (1 - B1 ** t), nu[k] / (1 - B2 ** t)
            p[k] = p[k] - LR * (m_hat / (np.sqrt(v_hat) + EPS) + WD * p[k])
    return p, mu, nu


def test_frozen_leaves_get_no_update_no_decay_and_keep_their_moments():
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(5)]
    switch = 2                                  # "b" frozen at steps 0 and 1 (like MGCA's prototypes), then free
    trainable = lambda step: {"a": jnp.asarray(True), "b": jnp.asarray(step) >= switch}   # noqa: E731
    tx = optim.freeze_untrainable(optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD), trainable)

    state, p = tx.init(params), jax.tree.map(jnp.asarray, params)
    update = jax.jit(lambda g, s, p, step: tx.update(g, s, p, step=step))
    for step, g in enumerate(grads):
        updates, state = update(g, state, p, jnp.int32(step))
        p = optax.apply_updates(p, updates)
        if step < switch:
            np.testing.assert_array_equal(np.asarray(p["b"]), params["b"])

    want_p, want_mu, want_nu = _numpy_adamw(params, grads, [{"a": True, "b": s >= switch} for s in range(5)])
    adam = state[0]                              # optax.adamw's chain: (ScaleByAdamState, ...)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want_p[k], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(adam.mu[k]), want_mu[k], rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(adam.nu[k]), want_nu[k], rtol=2e-5, atol=1e-9)
    assert int(adam.count) == 5


def test_a_bool_for_a_whole_subtree_and_an_unchanged_state_layout():
    """trainable may return a prefix of the parameters ({"encoders": True, "method": {...}}, as train.setup
    does); the wrapped optimiser's state is the inner one's, so checkpoints keep their layout."""
    params = {"encoders": {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}, "method": {"protos": jnp.ones((3,))}}
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.1, weight_decay=0.1))
    tx = optim.freeze_untrainable(inner, lambda step: {"encoders": True, "method": {"protos": step >= 1}})
    state = tx.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(inner.init(params))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params, step=jnp.int32(0))
    assert float(jnp.abs(updates["method"]["protos"]).max()) == 0.0
    assert float(jnp.abs(updates["encoders"]["w"]).min()) > 0.0
    updates, _ = tx.update(grads, state, params, step=jnp.int32(1))
    assert float(jnp.abs(updates["method"]["protos"]).min()) > 0.0
