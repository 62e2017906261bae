"""Image-text retrieval (methods.md 10.4).

* Paired reports (MIMIC-CXR test, demo, synthetic): image->report and report->image Recall@1/5/10, median
  and mean rank. A hit is the image's own report; with ``cfg.duplicate_reports_are_hits`` (default) any
  report with exactly the same text counts too (templated "no acute abnormality" reports are common and
  indistinguishable by any model), reported as ``protocol/duplicate_report_rows``.
* Class retrieval (GLoRIA CheXpert 5x200 style): over the images whose labels have exactly one positive
  class among the evaluated classes, Precision@K in both directions with hit = same class
  (``cfg.precision_ks``, K larger than the candidate set is left out). On 5x200 every image qualifies; on
  multi-label data the single-label subset is used and its size reported.
* Data without reports (CheXpert 5x200 as prepared here: CheXpert has no public reports): the text side is
  the class prompts (zero_shot's prompt tables), each prompt a query/candidate labelled with its class;
  only the class Precision@K is defined (keys ``prompt_i2t/P@K``, ``prompt_t2i/P@K``).
"""
from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from medvlp_jax import metrics
from medvlp_jax.data.fields import read_split_fields
from medvlp_jax.evaluators import EVALUATORS, zero_shot
from medvlp_jax.evaluators.protocol import binary_labels, class_columns, data_info, eval_config
from medvlp_jax.evaluators import embed


def read_reports(root: str, split: str) -> dict[int, str]:
    """{example index: report text} of a whole split (images are not decoded)."""
    f = read_split_fields(root, split, ("index", "report"))
    return {int(i): str(r) for i, r in zip(f["index"], f["report"])}


def class_precision(sim: np.ndarray, query_cls: np.ndarray, cand_cls: np.ndarray, ks) -> dict[str, float]:
    """{"P@K": ...} for the K <= number of candidates (hit = same class)."""
    return {f"P@{k}": metrics.precision_at_k(sim, query_cls, cand_cls, int(k))
            for k in ks if 1 <= int(k) <= sim.shape[1]}


@EVALUATORS.register("retrieval")
def evaluate(run, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Retrieval on ``cfg.data.test_split`` (see module docstring)."""
    config = eval_config(run, cfg)
    info = data_info(config)
    split = cfg.data.test_split
    emb = embed.embed_split(config, run.model, run.variables, run.mesh, run.tokenizer, split,
                            fields=("img_emb", "txt_emb"))
    class_names, cols = class_columns(emb["class_names"], cfg.data.class_names)
    y = binary_labels(emb["labels"], cols, cfg.data.uncertain_as)
    reports_by_index = read_reports(config.data.root, split)
    reports = [reports_by_index[int(i)] for i in emb["index"]]
    text_side = cfg.get("text", "auto")
    if text_side == "auto":
        text_side = "reports" if any(r.strip() for r in reports) else "prompts"
    if text_side not in ("reports", "prompts"):
        raise ValueError(f"retrieval.text must be 'auto', 'reports' or 'prompts', got {text_side!r}")
    img = zero_shot.l2n(emb["img_emb"].astype(np.float64))
    ks = list(cfg.get("recall_ks", (1, 5, 10)))
    pks = list(cfg.get("precision_ks", (5, 10, 100)))
    single = y.sum(axis=1) == 1
    cls = y.argmax(axis=1)
    res: dict[str, Any] = {"protocol/data": info.get("name", ""), "protocol/root": config.data.root,
                           "protocol/split": split, "protocol/num_images": int(len(y)),
                           "protocol/text": text_side, "protocol/single_label_images": int(single.sum())}
    if text_side == "reports":
        txt = zero_shot.l2n(emb["txt_emb"].astype(np.float64))
        sim = img @ txt.T
        gt = metrics.same_text_matrix(reports) if cfg.get("duplicate_reports_are_hits", True) else None
        res.update(metrics.retrieval_metrics(sim, gt, ks))
        # Expected R@1 of a random ranking: the fraction of candidates that are hits, averaged over queries.
        res["chance_R@1"] = float(np.mean((np.eye(len(y), dtype=bool) if gt is None else gt).sum(axis=1)) / len(y))
        res["protocol/duplicate_report_rows"] = 0 if gt is None else int((gt.sum(axis=1) > 1).sum())
        if single.sum() >= 2 and len(np.unique(cls[single])) >= 2:
            s = sim[np.ix_(single, single)]
            c = cls[single]
            res.update({f"class_i2t/{k}": v for k, v in class_precision(s, c, c, pks).items()})
            res.update({f"class_t2i/{k}": v for k, v in class_precision(s.T, c, c, pks).items()})
    else:
        prompts = zero_shot.class_prompts(cfg, class_names, info.get("name", ""))
        texts = [p for ps in prompts.values() for p in ps]
        text_cls = np.concatenate([np.full(len(ps), j) for j, ps in enumerate(prompts.values())])
        txt = zero_shot.l2n(embed.embed_texts(config, run.model, run.variables, run.mesh, run.tokenizer,
                                              texts).astype(np.float64))
        if single.sum() >= 1:
            sim = img[single] @ txt.T
            c = cls[single]
            res.update({f"prompt_i2t/{k}": v for k, v in class_precision(sim, c, text_cls, pks).items()})
            res.update({f"prompt_t2i/{k}": v for k, v in class_precision(sim.T, text_cls, c, pks).items()})
        res["protocol/num_prompts"] = len(texts)
    res["protocol/precision_ks"] = ", ".join(str(k) for k in pks)
    for j, c in enumerate(class_names):
        res[f"protocol/single_label_images/{c}"] = int((single & (cls == j)).sum())
    return res
