"""End-of-training evaluation that every pretraining run writes: retrieval and zero-shot on the eval split.

Image->report recall@K over the held-out split, both directions, under three definitions of a hit, each
with the R@1 a random ranking would get (``chance_R@1``) beside it:

* ``retrieval/``: the image's own report (strict pairing);
* ``retrieval_same_text/``: any report with the same text (templated normal reports repeat verbatim);
* ``retrieval_same_findings/``: any report whose image shows the same findings (same multiset of stored
  ``finding_names``; only where the data stores findings, e.g. the demo). Where images are rendered from
  their findings (the demo), images of one group differ only in random anatomy, so no model can tell them
  apart; ``retrieval/ceiling_R@1`` = mean over queries of 1 / (size of its same-findings group) is then the
  strict R@1 of a model that recognises every finding perfectly and guesses within the group. Its chance
  level assumes a random ranking: a degenerate model that ranks the same normal report first for every image
  scores the share of normal images (42% on the demo test split), so set it beside the untrained baseline.

Zero-shot classification AUROC per class with prompt-ensembled class embeddings (cosine similarity).
The full protocol suite lives in the other evaluators; this one is cheap enough to run after every run.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from medvlp_jax import metrics
from medvlp_jax.data.fields import read_split_fields
from medvlp_jax.evaluators import EVALUATORS, embed


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


def evaluate_embeddings(emb: dict[str, Any], class_emb: np.ndarray, class_names: list[str],
                        reports: list[str] | None = None,
                        finding_names: list[list[str]] | None = None) -> dict[str, float]:
    """Retrieval + zero-shot metrics from extracted embeddings (pure numpy).

    Args:
        emb: "img_emb" [n, d], "txt_emb" [n, d] (L2-normalised), "labels" [n, classes].
        class_emb: [classes, d] prompt-ensembled class embeddings.
        class_names: names of the label columns.
        reports: the n report texts (row order of emb) for the same-text hits; None leaves them out.
        finding_names: per row, the names of its image's findings, for the same-findings hits.
    """
    sim = emb["img_emb"] @ emb["txt_emb"].T
    n = sim.shape[0]
    res: dict[str, float] = {}
    hit_sets = {"retrieval": np.eye(n, dtype=bool)}
    if reports is not None:
        hit_sets["retrieval_same_text"] = metrics.same_text_matrix(reports)
    if finding_names is not None:
        same = metrics.group_matrix([tuple(sorted(f)) for f in finding_names])
        hit_sets["retrieval_same_findings"] = same
        res["retrieval/ceiling_R@1"] = float(np.mean(1.0 / same.sum(axis=1)))
    for prefix, gt in hit_sets.items():
        res.update({f"{prefix}/{k}": float(v) for k, v in metrics.retrieval_metrics(sim, gt).items()})
        res[f"{prefix}/chance_R@1"] = float(gt.sum() / (n * n))
    res["retrieval/num_pairs"] = float(n)
    scores = zero_shot_scores(emb["img_emb"], class_emb)
    labels = (emb["labels"] > 0).astype(np.int64)
    macro = metrics.macro_auroc(scores, labels)
    res["zero_shot/macro_auroc"] = float(macro.macro)
    for c, v in zip(class_names, macro.per_class):
        if np.isfinite(v):
            res[f"zero_shot/auroc/{c}"] = float(v)
    return res


def evaluate_state(config, setup, state, tokenizer) -> dict[str, float]:
    """Runs the quick evaluation of a TrainState on ``config.data.eval_split``.

    setup: the run's ``train.setup.Setup`` (or a loaded ``common.Run``): its ``model`` and ``mesh`` are used.
    """
    model, mesh = setup.model, setup.mesh
    variables = embed.variables_of(state)
    emb = embed.embed_split(config, model, variables, mesh, tokenizer, config.data.eval_split)
    class_names = list(emb["class_names"])
    cls = class_embeddings(config, model, variables, mesh, tokenizer, class_prompts(config, class_names))
    stored = read_split_fields(config.data.root, config.data.eval_split, ("index", "report", "finding_names"))
    row = {int(i): r for r, i in enumerate(stored["index"])}
    rows = [row[int(i)] for i in emb["index"]]
    reports = [str(stored["report"][r]) for r in rows]
    findings = [stored["finding_names"][r] for r in rows]
    has_findings = any(findings)
    return evaluate_embeddings(emb, cls, class_names, reports, findings if has_findings else None)


@EVALUATORS.register("quick")
def evaluate(run, cfg) -> dict[str, Any]:
    """The end-of-run evaluation of a checkpoint (or, ``--untrained``, of its encoders at initialisation) on
    ``cfg.split`` ('' = the run's ``data.eval_split``), with the run's own prompts."""
    config = run.config
    if cfg.get("split", ""):
        config = config.copy_and_resolve_references()
        config.data.eval_split = cfg.split
    res: dict[str, Any] = evaluate_state(config, run, run.state, run.tokenizer)
    res["protocol/split"] = config.data.eval_split
    return res
