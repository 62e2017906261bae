"""Jitted, sharded embedding extraction over an evaluation split (padded rows dropped).

Returns numpy arrays on every process, in split order: the rows that ``valid`` marks.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from medvlp_jax import sharding as sharding_lib
from medvlp_jax.data import pipeline, tokenizer as tokenizer_lib
from medvlp_jax.data.host_batches import HostBatches


def variables_of(state) -> dict[str, Any]:
    """Flax variables of the encoders from a TrainState (params + BatchNorm statistics)."""
    return {"params": state.params["encoders"], **state.model_state}


_FORWARD_CACHE: dict[tuple, Any] = {}


def make_forward(model, mesh, fields: Sequence[str]):
    """jit(batch -> {field: [b, ...]}) of the eval-mode forward pass; outputs gathered to every host.

    Cached per (model, mesh, fields), so repeated evaluations of one run compile once.
    """
    key = (id(model), id(mesh), tuple(fields))
    if key in _FORWARD_CACHE and _FORWARD_CACHE[key][0] is model:
        return _FORWARD_CACHE[key][1]
    out_sharding = sharding_lib.replicated(mesh)

    def forward(variables, batch):
        out = model.apply(variables, batch, train=False)
        return {f: getattr(out, f) for f in fields}

    fn = jax.jit(forward, out_shardings=out_sharding)
    _FORWARD_CACHE[key] = (model, fn)
    return fn


def embed_split(config, model, variables, mesh, tokenizer, split: str,
                fields: Sequence[str] = ("img_emb", "txt_emb", "img_feat")) -> dict[str, np.ndarray]:
    """Runs the eval forward over ``split``; returns fields + labels/index/report per valid row."""
    pc, pi = jax.process_count(), jax.process_index()
    local_batch = max(1, config.train.batch_size // pc)
    raw, info, num_batches = pipeline.build_eval_dataset(config.data, split, local_batch=local_batch,
                                                        process_index=pi, process_count=pc)
    forward = make_forward(model, mesh, fields)
    host = HostBatches(raw, tokenizer, config.data.max_text_len, f"split {split!r} of {config.data.root!r}")
    outs: dict[str, list] = {f: [] for f in fields}
    extra: dict[str, list] = {"labels": [], "index": [], "valid": []}
    for raw in host:
        batch = sharding_lib.to_global(raw, mesh)
        res = jax.device_get(forward(variables, batch))
        for f in fields:
            outs[f].append(np.asarray(res[f]))
        for k in extra:
            extra[k].append(np.asarray(jax.device_get(_gather(batch[k]))))
    result = {k: np.concatenate(v) for k, v in {**outs, **extra}.items()}
    keep = result.pop("valid").astype(bool)
    result = {k: v[keep] for k, v in result.items()}
    result["class_names"] = info["class_names"]
    return result


def _gather(x):
    return jax.jit(lambda a: a, out_shardings=sharding_lib.replicated(x.sharding.mesh))(x)


def encode_texts(config, model, variables, mesh, tokenizer, texts: list[str],
                 fields: tuple[str, ...] = ("txt_emb",)) -> dict[str, np.ndarray]:
    """Text-tower outputs of arbitrary strings (prompts), replicated on ``mesh``: the named ``TextOutputs``
    fields, e.g. txt_emb [n, d], word_emb [n, t, d], word_mask / slot_mask [n, t]."""
    tokens = tokenizer_lib.encode(tokenizer, texts, config.data.max_text_len)
    n = len(texts)
    rep = sharding_lib.replicated(mesh)
    tokens = {k: jax.make_array_from_process_local_data(rep, v) for k, v in tokens.items()}

    def fwd(variables, toks):
        o = model.apply(variables, toks, train=False, method="encode_text")
        return {f: getattr(o, f) for f in fields}

    out = jax.jit(fwd, out_shardings=rep)(variables, tokens)
    return {k: np.asarray(jax.device_get(v))[:n] for k, v in out.items()}


def embed_texts(config, model, variables, mesh, tokenizer, texts: list[str]) -> np.ndarray:
    """[n, d] text embeddings of arbitrary strings (prompts), through the text tower only."""
    return encode_texts(config, model, variables, mesh, tokenizer, texts)["txt_emb"]
