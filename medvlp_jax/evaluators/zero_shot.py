"""Zero-shot classification from prompts (methods.md 10.6, 3.4).

Class embeddings: each class has a list of prompts (explicit ``cfg.prompts``, else the built-in table of the
data set, else ``cfg.templates`` x class name); their text embeddings are averaged and re-normalised
(open_clip-style ensembling), and an image's score for a class is the cosine with that embedding.

Protocols (``cfg.mode`` / ``cfg.task``):

* multi-label (``task="multilabel"``, or ``"auto"`` on data where a row can have several or no
  positives: demo, synthetic, CheXpert 5 labels, RSNA): per class AUROC, and F1 and accuracy at the
  threshold that maximises F1 (MedKLIP/KAD); macro means over the classes that have positives and
  negatives in the split. ``mode="cosine"`` scores with the class cosine; ``mode="pos_neg"`` is the
  MedKLIP protocol: softmax over the ensembled "{finding}" prompt and its negation ("no {finding}",
  ``cfg.negative_templates``), score = probability of the positive prompt.
* multiclass (``task="multiclass"``, or ``"auto"`` when every row has exactly one positive: CheXpert
  5x200, COVIDx): the GLoRIA protocol: z-normalise each class column over the images, predict argmax;
  accuracy and macro F1 (plus one-vs-rest AUROC of the z-scores).

``cfg.scoring="gloria"`` replaces the global cosine by GLoRIA's zero-shot score (methods.md 3.4): per prompt
(local + global) / 2 with the local term max over the prompt's words, the class score the max over its
prompts (not the ensemble). It needs a model whose patch and word embeddings share a space (GLoRIA). The run's
objective supplies the score (``Objective.zero_shot_scores``: GLoRIA's with its own settings); for a method
without one, GLoRIA's score with its default settings on the [CLS] report vector.
"""
from __future__ import annotations

import itertools
import random
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np

from medvlp_jax import metrics
from medvlp_jax.evaluators import EVALUATORS, embed, quick
from medvlp_jax.evaluators.protocol import binary_labels, class_columns, data_info, eval_config, is_single_label

# Prompts of the built-in synthetic data (data/sources/synthetic.py): the report phrases' vocabulary.
SYNTHETIC_PROMPTS: dict[str, list[str]] = {
    "normal": ["no acute cardiopulmonary abnormality", "lungs are clear"],
    "opacity": ["patchy opacity", "opacity in the right upper lobe"],
    "effusion": ["pleural effusion", "small left pleural effusion"],
    "cardiomegaly": ["the heart is enlarged", "cardiomegaly"],
}

# CheXpert competition classes and the public single-label sets (RSNA, SIIM, COVIDx). Written for this
# project in plain radiology wording; the GLoRIA grammar below generates the 5x200 prompts.
CHEXPERT_PROMPTS: dict[str, list[str]] = {
    "Atelectasis": ["atelectasis", "bibasilar atelectasis", "subsegmental atelectasis at the lung base"],
    "Cardiomegaly": ["cardiomegaly", "the heart is enlarged", "enlarged cardiac silhouette"],
    "Consolidation": ["consolidation", "focal consolidation", "airspace consolidation in the lower lobe"],
    "Edema": ["pulmonary edema", "interstitial edema", "vascular congestion with pulmonary edema"],
    "Pleural Effusion": ["pleural effusion", "small pleural effusion", "bilateral pleural effusions"],
    "Lung Opacity": ["lung opacity", "patchy opacity", "airspace opacity"],
    "Pneumonia": ["pneumonia", "findings consistent with pneumonia", "airspace opacity suggesting pneumonia"],
    "Pneumothorax": ["pneumothorax", "small apical pneumothorax", "right pneumothorax"],
    "No Finding": ["no acute cardiopulmonary abnormality", "the lungs are clear", "normal chest radiograph"],
}
COVIDX_PROMPTS: dict[str, list[str]] = {
    "normal": ["no acute cardiopulmonary abnormality", "the lungs are clear"],
    "pneumonia": ["pneumonia", "focal consolidation consistent with pneumonia"],
    "COVID-19": ["bilateral peripheral ground glass opacities", "multifocal patchy opacities consistent with covid-19"],
}

# GLoRIA-style prompt grammar for CheXpert 5x200 (methods.md 10.6): severity x subtype x location, all
# combinations, a seeded sample per class. Word lists written for this project.
CHEXPERT_GRAMMAR: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "Atelectasis": (("", "mild", "minimal"),
                    ("subsegmental atelectasis", "linear atelectasis", "platelike atelectasis", "atelectasis"),
                    ("at the left lung base", "at the right lung base", "at both lung bases", "in the lingula",
                     "in the right middle lobe")),
    "Cardiomegaly": (("", "mild", "moderate"),
                     ("cardiomegaly", "enlargement of the cardiac silhouette", "enlarged heart size"),
                     ("", "with normal pulmonary vasculature", "is unchanged")),
    "Consolidation": (("", "patchy", "focal", "dense"),
                      ("consolidation", "airspace consolidation", "opacity"),
                      ("at the right lung base", "at the left lung base", "in the right upper lobe",
                       "in the left lower lobe", "in the lingula")),
    "Edema": (("", "mild", "moderate", "severe"),
              ("pulmonary edema", "interstitial edema", "vascular congestion"),
              ("", "in both lungs", "with cephalization of the vessels")),
    "Pleural Effusion": (("", "small", "moderate", "large"),
                         ("pleural effusion", "effusion", "layering effusion"),
                         ("on the left", "on the right", "bilaterally", "with adjacent atelectasis")),
}


def grammar_prompts(grammar=None, per_class: int = 5, seed: int = 6) -> dict[str, list[str]]:
    """Every severity x subtype x location phrase per class, then ``per_class`` drawn with ``random.Random(seed)``.

    Args:
        grammar: {class: (severities, subtypes, locations)}; default CHEXPERT_GRAMMAR.
        per_class: prompts kept per class (all when fewer).
        seed: one generator for all classes, drawn class by class in the grammar's order.
    """
    grammar = CHEXPERT_GRAMMAR if grammar is None else grammar
    rng = random.Random(seed)
    out = {}
    for c, parts in grammar.items():
        phrases = [" ".join(w for w in combo if w) for combo in itertools.product(*parts)]
        out[c] = phrases if len(phrases) <= per_class else rng.sample(phrases, per_class)
    return out


def builtin_prompts(dataset_name: str) -> dict[str, list[str]]:
    """The built-in prompt table for a prepared data set's ``name`` ({} when there is none)."""
    if dataset_name == "demo_iu":
        from medvlp_jax.data.sources import demo_iu
        return {k: list(v) for k, v in demo_iu.PROMPTS.items()}
    if dataset_name == "synthetic":
        return dict(SYNTHETIC_PROMPTS)
    if dataset_name == "covidx":
        return dict(COVIDX_PROMPTS)
    if dataset_name in ("chexpert", "chexpert_5x200", "rsna", "siim", "ms_cxr", "mimic_cxr"):
        return dict(CHEXPERT_PROMPTS)
    return {}


def class_prompts(cfg: ml_collections.ConfigDict, class_names: Sequence[str], dataset_name: str,
                  run_prompts: Optional[dict] = None) -> dict[str, list[str]]:
    """Prompts per class: ``cfg.prompts[c]``, else (``cfg.builtin_prompts``) the data set's table or the
    pretraining run's ``config.evals.prompts``, else ``cfg.templates`` filled with the lower-cased name."""
    given = dict(cfg.get("prompts", {}) or {})
    table = {}
    if cfg.get("builtin_prompts", True):
        table = {**(run_prompts or {}), **builtin_prompts(dataset_name)}
    templates = list(cfg.get("templates", ("{}",)))
    out = {}
    for c in class_names:
        if c in given:
            out[c] = list(given[c])
        elif c in table:
            out[c] = list(table[c])
        else:
            out[c] = [t.format(c.replace("_", " ").lower()) for t in templates]
        if not out[c]:
            raise ValueError(f"class {c!r} has no prompts")
    return out


def negative_prompts(cfg: ml_collections.ConfigDict, class_names: Sequence[str]) -> dict[str, list[str]]:
    """"no {finding}" prompts per class (MedKLIP): ``cfg.negative_prompts[c]`` or ``cfg.negative_templates``."""
    given = dict(cfg.get("negative_prompts", {}) or {})
    templates = list(cfg.get("negative_templates", ("no {}",)))
    return {c: list(given.get(c, [t.format(c.replace("_", " ").lower()) for t in templates])) for c in class_names}


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_scores(img_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """[n, c] cosine of images [n, d] with ensembled class embeddings [c, d]."""
    return l2n(np.asarray(img_emb, np.float64)) @ l2n(np.asarray(class_emb, np.float64)).T


def pos_neg_scores(img_emb: np.ndarray, pos_emb: np.ndarray, neg_emb: np.ndarray,
                   temperature: float = 1.0) -> np.ndarray:
    """MedKLIP: p(positive prompt) of a softmax over (positive, negative) cosines / temperature -> [n, c].

    A monotone function of cos_pos - cos_neg, so AUROC and best-F1 do not depend on the temperature.
    """
    d = (cosine_scores(img_emb, pos_emb) - cosine_scores(img_emb, neg_emb)) / temperature
    return 1.0 / (1.0 + np.exp(-d))


def zscore_columns(scores: np.ndarray) -> np.ndarray:
    """Each class column z-normalised over the images (population std; constant column -> 0) [n, c]."""
    s = np.asarray(scores, np.float64)
    if s.shape[0] < 2:
        return s
    std = s.std(axis=0, keepdims=True)
    return np.where(std > 0, (s - s.mean(axis=0, keepdims=True)) / np.where(std > 0, std, 1.0), 0.0)


def multilabel_metrics(scores: np.ndarray, y: np.ndarray, class_names: Sequence[str],
                       strict_accuracy: bool = True) -> dict[str, Any]:
    """Per-class AUROC / best-F1 / accuracy at best F1, macro over classes with both label values."""
    res: dict[str, Any] = {}
    keep = []
    for j, c in enumerate(class_names):
        n_pos = int(y[:, j].sum())
        res[f"protocol/positives/{c}"] = n_pos
        if n_pos == 0 or n_pos == len(y):
            continue
        keep.append(j)
        bf = metrics.best_f1(scores[:, j], y[:, j], strict_accuracy=strict_accuracy)
        res[f"auroc/{c}"] = metrics.auroc(scores[:, j], y[:, j])
        res[f"f1/{c}"] = bf.f1
        res[f"accuracy/{c}"] = bf.accuracy
    for name in ("auroc", "f1", "accuracy"):
        vals = [res[f"{name}/{class_names[j]}"] for j in keep]
        res[f"macro_{name}"] = float(np.mean(vals)) if vals else float("nan")
    res["protocol/skipped_classes"] = ", ".join(c for j, c in enumerate(class_names) if j not in keep)
    return res


def multiclass_metrics(scores: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """GLoRIA 5x200: argmax of column-z-scored scores -> accuracy, macro F1; one-vs-rest AUROC of the z-scores."""
    z = zscore_columns(scores)
    truth = y.argmax(axis=1)
    res: dict[str, Any] = {"accuracy": metrics.multiclass_accuracy(z, truth),
                           "macro_f1": metrics.macro_f1(z, truth, num_classes=len(class_names))}
    auc = metrics.macro_auroc(z, y)
    res["macro_auroc"] = auc.macro
    for c, v in zip(class_names, auc.per_class):
        if np.isfinite(v):
            res[f"auroc/{c}"] = float(v)
    for j, c in enumerate(class_names):
        res[f"protocol/positives/{c}"] = int(y[:, j].sum())
    return res


def encode_prompts(run, config, texts: list[str]) -> dict[str, np.ndarray]:
    """Text-tower outputs of prompts: txt_emb [m, d], word_emb [m, t, d], word_mask/slot_mask [m, t]."""
    return embed.encode_texts(config, run.model, run.variables, run.mesh, run.tokenizer, texts,
                              fields=("txt_emb", "word_emb", "word_mask", "slot_mask"))


def gloria_scores(run, config, emb: dict[str, np.ndarray], prompts: dict[str, list[str]],
                  image_chunk: int = 32) -> np.ndarray:
    """GLoRIA zero-shot class scores [n, c] before z-normalisation (methods.md 3.4).

    With the run's own ``Objective.zero_shot_scores`` (GLoRIA: its report vector, attention and temperatures),
    else GLoRIA's score with defaults on the [CLS] report vector.
    """
    from medvlp_jax.methods import gloria
    texts = [p for ps in prompts.values() for p in ps]
    prompt_class = np.concatenate([np.full(len(ps), j) for j, ps in enumerate(prompts.values())])
    t = encode_prompts(run, config, texts)
    scorer = run.objective.zero_shot_scores or gloria.zero_shot_scorer(report_vector_mode="cls")
    score = jax.jit(lambda img, patch: scorer(img, patch, t, prompt_class, len(prompts)))
    n = emb["img_emb"].shape[0]
    out = []
    for i in range(0, n, image_chunk):
        img, patch = emb["img_emb"][i:i + image_chunk], emb["patch_emb"][i:i + image_chunk]
        pad = image_chunk - img.shape[0]   # one compiled shape for every chunk
        img = np.pad(img, ((0, pad), (0, 0)))
        patch = np.pad(patch, ((0, pad), (0, 0), (0, 0)))
        out.append(np.asarray(score(img, patch))[:image_chunk - pad])
    return np.concatenate(out)


@EVALUATORS.register("zero_shot")
def evaluate(run, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Zero-shot classification of ``cfg.data.test_split`` (see module docstring)."""
    config = eval_config(run, cfg)
    info = data_info(config)
    split = cfg.data.test_split
    scoring = cfg.get("scoring", "global")
    if scoring not in ("global", "gloria"):
        raise ValueError(f"zero_shot.scoring must be 'global' or 'gloria', got {scoring!r}")
    fields = ("img_emb", "patch_emb") if scoring == "gloria" else ("img_emb",)
    emb = embed.embed_split(config, run.model, run.variables, run.mesh, run.tokenizer, split, fields=fields)
    class_names, cols = class_columns(emb["class_names"], cfg.data.class_names)
    y = binary_labels(emb["labels"], cols, cfg.data.uncertain_as)
    task = cfg.get("task", "auto")
    if task == "auto":
        task = "multiclass" if is_single_label(y) else "multilabel"
    if task not in ("multilabel", "multiclass"):
        raise ValueError(f"zero_shot.task must be 'auto', 'multilabel' or 'multiclass', got {task!r}")
    if task == "multiclass" and not is_single_label(y):
        raise ValueError("zero_shot.task='multiclass' needs exactly one positive class per image")
    same_data = config.data.root == run.config.data.root
    run_prompts = dict(run.config.get("evals", {}).get("prompts", {}) or {}) if same_data else {}
    prompts = class_prompts(cfg, class_names, info.get("name", ""), run_prompts)
    mode = cfg.get("mode", "cosine")
    if scoring == "gloria":
        scores = gloria_scores(run, config, emb, prompts)
    elif mode == "cosine":
        cls = quick.class_embeddings(config, run.model, run.variables, run.mesh, run.tokenizer, prompts)
        scores = cosine_scores(emb["img_emb"], cls)
    elif mode == "pos_neg":
        pos = quick.class_embeddings(config, run.model, run.variables, run.mesh, run.tokenizer, prompts)
        negs = negative_prompts(cfg, class_names)
        neg = quick.class_embeddings(config, run.model, run.variables, run.mesh, run.tokenizer, negs)
        scores = pos_neg_scores(emb["img_emb"], pos, neg, cfg.get("temperature", 1.0))
    else:
        raise ValueError(f"zero_shot.mode must be 'cosine' or 'pos_neg', got {mode!r}")
    if task == "multiclass":
        res = multiclass_metrics(scores, y, class_names)
    else:
        res = multilabel_metrics(scores, y, class_names, cfg.get("strict_accuracy", True))
    res.update({
        "protocol/data": info.get("name", ""), "protocol/root": config.data.root, "protocol/split": split,
        "protocol/num_images": int(len(y)), "protocol/num_classes": len(class_names), "protocol/task": task,
        "protocol/mode": mode, "protocol/scoring": scoring,
    })
    for c, ps in prompts.items():
        res[f"protocol/prompts/{c}"] = " | ".join(ps)
    if mode == "pos_neg" and scoring == "global":
        for c, ps in negative_prompts(cfg, class_names).items():
            res[f"protocol/negative_prompts/{c}"] = " | ".join(ps)
    return res
