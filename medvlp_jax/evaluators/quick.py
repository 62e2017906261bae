"""End-of-training evaluation that every pretraining run writes: retrieval and zero-shot on the eval split.

Image->report recall@K over the held-out split (a hit = the image's own report), both directions, and
zero-shot classification AUROC per class with prompt-ensembled class embeddings (cosine similarity).
The full protocol suite lives in the other evaluators; this one is cheap enough to run after every run.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from medvlp_jax import metrics
from medvlp_jax.evaluators import embed


def class_prompts(config, class_names: list[str]) -> dict[str, list[str]]:
    """Prompts per class: ``config.evals.prompts[class]`` if given, else the class name itself."""
    given = config.get("evals", {}).get("prompts", {}) if config.get("evals") else {}
    return {c: list(given.get(c, [c.replace("_", " ")])) for c in class_names}


def zero_shot_scores(img_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """Cosine similarity of L2-normalised images [n, d] with class embeddings [c, d] -> [n, c]."""
    return img_emb @ class_emb.T


def class_embeddings(config, model, variables, mesh, tokenizer, prompts: dict[str, list[str]]) -> np.ndarray:
    """Mean of each class's prompt embeddings, re-normalised -> [c, d] (open_clip-style ensembling)."""
    texts = [p for ps in prompts.values() for p in ps]
    emb = embed.embed_texts(config, model, variables, mesh, tokenizer, texts)
    out, i = [], 0
    for ps in prompts.values():
        m = emb[i:i + len(ps)].mean(0)
        out.append(m / max(np.linalg.norm(m), 1e-12))
        i += len(ps)
    return np.stack(out)


def evaluate_embeddings(emb: dict[str, Any], class_emb: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """Retrieval + zero-shot metrics from extracted embeddings (pure numpy)."""
    sim = emb["img_emb"] @ emb["txt_emb"].T
    res = {f"retrieval/{k}": float(v) for k, v in metrics.retrieval_metrics(sim).items()}
    n = sim.shape[0]
    res["retrieval/num_pairs"] = float(n)
    res["retrieval/chance_R@1"] = 1.0 / n
    scores = zero_shot_scores(emb["img_emb"], class_emb)
    labels = (emb["labels"] > 0).astype(np.int64)
    macro = metrics.macro_auroc(scores, labels)
    res["zero_shot/macro_auroc"] = float(macro.macro)
    for c, v in zip(class_names, macro.per_class):
        if np.isfinite(v):
            res[f"zero_shot/auroc/{c}"] = float(v)
    return res


def evaluate_state(config, setup: dict[str, Any], state, tokenizer) -> dict[str, float]:
    """Runs the quick evaluation of a TrainState on ``config.data.eval_split``."""
    model, mesh = setup["model"], setup["mesh"]
    variables = embed.variables_of(state)
    emb = embed.embed_split(config, model, variables, mesh, tokenizer, config.data.eval_split)
    class_names = list(emb["class_names"])
    cls = class_embeddings(config, model, variables, mesh, tokenizer, class_prompts(config, class_names))
    return evaluate_embeddings(emb, cls, class_names)
