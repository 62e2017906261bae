"""Shared test helpers: tiny configs, random batches, running one train step on a given mesh."""
from __future__ import annotations

import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str = "test"):
    """configs/<name>.py:<arg> through the same loader as the launchers."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


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
    from medvlp_jax.methods import make_objective
    from medvlp_jax.models.dual_encoder import build_model
    from medvlp_jax.train import optim, state as state_lib, step as step_lib
    n = mesh_shape[0] * mesh_shape[1]
    config = config.copy_and_resolve_references()
    config.mesh.data, config.mesh.fsdp = mesh_shape
    mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:n])
    model = build_model(config.model)
    objective = make_objective(config.method, steps_per_epoch=steps_per_epoch)
    tx, schedule = optim.make_optimizer(config.optim, total_steps=100)
    init = state_lib.make_init_fn(config, model, objective, tx, init_batch_size=8)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = state_lib.state_shardings(config, abstract, mesh)
    state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
    step = step_lib.jit_train_step(step_lib.make_train_step(model, objective, tx, schedule,
                                                            grad_accum_steps=config.optim.grad_accum_steps),
                                   shardings, sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh))
    history = []
    for b in batches:
        state, metrics = step(state, sharding_lib.to_global(b, mesh))
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return jax.device_get(state.params), history, state, step
