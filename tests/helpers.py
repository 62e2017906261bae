"""Shared test helpers: tiny configs, random batches, running one train step on a given mesh."""
from __future__ import annotations

import os

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = "test"):
    """configs/<name>.py:<arg> through the same loader as the launchers."""
    from medvlp_jax import config_lib
    return config_lib.repo_config(name, arg)


def random_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch with the pipeline's keys: random images, random token ids with padding, word ids."""
    rng = np.random.default_rng(seed)
    c, t = config.data.crop, config.data.max_text_len
    vocab = config.model.text.vocab_size
    ids = np.zeros((batch_size, t), np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    word_ids = np.full((batch_size, t), -1, np.int32)
    for i in range(batch_size):
        n = int(rng.integers(3, t - 1))              # tokens between [CLS] and [SEP]
        ids[i, 0], ids[i, n + 1] = 2, 3
        ids[i, 1:n + 1] = rng.integers(5, vocab, n)
        mask[i, :n + 2] = 1
        slot, w = 0, [0]
        for _ in range(n):
            slot += int(rng.random() < 0.7 or slot == 0)   # ~30% of tokens continue the previous word
            w.append(slot)
        w.append(slot + 1)
        word_ids[i, :n + 2] = w
    return {"image": rng.standard_normal((batch_size, c, c, config.data.channels)).astype(np.float32),
            "input_ids": ids, "attention_mask": mask, "word_ids": word_ids,
            "labels": rng.integers(0, 2, (batch_size, 4)).astype(np.float32),
            "index": np.arange(batch_size, dtype=np.int32), "valid": np.ones((batch_size,), bool)}


def run_steps(config, mesh_shape: tuple[int, int], batches, *, steps_per_epoch: int = 10):
    """Initialises a state on a (data, fsdp) mesh of the first devices and runs the jitted step on ``batches``.

    Returns (final params as numpy, list of per-step metrics as floats).
    """
    from medvlp_jax import sharding as sharding_lib
    from medvlp_jax.train.setup import build
    n = mesh_shape[0] * mesh_shape[1]
    config = config.copy_and_resolve_references()
    config.mesh.data, config.mesh.fsdp = mesh_shape
    config.seed = 0
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:n])
    setup = build(config, mesh, steps_per_epoch=steps_per_epoch, total_steps=100, init_batch_size=8)
    state = setup.init_state()
    step = setup.jit_train_step()
    history = []
    for b in batches:
        state, metrics = step(state, sharding_lib.to_global(b, mesh))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return jax.device_get(state.params), history, state, step


def assert_trees_close(actual, desired, *, rtol: float = 1e-5, floor: float = 1e-3, err_msg: str = "") -> None:
    """Asserts two pytrees of arrays agree up to float rounding, judged against each leaf's own scale.

    Two float32 computations of the same quantity in another order (remat, chunked loops, sharded
    reductions, gradient accumulation) differ by rounding relative to the *magnitudes summed*, not to each
    element: an element that happens to land near zero carries the same absolute noise as its large
    neighbours. So the tolerance of a leaf is ``rtol * scale`` for every element, with

        scale = max(max|desired_leaf|, floor * max|desired_tree|)

    The floor covers leaves whose exact value is zero (e.g. the gradient of an attention key bias, which
    softmax cancels): their own maximum is pure rounding noise, while the noise comes from the rest of the
    tree. A real bug that changes a leaf by a fraction much larger than ``rtol`` of its scale still fails.

    Args:
      actual: pytree of arrays.
      desired: pytree of arrays with the same structure and shapes.
      rtol: allowed error as a fraction of the leaf's scale (float32 rounding over short sums: ~1e-6).
      floor: lower bound of a leaf's scale, as a fraction of the largest magnitude in ``desired``.
      err_msg: prefix of the failure message.
    """
    a_leaves, _ = jax.tree_util.tree_flatten_with_path(actual)
    d_leaves = jax.tree.leaves(desired)
    assert len(a_leaves) == len(d_leaves), f"{err_msg}: {len(a_leaves)} leaves vs {len(d_leaves)}"
    d_arrays = [np.asarray(d, np.float64) for d in d_leaves]
    # A NaN would make every comparison below vacuous (and the scale NaN): both sides must be finite.
    assert all(np.isfinite(d).all() for d in d_arrays), f"{err_msg}: non-finite values in `desired`"
    tree_scale = max((float(np.abs(d).max()) for d in d_arrays if d.size), default=0.0)
    for (path, a), d in zip(a_leaves, d_arrays):
        a = np.asarray(a, np.float64)
        name = f"{err_msg} {jax.tree_util.keystr(path)}".strip()
        assert a.shape == d.shape, f"{name}: shape {a.shape} vs {d.shape}"
        assert np.isfinite(a).all(), f"{name}: non-finite values in `actual`"
        if not d.size:
            continue
        scale = max(float(np.abs(d).max()), floor * tree_scale)
        np.testing.assert_allclose(a, d, rtol=0, atol=rtol * scale,
                                   err_msg=f"{name}: tolerance {rtol:g} x leaf scale {scale:.3g}")
