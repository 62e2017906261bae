"""methods/common.py: masked quantiles (torch linear interpolation), Sinkhorn, chunked cross-sample helpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medvlp_jax.methods import common
from tests.helpers import assert_trees_close


# ---- NumPy references -----------------------------------------------------------------------------------

def np_quantile_clipped_weights(x, mask, lo, hi):
    """Row by row as MGCA does: gather valid entries, torch-style linear quantiles, clip, normalise."""
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(x.shape[0]):
        idx = np.nonzero(mask[i])[0]
        if len(idx) == 0:
            continue
        vals = x[i, idx].astype(np.float64)
        a, b = np.quantile(vals, lo, method="linear"), np.quantile(vals, hi, method="linear")
        out[i, idx] = np.clip(vals, a, b)
        out[i] /= out[i].sum()
    return out


def np_sinkhorn(scores, eps, iters):
    """Transcription of MGCA's single-device sinkhorn (methods.md 4.4 pseudocode)."""
    q = np.exp(np.asarray(scores, np.float64).T / eps)          # [k, b]
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q *= (1.0 / k) / q.sum(axis=1, keepdims=True)
        q *= (1.0 / b) / q.sum(axis=0, keepdims=True)
    return (q / q.sum(axis=0, keepdims=True)).T


# ---- masked quantile / clipping ---------------------------------------------------------------------------

def test_masked_quantile_matches_numpy_linear_on_valid_entries():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(6, 9)).astype(np.float32)
    counts = [9, 5, 2, 1, 0, 7]
    mask = np.arange(9)[None, :] < np.asarray(counts)[:, None]
    mask = np.stack([rng.permutation(m) for m in mask])          # valid entries scattered, not a prefix
    for q in (0.0, 0.1, 0.37, 0.9, 1.0):
        got = np.asarray(common.masked_quantile(jnp.asarray(x), jnp.asarray(mask), q))[:, 0]
        for i, n in enumerate(counts):
            want = np.quantile(x[i][mask[i]].astype(np.float64), q, method="linear") if n else 0.0
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-7, err_msg=f"row {i}, q={q}")


def test_quantile_clipped_weights_matches_reference_and_has_no_gradient():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.01, 1.0, size=(4, 11)).astype(np.float32)
    mask = rng.uniform(size=(4, 11)) < 0.7
    mask[3] = False                                              # a row with nothing valid -> all zeros
    got = np.asarray(common.quantile_clipped_weights(jnp.asarray(x), jnp.asarray(mask), 0.1, 0.9))
    np.testing.assert_allclose(got, np_quantile_clipped_weights(x, mask, 0.1, 0.9), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[:3].sum(-1), 1.0, rtol=1e-6)
    assert np.all(got[~mask] == 0)
    # Clipping actually happened (otherwise the test could not tell clipping from plain normalisation).
    plain = np.where(mask, x, 0) / np.maximum(np.where(mask, x, 0).sum(-1, keepdims=True), 1e-12)
    assert np.abs(got[:3] - plain[:3]).max() > 1e-3
    g = jax.grad(lambda v: jnp.sum(common.quantile_clipped_weights(v, jnp.asarray(mask)) * jnp.arange(11.0)))(
        jnp.asarray(x))
    assert np.all(np.asarray(g) == 0)


@pytest.mark.parity
def test_masked_quantile_matches_torch_quantile_to_one_ulp():
    # torch's CPU lerp uses a fused multiply-add; XLA may not, so the last bit can differ.
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(5, 13)).astype(np.float32)
    mask = rng.uniform(size=(5, 13)) < 0.6
    mask[:, 0] = True
    for q in (0.1, 0.9):
        got = np.asarray(common.masked_quantile(jnp.asarray(x), jnp.asarray(mask), q))[:, 0]
        want = [torch.quantile(torch.from_numpy(x[i][mask[i]]), q).item() for i in range(5)]
        np.testing.assert_allclose(got, want, rtol=2.5e-7, atol=0)


# ---- Sinkhorn -----------------------------------------------------------------------------------------------

def _unit(rng, *shape):
    v = rng.normal(size=shape)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_sinkhorn_matches_reference_algorithm():
    rng = np.random.default_rng(3)
    scores = (_unit(rng, 6, 4) @ _unit(rng, 10, 4).T).astype(np.float32)     # [b, k] cosines
    got = np.asarray(common.sinkhorn(jnp.asarray(scores), 0.05, 3))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, np_sinkhorn(scores, 0.05, 3), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_sinkhorn_marginals_converge_to_uniform_prototypes_and_samples():
    rng = np.random.default_rng(4)
    b, k = 6, 4
    scores = jnp.asarray(_unit(rng, b, 3) @ _unit(rng, k, 3).T, jnp.float32)
    codes = np.asarray(common.sinkhorn(scores, 0.5, 300), np.float64)         # [b, k]
    plan = codes / b                                                          # the transport plan Q^T
    np.testing.assert_allclose(plan.sum(axis=1), 1.0 / b, rtol=1e-6)         # each sample: mass 1/b (exact)
    np.testing.assert_allclose(plan.sum(axis=0), 1.0 / k, rtol=1e-4)         # each prototype: mass 1/k
    # After only 3 iterations the column (sample) marginals are exact, the prototype ones are not yet.
    few = np.asarray(common.sinkhorn(scores, 0.05, 3), np.float64) / b
    np.testing.assert_allclose(few.sum(axis=1), 1.0 / b, rtol=1e-5)
    assert np.abs(few.sum(axis=0) - 1.0 / k).max() > 1e-4


def test_sinkhorn_is_float32_stop_gradient_permutation_equivariant_and_respects_valid():
    rng = np.random.default_rng(5)
    scores = jnp.asarray(_unit(rng, 5, 3) @ _unit(rng, 7, 3).T, jnp.bfloat16)
    codes = common.sinkhorn(scores, 0.05, 3)
    assert codes.dtype == jnp.float32
    g = jax.grad(lambda s: jnp.sum(common.sinkhorn(s, 0.05, 3) * jnp.arange(7.0)))(scores.astype(jnp.float32))
    assert np.all(np.asarray(g) == 0)
    s32 = scores.astype(jnp.float32)
    perm = np.array([3, 0, 4, 1, 2])
    np.testing.assert_allclose(np.asarray(common.sinkhorn(s32[perm], 0.05, 3)),
                               np.asarray(common.sinkhorn(s32, 0.05, 3))[perm], rtol=1e-5, atol=1e-7)
    valid = jnp.asarray([True, True, False, True, False])
    masked = np.asarray(common.sinkhorn(s32, 0.05, 3, valid))
    sub = np.asarray(common.sinkhorn(s32[np.asarray(valid)], 0.05, 3))
    np.testing.assert_allclose(masked[np.asarray(valid)], sub, rtol=1e-5, atol=1e-7)
    assert np.all(masked[~np.asarray(valid)] == 0)


# ---- chunked helpers ------------------------------------------------------------------------------------------

def test_map_in_chunks_equals_one_block_value_and_gradient():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)

    def f(x, y, chunk):
        body = lambda xs: jax.nn.logsumexp(xs @ y.T, axis=-1) * jnp.sum(xs, -1)   # [c]
        return jnp.sum(jnp.sin(common.map_in_chunks(body, x, chunk)))

    ref_v, ref_g = jax.value_and_grad(f, argnums=(0, 1))(x, y, None)
    for chunk in (1, 3, 4, 7):
        v, g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)(x, y, chunk)
        np.testing.assert_allclose(v, ref_v, rtol=1e-6)
        assert_trees_close(g, ref_g, err_msg=f"chunk {chunk}")  # rounding judged at each leaf's scale


def test_chunked_diag_ce_matches_loop_reference():
    rng = np.random.default_rng(7)
    n, d, tau = 7, 4, 0.3
    q, k = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    key_mask = np.array([True, False, True, True, False, True, True])
    want = []
    for i in range(n):
        cols = [j for j in range(n) if key_mask[j] or j == i]
        z = np.array([q[i] @ k[j] / tau for j in cols])
        m = z.max()
        want.append(m + np.log(np.exp(z - m).sum()) - q[i] @ k[i] / tau)
    for chunk in (None, 2, 3):
        got = common.chunked_diag_ce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                     jnp.asarray(key_mask), tau, chunk)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cosine_similarity_clamp_and_zero_vector_gradient_is_finite():
    x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
    y = jnp.asarray([[4.0, 3.0], [1.0, 0.0]])
    np.testing.assert_allclose(common.cosine_similarity(x, y), [24.0 / 25.0, 0.0], rtol=1e-6)
    g = jax.grad(lambda a: jnp.sum(common.cosine_similarity(a, y)))(x)
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("where", ["methods", "models"])
def test_l2_normalize_values_and_finite_gradient_at_zero(where):
    """x / max(||x||, eps) as torch F.normalize; a zero row (an empty word slot or word group) gets a finite
    gradient, where the norm's derivative 0/0 made the whole step's gradient NaN."""
    if where == "methods":
        from medvlp_jax.methods.common import l2_normalize
    else:
        from medvlp_jax.models.dual_encoder import l2_normalize
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-13, 0.0]], np.float32)
    want = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    np.testing.assert_allclose(np.asarray(l2_normalize(jnp.asarray(x))), want, rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(l2_normalize(v) * jnp.array([1.0, 2.0])))(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))
    # Away from zero the gradient is the analytic one: (I - u u^T) c / ||x||.
    u = x[0] / 5.0
    c = np.array([1.0, 2.0])
    np.testing.assert_allclose(np.asarray(g[0]), (c - u * (u @ c)) / 5.0, rtol=1e-5)
